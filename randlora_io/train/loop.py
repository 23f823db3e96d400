"""``randlora-io train``: fine-tune a local causal LM with RandLoRA on a local file and write the randlora file.

AdamW on λ, γ with gradient accumulation, an LR schedule with warmup, gradient clipping, autocast (bf16 / fp16),
gradient checkpointing, a held-out eval split, resumable checkpoints every N steps, and plain-line logs.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from ..checkpoint.atomic import check_output_path
from ..errors import OutputExistsError, SourceFormatError
from ..progress import progress_bar
from .attach import AttachHandle, attach
from .config import RandloraConfig
from .data import Examples, load_examples
from .run_state import DataOrder, load_checkpoint, save_checkpoint

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainOptions:
    """How to train. ``steps``: optimizer steps (each of ``grad_accum`` batches of ``batch_size``); ``epochs``, when
    given, sets the steps from the number of training examples instead. ``precision``: autocast dtype (λ, γ stay
    float32). ``device``: auto (cuda when available), cpu, cuda or cuda:N. ``eval_split``: fraction of the examples
    held out for an eval loss (every ``eval_every`` steps and at the end). ``save_every``: write a resumable
    checkpoint to ``checkpoint_dir`` (default ``<out>.checkpoints``); ``resume``: a checkpoint dir to continue."""

    lr: float = 5e-3
    steps: int = 100
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    warmup_steps: int = 0
    schedule: str = "constant"
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    device: str = "auto"
    gradient_checkpointing: bool = False
    eval_split: float = 0.0
    eval_every: int = 0
    save_every: int = 0
    checkpoint_dir: Path | None = None
    resume: Path | None = None
    packing: bool = True
    log_every: int = 10
    tensorboard_dir: Path | None = None

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SourceFormatError(f"lr must be a positive number, got {self.lr}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.seq_len < 2:
            raise SourceFormatError("steps, batch size and grad accumulation must be ≥ 1 and seq-len ≥ 2")
        if self.epochs is not None and not self.epochs > 0:
            raise SourceFormatError(f"epochs must be positive, got {self.epochs}")
        if self.schedule not in SCHEDULES:
            raise SourceFormatError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise SourceFormatError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0 <= self.eval_split < 1:
            raise SourceFormatError(f"eval split must be in [0, 1), got {self.eval_split}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            self.max_grad_norm = None   # 0 turns clipping off


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; an unavailable cuda is refused. Under torchrun, ``cuda`` means
    this process's GPU (``cuda:LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SourceFormatError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@dataclass
class _Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @classmethod
    def start(cls, device: torch.device) -> _Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        owns = not torch.distributed.is_initialized()
        if owns:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size(), owns)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()


@dataclass
class TrainReport:
    out: Path
    steps: int
    trainable_params: int
    loss_before: float          # mean loss on a fixed evaluation batch before training
    loss_after: float           # the same after training
    losses: list[float] = field(default_factory=list)   # training loss per step
    handle: AttachHandle | None = None
    eval_loss: float | None = None       # on the held-out split, at the end
    checkpoints: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"trained {self.steps} steps on {self.trainable_params:,} parameters; "
                f"loss {self.loss_before:.4f} → {self.loss_after:.4f}")
        return text + (f"; eval loss {self.eval_loss:.4f}" if self.eval_loss is not None else "")


def load_causal_lm(base: str | os.PathLike):
    """(model, tokenizer or None) from a local HF dir, in the checkpoint's dtype; clear errors for bad dirs."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # transformers is an extra, not a runtime dependency
        raise SourceFormatError("randlora-io train needs transformers: pip install 'randlora-io[train]'") from exc
    from ..checkpoint.directory import open_checkpoint

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


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _mean_loss(model, examples: Examples, batch_size: int, device: torch.device, precision: str) -> float:
    """Mean loss over ``examples`` (token-weighted), without gradients, in eval mode."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad(), _autocast(device, precision):
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in examples.batch(torch.arange(start, min(start + batch_size,
                                                                                       len(examples)))).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


def _tensorboard(directory: Path | None):
    """A SummaryWriter for ``directory``, or None; a missing tensorboard package is one clear error."""
    if directory is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SourceFormatError(f"--tensorboard {directory}: needs the tensorboard package: pip install "
                                "tensorboard") from None
    return SummaryWriter(log_dir=str(directory))


def _schedule(optimizer, options: TrainOptions, steps: int):
    warmup = options.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if options.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if options.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_causal_lm(
    base: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: RandloraConfig | None = None,
    options: TrainOptions | None = None,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    **overrides,
) -> TrainReport:
    """Attach RandLoRA to the causal LM in ``base``, train λ, γ with AdamW on the causal-LM loss over ``data``, and
    write the randlora file ``out``. ``options`` (or keyword ``overrides`` of its fields: ``lr=``, ``steps=``, ...)
    say how; ``log`` receives one plain line per ``log_every`` steps, eval and checkpoint (the CLI prints them when
    stderr is not a terminal). The trained model stays attached in ``report.handle``."""
    unknown = set(overrides) - {f.name for f in fields(TrainOptions)}
    if unknown:
        raise TypeError(f"unknown training options: {', '.join(sorted(unknown))}")
    options = replace(options or TrainOptions(), **overrides)
    out = Path(out)
    check_output_path(out, [base, data])  # never over (or inside) the base model or the training data
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: output exists; pass --overwrite to replace it")
    config = config or RandloraConfig()
    device = resolve_device(options.device)
    dist = _Distributed.start(device)
    try:
        return _train(base, data, out, config, options, device, dist, progress and dist.rank == 0,
                      log if log is not None and dist.rank == 0 else (lambda line: None))
    finally:
        dist.close()


def _train(base, data, out: Path, config: RandloraConfig, options: TrainOptions, device: torch.device,
           dist: _Distributed, progress: bool, log: Callable[[str], None]) -> TrainReport:
    """The loop of :func:`train_causal_lm`. Under torchrun (DDP) every rank draws the same global batch of
    ``batch_size × world`` examples and trains on its slice; rank 0 logs and writes."""
    board = _tensorboard(options.tensorboard_dir) if dist.rank == 0 else None
    model, tokenizer = load_causal_lm(base)
    vocab = model.get_input_embeddings().num_embeddings
    examples = load_examples(data, options.seq_len, vocab, tokenizer, packing=options.packing)
    train_set, eval_set = examples.split(options.eval_split, config.seed)
    steps = options.steps
    if options.epochs is not None:
        per_step = options.batch_size * options.grad_accum * dist.world
        steps = max(1, math.ceil(options.epochs * len(train_set) / per_step))
    torch.manual_seed(config.seed)
    model.to(device)
    handle = attach(model, config)
    forward = model
    if options.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise SourceFormatError(f"{base}: {type(model).__name__} does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if dist.world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    probe = eval_set if eval_set is not None else train_set.subset(torch.arange(min(len(train_set), 8)))
    loss_before = _mean_loss(model, probe, options.batch_size, device, options.precision)
    optimizer = torch.optim.AdamW(handle.parameters(), lr=options.lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, options, steps)
    scaler = torch.amp.GradScaler(device.type) if options.precision == "fp16" else None
    order, step = DataOrder.start(len(train_set), config.seed), 0
    if options.resume is not None:
        step, order = load_checkpoint(options.resume, handle, optimizer, scheduler, len(train_set), scaler)
        log(f"resumed from {options.resume} at step {step}")
    checkpoint_dir = options.checkpoint_dir or out.with_name(out.name + ".checkpoints")
    report = TrainReport(out=out, steps=steps, trainable_params=handle.trainable_parameters(),
                         loss_before=loss_before, loss_after=float("nan"), handle=handle)
    model.train()
    bar = progress_bar(progress, total=steps, initial=step, desc="train", unit="step")
    with bar:
        while step < steps:
            loss_sum = 0.0
            for _ in range(options.grad_accum):
                index = order.next_batch(options.batch_size * dist.world).chunk(dist.world)[dist.rank]
                batch = {k: v.to(device) for k, v in train_set.batch(index).items()}
                with _autocast(device, options.precision):
                    loss = forward(**batch).loss
                if not torch.isfinite(loss):
                    raise SourceFormatError(f"loss became {float(loss)} at step {step + 1}; lower --lr")
                loss = loss / options.grad_accum
                (scaler.scale(loss) if scaler is not None else loss).backward()
                loss_sum += loss.detach().item()
            if scaler is not None:
                scaler.unscale_(optimizer)
            if options.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(handle.parameters(), options.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            report.losses.append(loss_sum)
            bar.update(1)
            recent = report.losses[-options.log_every:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            if board is not None:
                board.add_scalar("train/loss", loss_sum, step)
                board.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            if step % options.log_every == 0 or step == steps:
                log(f"step {step}/{steps} loss {sum(recent) / len(recent):.4f} lr {scheduler.get_last_lr()[0]:.3g}")
            if eval_set is not None and options.eval_every and step % options.eval_every == 0 and step < steps:
                eval_loss = _mean_loss(model, eval_set, options.batch_size, device, options.precision)
                log(f"step {step}/{steps} eval loss {eval_loss:.4f}")
                if board is not None:
                    board.add_scalar("eval/loss", eval_loss, step)
            if options.save_every and step % options.save_every == 0 and step < steps:
                if dist.rank == 0:
                    path = save_checkpoint(checkpoint_dir, step, handle, optimizer, scheduler, order, scaler)
                    report.checkpoints.append(path)
                    log(f"step {step}/{steps} checkpoint {path}")
                dist.barrier()
    model.eval()
    report.loss_after = _mean_loss(model, probe, options.batch_size, device, options.precision)
    if eval_set is not None:
        report.eval_loss = report.loss_after
        log(f"step {step}/{steps} eval loss {report.eval_loss:.4f}")
        if board is not None:
            board.add_scalar("eval/loss", report.eval_loss, step)
    if board is not None:
        board.close()
    handle.save(out)      # rank 0 writes
    dist.barrier()
    return report
