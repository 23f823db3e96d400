"""randlora-io: a compact, bit-exact file format for RandLoRA adapters, and the tools around it."""

import os as _os

# MKL's float32 GEMM sums in an order that depends on the thread count unless its strict reproducibility mode is on
# (measured: 1 vs 2 threads changed ~60 % of a merged 64×64 weight's bits at 1e-7, at no cost in speed with it on), so
# a merge under torchrun (1 thread a process) would not write the bytes of the same merge in one process. MKL reads
# this when it first runs, so it is set before torch is imported here; a value the user set is kept.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from .convert.peft_randlora import adapter_to_peft_randlora
from .convert.dense import write_dense
from .convert.run import ConvertReport, convert
from .errors import RandloraError
from .format.adapter import RandloraAdapter, build_adapter, read_adapter, write_adapter
from .format.basis import Bases, generate_bases
from .format.delta import reference_delta
from .format.spec import AdapterHeader, GeneratorSpec, LayerSpec
from .hub import load_from_hub, push_to_hub
from .inspect import describe, validate
from .merge.plan import MergeReport, merge
from .merge.state_dict import merge_into_state_dict
from .merge.swap import applied_adapters, apply_adapter, remove_adapter
from .sources.dense import read_dense
from .sources.interface import DeltaSource
from .sources.peft_randlora import peft_randlora_to_adapter
from .sources.registry import detect_kind, open_source

# The public API: these names and randlora_io.train. Everything else is internal and may move between 0.x releases.
__all__ = [
    # the format
    "AdapterHeader", "Bases", "GeneratorSpec", "LayerSpec", "RandloraAdapter", "build_adapter", "generate_bases",
    "read_adapter", "reference_delta", "write_adapter",
    # any adapter as ΔW, and what a path holds
    "DeltaSource", "describe", "detect_kind", "open_source", "validate",
    # merge into a checkpoint, a state dict, or a live model
    "MergeReport", "applied_adapters", "apply_adapter", "merge", "merge_into_state_dict", "remove_adapter",
    # convert between formats
    "ConvertReport", "adapter_to_peft_randlora", "convert", "peft_randlora_to_adapter", "read_dense", "write_dense",
    # the Hugging Face Hub
    "load_from_hub", "push_to_hub",
    "RandloraError",
]
__version__ = "0.1.0"
