"""What a base's ``quantization_config`` (config.json) says, read once per merge before any adapter is opened.

- none: a plain checkpoint;
- ``"fp8"`` block quantization (transformers' fine-grained FP8, DeepSeek-V3 / Qwen3-FP8 layout,
  :mod:`randlora_io.checkpoint.fp8_blocks`): an :class:`Fp8Layout` pairing each ``float8_e4m3fn`` weight with its
  ``weight_scale_inv``;
- any other method (GPTQ, AWQ, bitsandbytes, compressed-tensors, torchao, …) or an FP8 variant we do not handle
  (per-tensor scales, ``ue8m0`` scales, e5m2, FP4 experts): :class:`QuantizedBaseError` naming it.

Independently of the config, :func:`check_companions` refuses to merge into a weight whose module holds tensors that
look like quantization state (scales, zero points, packed ints) other than an FP8 pair's own scale: a merge never
writes into scale tensors or packed ints.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import QuantizedBaseError
from .base_model import MODEL_CONFIG, read_model_config
from .fp8_blocks import scale_grid

Checkpoint = "randlora_io.checkpoint.directory.Checkpoint"  # annotations only: directory.py imports this module

# a tensor's leaf name that holds quantization state rather than a weight (GPTQ qweight/qzeros/scales/g_idx, AWQ,
# bitsandbytes absmax/quant_map/quant_state/SCB, compressed-tensors weight_packed/weight_scale/weight_zero_point/
# weight_shape, FP8 weight_scale_inv/activation_scale/input_scale)
_QUANT_LEAF = re.compile(r"scale|zero|qweight|qzeros|g_idx|packed|absmax|quant|SCB|weight_shape|nested", re.I)


DEFAULT_BLOCK = [128, 128]  # transformers' FineGrainedFP8Config.weight_block_size when the config omits it


@dataclass(frozen=True)
class Fp8Layout:
    """An FP8 block-quantized checkpoint. ``block``: (rows, cols) of a scale block; ``scales``: each
    ``float8_e4m3fn`` weight key → its ``weight_scale_inv`` key (float32, ``scale_grid`` shape); ``input_scales``:
    the static activation scales (``activation_scale``, ``input_scale``), which scale a layer's inputs and are copied
    unchanged by a merge; ``unpaired``: other fp8 tensors → why they cannot be dequantized."""

    config_path: Path
    block: tuple[int, int]
    scales: dict[str, str] = field(default_factory=dict)
    input_scales: frozenset[str] = frozenset()
    unpaired: dict[str, str] = field(default_factory=dict)

    @functools.cached_property
    def owners(self) -> dict[str, str]:
        """Scale key → its weight key."""
        return {s: w for w, s in self.scales.items()}


def scale_key_of(key: str) -> str:
    """Where transformers looks for a weight's block scales: ``<module>.weight_scale_inv`` (``<key>_scale_inv`` for a
    parameter not named ``weight``, e.g. fused experts' ``gate_up_proj``)."""
    return key.removesuffix(".weight") + ".weight_scale_inv" if key.endswith(".weight") else key + "_scale_inv"


def read_quantization(ckpt: Checkpoint) -> Fp8Layout | None:
    """None for a plain checkpoint, the :class:`Fp8Layout` of an FP8 block-quantized one; anything else is refused
    in one line naming the method (:class:`QuantizedBaseError`)."""
    config = read_model_config(ckpt.root) or {}
    qc = config.get("quantization_config")
    path = ckpt.root / MODEL_CONFIG
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise QuantizedBaseError(f"{path}: quantization_config must be a JSON object")
    method = qc.get("quant_method")
    if method != "fp8":
        raise QuantizedBaseError(
            f"{path}: the base is quantized with {_method_name(qc)} (quantization_config); merging into its packed "
            "or scaled weights is not supported: merge into the unquantized base, then quantize the result")
    _check_fp8_variant(qc, path)
    block = qc.get("weight_block_size", DEFAULT_BLOCK)
    layout = Fp8Layout(config_path=path, block=(int(block[0]), int(block[1])))
    extras = set()
    for key in ckpt.weight_map:
        info = ckpt.info(key)
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("activation_scale", "input_scale"):
            extras.add(key)
        if info.dtype == "F8_E5M2":
            layout.unpaired[key] = "is float8_e5m2 (the config says e4m3)"
        if info.dtype != "F8_E4M3":
            continue
        scale = scale_key_of(key)
        want = scale_grid(info.shape, layout.block)
        if scale not in ckpt.weight_map:
            layout.unpaired[key] = f"has no {scale!r} (per-block scales under another name are not read)"
        elif ckpt.info(scale).dtype != "F32" or tuple(ckpt.shape(scale)) != tuple(want):
            layout.unpaired[key] = (f"has {scale!r} as {ckpt.info(scale).dtype} {list(ckpt.shape(scale))}, not F32 "
                                    f"{list(want)} for blocks of {list(layout.block)}")
        else:
            layout.scales[key] = scale
    return Fp8Layout(layout.config_path, layout.block, layout.scales, frozenset(extras), layout.unpaired)


