"""Writing a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``), atomically.

The read side (and the names of the files and keys) is :mod:`randlora_io.sources.peft_dir`.
"""

from __future__ import annotations

import json
import os

import torch

from ..checkpoint.atomic import atomic_directory
from ..errors import SourceFormatError
from ..sources.peft_dir import _OWN_BIAS, CONFIG_FILE, WEIGHTS_FILE, PeftExtras


def write_peft_dir(dst: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor], overwrite: bool = False,
                   extras: PeftExtras | None = None) -> None:
    """Write a PEFT dir atomically (built beside ``dst``, renamed last), with the source dir's ``extras`` (trained
    head and biases) if any; ``bias="<method>_only"`` is renamed for this dir's ``peft_type``."""
    from safetensors.torch import save_file

    if extras is not None:
        config = {**config, **extras.config}
        if str(config.get("bias", "")).endswith("_only"):
            config["bias"] = _OWN_BIAS.get(config.get("peft_type"), config["bias"])
        clash = sorted(set(tensors) & set(extras.tensors))
        if clash:
            raise SourceFormatError(f"{dst}: {clash[0]!r} is both an adapter tensor and a trained base tensor")
        tensors = {**tensors, **extras.tensors}

    with atomic_directory(dst, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt"})
