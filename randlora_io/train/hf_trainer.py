"""``RandloraTrainer``: ``transformers.Trainer`` whose checkpoints hold the adapter, not the whole model.

A checkpoint dir gets ``adapter.randlora.safetensors`` (λ, γ and the header: rank, alpha, generator, bases checksum,
base fingerprint) beside what Trainer itself writes there (optimizer, scheduler, RNG and trainer state), so
``train(resume_from_checkpoint=...)`` continues exactly; the best-model reload reads the same file.
Usage: ``RandloraTrainer(handle=attach(model, config), model=model, args=..., train_dataset=...)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from ..errors import SourceFormatError
from .handle import AttachHandle

ADAPTER_FILE = "adapter.randlora.safetensors"


class RandloraTrainer(Trainer):
    """``Trainer`` for a model with RandLoRA attached (``handle``): saves and resumes the adapter only."""

    def __init__(self, *args, handle: AttachHandle, **kwargs):
        self.randlora_handle = handle
        super().__init__(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.randlora_handle.save(Path(output_dir) / ADAPTER_FILE, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_adapter(self, checkpoint: str | os.PathLike) -> None:
        path = Path(checkpoint) / ADAPTER_FILE
        if not path.is_file():
            raise SourceFormatError(f"{checkpoint}: no {ADAPTER_FILE} in this checkpoint; RandloraTrainer resumes "
                                    "only from checkpoints it wrote")
        self.randlora_handle.load_scales(path)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_adapter(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_adapter(self.state.best_model_checkpoint)