def _method_name(qc: dict) -> str:
    method = qc.get("quant_method")
    if method == "bitsandbytes" or qc.get("load_in_4bit") or qc.get("load_in_8bit"):
        bits = "4-bit" if qc.get("load_in_4bit") else "8-bit" if qc.get("load_in_8bit") else ""
        return f"bitsandbytes {bits}".strip()
    if isinstance(method, str) and method:
        bits = qc.get("bits")
        return f"{method}{f' ({bits}-bit)' if isinstance(bits, int) else ''}"
    return "an unnamed method (no quant_method)"


def _check_fp8_variant(qc: dict, path: Path) -> None:
    """The FP8 variants we merge exactly: e4m3 codes, float32 per-block scales of a 2-D block size, FP8 experts."""
    fmt = qc.get("fmt", "e4m3")
    block = qc.get("weight_block_size", DEFAULT_BLOCK)  # transformers' default when the key is absent
    if fmt != "e4m3":
        raise QuantizedBaseError(f"{path}: fp8 quantization with fmt {fmt!r} is not supported (only e4m3)")
    if block is None:
        raise QuantizedBaseError(f"{path}: fp8 quantization with per-tensor scales (weight_block_size null) is not "
                                 "supported; only per-block scales (e.g. weight_block_size [128, 128])")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise QuantizedBaseError(f"{path}: quantization_config.weight_block_size must be two positive integers, "
                                 f"got {block!r}")
    if qc.get("scale_fmt", "float") != "float":
        raise QuantizedBaseError(f"{path}: fp8 quantization with scale_fmt {qc.get('scale_fmt')!r} (power-of-two "
                                 "scales) is not supported; only float32 scales (scale_fmt 'float')")
    if qc.get("expert_dtype", "fp8") != "fp8":
        raise QuantizedBaseError(f"{path}: fp8 quantization with expert_dtype {qc.get('expert_dtype')!r} (packed "
                                 "FP4 experts) is not supported")
    scheme = qc.get("activation_scheme", "dynamic")
    if not isinstance(scheme, str) or scheme.lower() not in ("dynamic", "static"):  # transformers lowercases it
        raise QuantizedBaseError(f"{path}: fp8 activation_scheme {qc.get('activation_scheme')!r} is not supported")


def check_companions(ckpt: Checkpoint, plan: Mapping[str, list[int]], paths: list[str]) -> None:
    """Refuse (one line) to merge into an adapted key that is itself quantization state, an fp8 weight we cannot
    dequantize exactly, or a weight whose module holds quantization state other than an FP8 pair's own
    ``weight_scale_inv`` and input scale. ``plan``: adapted key → indices into ``paths``, the adapters (for the
    message)."""
    layout = ckpt.quantization
    understood = set(layout.scales.values()) | set(layout.input_scales) if layout else set()
    siblings: dict[str, list[str]] = {}
    for name in ckpt.weight_map:
        module, _, leaf = name.rpartition(".")
        siblings.setdefault(module, []).append(leaf)
    source_of = {key: paths[ids[0]] for key, ids in plan.items()}
    for key in plan:
        if layout is not None and key in layout.unpaired:
            raise QuantizedBaseError(f"{source_of[key]}: targets {key!r}, an fp8 weight of {ckpt.root} that "
                                     f"{layout.unpaired[key]}: it cannot be dequantized exactly")
        module, _, leaf = key.rpartition(".")
        if _QUANT_LEAF.search(leaf):
            raise QuantizedBaseError(f"{source_of[key]}: targets {key!r}, which holds quantization state (scales, "
                                     f"zero points or packed ints) in the base at {ckpt.root}, not a weight; a merge "
                                     "never writes into it: target the module's weight in the unquantized base")
        odd = [f"{module}.{s}" for s in siblings.get(module, ()) if s != leaf and _QUANT_LEAF.search(s)
               and f"{module}.{s}" not in understood]
        if odd:
            raise QuantizedBaseError(
                f"{ckpt.root}: {key!r} (targeted by {source_of[key]}) comes with {odd[0]!r}, quantization state this "
                "tool does not understand (a quantized base with its quantization_config missing?); merging would "
                "leave it stale: merge into the unquantized base, then quantize the result")


def check_output_dtype(ckpt: Checkpoint, out_dtype: torch.dtype | None) -> None:
    """Before writing: with ``--dtype`` (a plain checkpoint out) every fp8 tensor of the base is one we dequantize
    exactly (an fp8 base's paired weights; never the raw codes of a base without a quantization_config)."""
    layout = ckpt.quantization
    fp8 = [k for k in ckpt.weight_map if ckpt.info(k).dtype.startswith("F8_")]
    if layout is None:
        if out_dtype is not None and fp8:
            raise QuantizedBaseError(f"{ckpt.root}: {fp8[0]!r} is {ckpt.info(fp8[0]).dtype} but config.json has no "
                                     "quantization_config saying how to dequantize it; --dtype cannot convert it: "
                                     "merge with --dtype keep")
        return
    if out_dtype is not None and layout.unpaired:
        key = next(iter(layout.unpaired))
        raise QuantizedBaseError(f"{ckpt.root}: --dtype {str(out_dtype).removeprefix('torch.')} writes a plain "
                                 f"checkpoint, but the fp8 tensor {key!r} {layout.unpaired[key]}: merge with "
                                 "--dtype keep")
