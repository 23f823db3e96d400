"""Dense ΔW → a PEFT LoRA dir at rank k (truncated SVD, :mod:`randlora_io.convert.lowrank`).

PEFT LoRA stores ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r); the dir written
here has ``lora_alpha = r`` (scaling 1). The read side is :mod:`randlora_io.sources.peft_lora`.
"""

from __future__ import annotations

import os

import torch

from ..errors import SourceFormatError
from ..sources.peft_dir import PEFT_PREFIX, PeftExtras
from ..sources.peft_lora import PEFT_TYPE
from .lowrank import LowRank, truncated_svd
from .peft_dir import write_peft_dir


def lora_factors(deltas: dict[str, tuple[torch.Tensor, bool]], rank: int, on_layer=None) -> dict[str, LowRank]:
    """Rank-``rank`` factors of ``{weight key: (ΔW stored, fan_in_fan_out)}``, each as (out, k) @ (k, in)."""
    results = {}
    for key, (delta, fan) in deltas.items():
        results[key] = truncated_svd(delta.T if fan else delta, rank)
        if on_layer:
            on_layer()
    return results


def write_peft_lora(
    factors: dict[str, LowRank],
    fan_in_fan_out: bool,
    dst: str | os.PathLike,
    rank: int,
    *,
    base_model: dict | None = None,
    overwrite: bool = False,
    extras: PeftExtras | None = None,
) -> None:
    """Write LoRA factors as a PEFT LoRA dir with lora_alpha = r (scaling 1), with a source PEFT dir's ``extras``
    (trained head / biases, see ``peft_dir.PeftExtras``)."""
    if any(not k.endswith(".weight") for k in factors):
        raise SourceFormatError("delta keys must end in '.weight' to map onto PEFT modules")
    tensors = {}
    for key, low in factors.items():
        module = key.removesuffix(".weight")
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = low.down.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = low.up.contiguous()
    base = base_model or {}
    config = {
        "peft_type": PEFT_TYPE, "task_type": None, "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": sorted(k.removesuffix(".weight") for k in factors), "fan_in_fan_out": fan_in_fan_out,
        "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "base_model_name_or_path": base.get("id"), "revision": base.get("revision"),
    }
    write_peft_dir(dst, config, tensors, overwrite=overwrite, extras=extras)
