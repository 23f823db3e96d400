"""``randlora-io train``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .errors import handle_errors


@click.command("train")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="The randlora file to write.")
@click.option("--r", "--basis-rank", "rank", type=click.IntRange(min=1), default=8, show_default=True,
              help="Rank of each basis (--basis-rank under torchrun, which takes --r for its own options).")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), help="Scaling numerator (default 20·r).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-3, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="Optimizer steps.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True),
              help="Passes over the training examples (sets the steps instead of --steps).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batches per optimizer step (gradient accumulation).")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--schedule", type=click.Choice(["constant", "linear", "cosine"]), default="constant",
              show_default=True, help="LR schedule after the warmup.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--max-grad-norm", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Clip the gradient norm of λ, γ (0: no clipping).")
@click.option("--precision", "--dtype", "precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              show_default=True, help="Autocast dtype of the forward (λ, γ stay float32).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when available), cpu, cuda, cuda:N.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option("--eval-split", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Fraction of the examples held out for an eval loss.")
@click.option("--eval-every", type=click.IntRange(min=0), default=0, help="Eval loss every N steps (and at the end).")
@click.option("--save-every", type=click.IntRange(min=0), default=0,
              help="Write a resumable checkpoint every N steps to --checkpoint-dir.")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), help="Default: OUT.checkpoints")
@click.option("--resume", type=click.Path(path_type=Path), help="A checkpoint dir (step-N) to continue from.")
@click.option("--no-packing", is_flag=True, help="One example per row (padded) instead of packed blocks.")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(path_type=Path),
              help="Also log loss, LR and eval loss to this TensorBoard dir (needs tensorboard).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Seed of the bases, the data order and dropout.")
@click.option("--targets", default="all-linear", show_default=True,
              help="Comma-separated module names (q_proj,v_proj) or all-linear.")
@click.option("--generator", type=click.Choice(["philox", "peft"]), default="philox", show_default=True)
@click.option("--kind", type=click.Choice(["dense", "sparse", "very_sparse"]), default="dense", show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--method", type=click.Choice(["randlora", "vera"]), default="randlora", show_default=True,
              help="vera: train VeRA's λ_b, λ_d on shared bases (no --alpha; --r is the shared rank).")
@click.option("--d-initial", type=float, default=0.1, show_default=True, help="VeRA's initial λ_d.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@handle_errors
def train_command(base, data, out, rank, alpha, lr, steps, epochs, batch_size, grad_accum, seq_len, schedule,
                  warmup_steps, max_grad_norm, precision, device, gradient_checkpointing, eval_split, eval_every,
                  save_every, checkpoint_dir, resume, no_packing, log_every, tensorboard_dir, seed, targets, generator,
                  kind, dropout, method, d_initial, overwrite):
    """Fine-tune the causal LM in BASE on DATA (JSONL input_ids / text / prompt+completion / messages, or plain
    text) and write a randlora file. Progress: a bar on a terminal, plain log lines otherwise. Under
    ``torchrun --nproc-per-node N -m randlora_io train ...`` it trains with DDP, --batch-size per process."""
    from ..train.config import ALL_LINEAR, RandloraConfig
    from ..train.loop import TrainOptions, train_causal_lm

    names = ALL_LINEAR if targets.strip() == ALL_LINEAR else [t.strip() for t in targets.split(",") if t.strip()]
    config = RandloraConfig(r=rank, alpha=alpha, target_modules=names, generator=generator, kind=kind, seed=seed,
                            dropout=dropout, method=method, d_initial=d_initial)
    options = TrainOptions(lr=lr, steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                           seq_len=seq_len, warmup_steps=warmup_steps, schedule=schedule,
                           max_grad_norm=max_grad_norm, precision=precision, device=device,
                           gradient_checkpointing=gradient_checkpointing, eval_split=eval_split,
                           eval_every=eval_every, save_every=save_every, checkpoint_dir=checkpoint_dir,
                           resume=resume, packing=not no_packing, log_every=log_every,
                           tensorboard_dir=tensorboard_dir)
    plain = not sys.stdout.isatty()
    report = train_causal_lm(base, data, out, config=config, options=options, overwrite=overwrite,
                             progress=not plain, log=click.echo if plain else None)
    if int(os.environ.get("RANK", "0")) == 0:   # under torchrun, one summary for the job
        click.echo(f"{out}: {report.summary()}")


COMMANDS = [train_command]
