"""A VeRA adapter (our file, SPEC §2.1) → a PEFT VeRA dir that ``PeftModel.from_pretrained`` loads with the same ΔW.

The read side (PEFT dir → adapter) is :mod:`randlora_io.sources.peft_vera`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection

import torch

from ..errors import SourceFormatError
from ..format.vera_file import VeraAdapter
from ..sources.peft_dir import PEFT_PREFIX, PeftExtras
from ..sources.peft_vera import PEFT_TYPE, SHARED_A, SHARED_B
from .peft_dir import write_peft_dir


def adapter_to_peft_vera(adapter: VeraAdapter, dst: str | os.PathLike, *, save_projection: bool = False,
                         overwrite: bool = False, extras: PeftExtras | None = None,
                         model_dtypes: Collection[torch.dtype] | None = None,
                         on_note: Callable[[str], None] | None = None) -> None:
    """Write ``adapter`` as a PEFT VeRA dir: ``vera_lambda_b`` (out,) / ``vera_lambda_d`` (r,) per module, and with
    ``save_projection`` the shared ``base_model.vera_A`` (r, max_in) / ``vera_B`` (max_out, r), float32.

    PEFT regenerates only the ``peft`` generator's float32 draw, and rounds it to the dtype of the model it loads
    onto: the bases are saved whatever ``save_projection`` says for a philox or stored-bases adapter, and for one
    whose ``cast_dtype`` records a half cast (loaded onto a float32 model, PEFT would not round them) or an explicit
    ``float32`` (its bases used unrounded on a half model, from projections PEFT saved). An adapter with no cast is
    reproduced by regenerated bases only on a float32 model: with ``model_dtypes`` (the targeted base weights'
    dtypes) holding a half dtype they are saved too; unknown (None), a note says so. ``target_modules`` are the full module names, so PEFT adapts exactly these layers and sizes its
    bases as the file does.
    """
    header = adapter.header
    gen = header.generator
    half_model = model_dtypes is not None and any(d in (torch.bfloat16, torch.float16) for d in model_dtypes)
    # cast_dtype "float32" (not absent): the bases were used unrounded on a half model (saved by PEFT)
    must_save = gen.name != "peft" or adapter.stored is not None or gen.cast_dtype is not None or half_model
    if not (save_projection or must_save) and model_dtypes is None and on_note is not None:
        on_note(f"{dst}: PEFT regenerates vera_A / vera_B from projection_prng_key and rounds them to a bfloat16 / "
                "float16 model's dtype, which this adapter does not (its bases are used in float32): the dir is exact "
                "on a float32 model; pass --save-projection (or --base) for a half-precision one")
    save_projection = save_projection or must_save
    if any(not k.endswith(".weight") for k in header.layers):
        raise SourceFormatError(f"{adapter.source}: layer keys must end in '.weight' to map onto PEFT modules")
    modules = {key.removesuffix(".weight"): key for key in header.layers}
    base = header.base_model or {}
    config = {
        "peft_type": PEFT_TYPE, "task_type": None, "r": header.rank,
        "projection_prng_key": header.seed if gen.name == "peft" else 0,
        "save_projection": save_projection, "vera_dropout": 0.0, "d_initial": 0.1,
        # PEFT sets it per layer type on load and saves the last layer's: write that one
        "fan_in_fan_out": list(header.layers.values())[-1].fan_in_fan_out,
        "target_modules": sorted(modules), "bias": "none", "init_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "base_model_name_or_path": base.get("id"), "revision": base.get("revision"),
    }
    tensors: dict[str, torch.Tensor] = {}
    for module, key in modules.items():
        tensors[f"{PEFT_PREFIX}{module}.vera_lambda_b"] = adapter.lambda_b[key].float()
        tensors[f"{PEFT_PREFIX}{module}.vera_lambda_d"] = adapter.lambda_d[key].float()
    if save_projection:
        bases = adapter.bases()
        tensors[SHARED_A], tensors[SHARED_B] = bases.A.float().clone(), bases.B.float().clone()
    write_peft_dir(dst, config, tensors, overwrite=overwrite, extras=extras)
