"""All errors raised by randlora-io, in one place.

Every class subclasses a builtin (so callers may catch ``ValueError``/``OSError``) and
:class:`RandloraError` (so the CLI can turn any of them into one clear line). Messages name the file,
say what is wrong and, where possible, what to do next.
"""

from __future__ import annotations


class RandloraError(Exception):
    """Base class of every error randlora-io raises on purpose."""


class SafetensorsFormatError(ValueError, RandloraError):
    """A ``.safetensors`` file is malformed (header, offsets, dtypes, metadata)."""


class HeaderError(ValueError, RandloraError):
    """The randlora header (``__metadata__["randlora"]``) is missing, malformed or violates the spec."""


class UnsupportedVersionError(HeaderError):
    """The file declares a format major version this library does not implement."""


class AdapterShapeError(ValueError, RandloraError):
    """A tensor's shape disagrees with the header, or with the base model."""


class NonFiniteError(ValueError, RandloraError):
    """NaN or Inf found in scales, a delta or a merged weight."""


class BasisMismatchError(ValueError, RandloraError):
    """Regenerated bases do not match the checksum in the header or the bases stored by PEFT."""


class SourceFormatError(ValueError, RandloraError):
    """An input (PEFT dir, dense delta, checkpoint, index) is not in a format we can read."""


class UnsafeCheckpointError(SourceFormatError):
    """A pickle-based checkpoint (``.bin``/``.pt``) that we refuse to unpickle."""


class BaseModelMismatchError(ValueError, RandloraError):
    """An adapter targets a weight the base lacks, or a weight of another shape."""


class OutputExistsError(FileExistsError, RandloraError):
    """The output path exists (and ``--overwrite`` was not given) or equals an input."""


class HubError(OSError, RandloraError):
    """A Hub operation failed (missing repo, rejected token, corrupted download)."""


class AdapterStateError(RuntimeError, RandloraError):
    """An operation that the attached adapter's state does not allow (merge after detach, save while merged, ...;
    ``swap.remove_adapter`` of an adapter not applied, under a later one, or whose weights changed since)."""


class LayerTypeError(ValueError, RandloraError):
    """A layer's type (Linear or GPT-2 ``Conv1D``, hence its orientation) or dtype cannot be told from the base."""


class BasesTooLargeError(ValueError, RandloraError):
    """Regenerating an adapter's shared bases would exceed the memory budget (SPEC §4.6); nothing was allocated."""


class OutputWriteError(OSError, RandloraError):
    """Writing an output failed (full disk, file size limit, permissions): the message names the output."""


class UnsupportedPrecisionError(ValueError, RandloraError):
    """A merge precision that this adapter or device cannot use (``int8`` needs ternary bases and the CPU)."""


class LayerTooLargeError(ValueError, RandloraError):
    """A layer's ΔW would exceed the memory budget (``RANDLORA_IO_MAX_LAYER_BYTES``); nothing was allocated."""


class QuantizedBaseError(ValueError, RandloraError):
    """A quantized base this tool cannot merge into (GPTQ, AWQ, bitsandbytes, compressed-tensors, another method, or
    an FP8 variant it does not handle): refused by name before anything is written."""


class ConversionError(ValueError, RandloraError):
    """A lossy conversion cannot meet its bound (``--max-error``), or its options do not fit (nothing was written)."""


class UnservableError(ConversionError):
    """A serving engine (``convert --to peft-lora --for vllm|sglang``) cannot serve what the adapter holds: a rank
    above its limit, DoRA, modules_to_save or trained biases, or a layer type it has no LoRA for."""
