"""A randlora adapter → a PEFT RandLoRA dir that ``PeftModel.from_pretrained`` loads.

The read side (PEFT dir → adapter) is :mod:`randlora_io.sources.peft_randlora`.
"""

from __future__ import annotations

import os

import torch

from ..checkpoint.lazy_tensors import peek
from ..errors import SourceFormatError
from ..format.adapter import RandloraAdapter
from ..format.basis import spec_bases_to_peft
from ..format.spec import normalisation
from ..sources.peft_dir import PEFT_PREFIX, PeftExtras
from ..sources.peft_randlora import PEFT_TYPE, SHARED_A, SHARED_B
from .peft_dir import write_peft_dir


def adapter_to_peft_randlora(
    adapter: RandloraAdapter,
    dst: str | os.PathLike,
    *,
    save_projection: bool = False,
    shared_projection_only: bool = False,
    overwrite: bool = False,
    extras: PeftExtras | None = None,
) -> None:
    """Write ``adapter`` as a PEFT RandLoRA dir that ``PeftModel.from_pretrained`` loads (with a source PEFT dir's
    ``extras``: trained head / biases).

    PEFT can regenerate only ``peft``-generator bases; for a philox adapter the bases are always saved
    (``save_projection=True``) and the philox normalisation is folded into ``randlora_alpha``. Saved bases are
    written as PEFT 0.21.2 does (``base_model.randlora_A/B`` plus a copy per layer) or, with
    ``shared_projection_only``, as later PEFT versions do (the shared pair only; PEFT 0.21.2 loads both layouts).
    ``fan_in_fan_out`` in the config is the last layer's, as PEFT saves it: PEFT sets it per layer type on load.
    """
    header = adapter.header
    # PEFT regenerates only `peft` bases, and dense ones only in the dtype of the loading machine (bf16 nearly always)
    must_save = (header.generator.name != "peft" or header.stored_bases
                 or (header.generator.kind == "dense" and header.generator.draw_dtype == "float16"))
    save_projection = save_projection or must_save
    modules = {key.removesuffix(".weight"): key for key in header.layers}
    if any(not k.endswith(".weight") for k in header.layers):
        raise SourceFormatError(f"{adapter.source}: layer keys must end in '.weight' to map onto PEFT modules")
    alpha = header.alpha * normalisation(header.generator)
    base = header.base_model or {}
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": None,
        "r": header.rank,
        "randlora_alpha": alpha,
        "randlora_dropout": 0.0,
        "projection_prng_key": header.seed if header.generator.name == "peft" else 0,
        "save_projection": save_projection,
        "sparse": header.generator.kind == "sparse",
        "very_sparse": header.generator.kind == "very_sparse",
        "fan_in_fan_out": list(header.layers.values())[-1].fan_in_fan_out,
        "target_modules": sorted(modules),
        "bias": "none",
        "init_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "base_model_name_or_path": base.get("id"),
        "revision": base.get("revision"),
    }
    tensors: dict[str, torch.Tensor] = {}
    for module, key in modules.items():
        tensors[f"{PEFT_PREFIX}{module}.randlora_lambda"] = peek(adapter.lambdas, key).float()
        tensors[f"{PEFT_PREFIX}{module}.randlora_gamma"] = peek(adapter.gammas, key).float()
    if save_projection:
        A, B = spec_bases_to_peft(adapter.bases(), header.rank)
        tensors[SHARED_A], tensors[SHARED_B] = A, B
        for module in modules if not shared_projection_only else ():
            # PEFT stores an unsliced copy per layer; safetensors refuses shared storage, hence the clones.
            tensors[f"{PEFT_PREFIX}{module}.randlora_A"] = A.clone()
            tensors[f"{PEFT_PREFIX}{module}.randlora_B"] = B.clone()
    write_peft_dir(dst, config, tensors, overwrite=overwrite, extras=extras)
