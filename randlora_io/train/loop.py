"""``randlora-io train``: fine-tune a local causal LM with RandLoRA on a local file and write the randlora file."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import OutputExistsError, SourceFormatError
from ..progress import progress_bar
from .attach import AttachHandle, attach
from .config import RandloraConfig
from .data import load_blocks


@dataclass
class TrainReport:
    out: Path
    steps: int
    trainable_params: int
    loss_before: float          # mean loss on a fixed evaluation batch before training
    loss_after: float           # the same after training
    losses: list[float] = field(default_factory=list)   # training loss per step
    handle: AttachHandle | None = None

    def summary(self) -> str:
        return (f"trained {self.steps} steps on {self.trainable_params:,} parameters; "
                f"loss {self.loss_before:.4f} → {self.loss_after:.4f}")


def load_causal_lm(base: str | os.PathLike):
    """(model, tokenizer or None) from a local HF dir, in the checkpoint's dtype; clear errors for bad dirs."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # transformers is an extra, not a runtime dependency
        raise SourceFormatError("randlora-io train needs transformers: pip install 'randlora-io[train]'") from exc
    from ..checkpoint import open_checkpoint

    base = Path(base)
    if not (base / "config.json").is_file():
        raise SourceFormatError(f"{base}: not a Hugging Face model dir (no config.json)")
    open_checkpoint(base)  # validates the weights (shards, index, headers) before transformers reads them
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # keep logs and the one-line error contract clean
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tokenizer = None
    if any((base / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(base)
    return model, tokenizer


def _mean_loss(model, batch: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(model(input_ids=batch, labels=batch).loss)
    model.train(was_training)
    return loss


def train_causal_lm(
    base: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: RandloraConfig | None = None,
    lr: float = 5e-3,
    steps: int = 100,
    batch_size: int = 4,
    seq_len: int = 256,
    overwrite: bool = False,
    progress: bool = False,
) -> TrainReport:
    """Attach RandLoRA to the causal LM in ``base``, train λ, γ with AdamW on the causal-LM loss over blocks of
    ``data``, and write the randlora file ``out``. The trained model stays attached in ``report.handle``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: output exists; pass --overwrite to replace it")
    if steps < 1 or batch_size < 1 or seq_len < 2 or not (lr > 0 and math.isfinite(lr)):
        raise SourceFormatError("steps and batch size must be ≥ 1, seq-len ≥ 2 and lr a positive number")
    config = config or RandloraConfig()
    model, tokenizer = load_causal_lm(base)
    vocab = model.get_input_embeddings().num_embeddings
    blocks = load_blocks(data, seq_len, vocab, tokenizer)
    torch.manual_seed(config.seed)
    handle = attach(model, config)
    eval_batch = blocks[: min(len(blocks), 8)]
    loss_before = _mean_loss(model, eval_batch)
    optimizer = torch.optim.AdamW(handle.parameters(), lr=lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(config.seed)
    perm, cursor, losses = torch.randperm(len(blocks), generator=order), 0, []
    model.train()
    bar = progress_bar(progress, total=steps, desc="train", unit="step")
    for _ in range(steps):
        if cursor + batch_size > len(perm):
            perm, cursor = torch.randperm(len(blocks), generator=order), 0
        idx = perm[cursor: cursor + batch_size] if batch_size <= len(perm) else perm.repeat(
            -(-batch_size // len(perm)))[:batch_size]
        cursor += batch_size
        batch = blocks[idx]
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise SourceFormatError(f"loss became {float(loss)} at step {len(losses) + 1}; lower --lr")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    bar.close()
    model.eval()
    loss_after = _mean_loss(model, eval_batch)
    handle.save(out)
    return TrainReport(out=out, steps=steps, trainable_params=handle.trainable_parameters(), loss_before=loss_before,
                       loss_after=loss_after, losses=losses, handle=handle)
