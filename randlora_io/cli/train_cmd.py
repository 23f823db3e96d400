"""``randlora-io train``."""

from __future__ import annotations

from pathlib import Path

import click

from .errors import handle_errors


@click.command("train")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="The randlora file to write.")
@click.option("--r", "rank", type=click.IntRange(min=1), default=8, show_default=True, help="Rank of each basis.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), help="Scaling numerator (default 20·r).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-3, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Seed of the bases, the data order and dropout.")
@click.option("--targets", default="all-linear", show_default=True,
              help="Comma-separated module names (q_proj,v_proj) or all-linear.")
@click.option("--generator", type=click.Choice(["philox", "peft"]), default="philox", show_default=True)
@click.option("--kind", type=click.Choice(["dense", "sparse", "very_sparse"]), default="dense", show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@handle_errors
def train_command(base, data, out, rank, alpha, lr, steps, batch_size, seq_len, seed, targets, generator, kind,
                  dropout, overwrite):
    """Fine-tune the causal LM in BASE on DATA (JSONL input_ids / text, or plain text) and write a randlora file."""
    from ..train.config import ALL_LINEAR, RandloraConfig
    from ..train.loop import train_causal_lm

    names = ALL_LINEAR if targets.strip() == ALL_LINEAR else [t.strip() for t in targets.split(",") if t.strip()]
    config = RandloraConfig(r=rank, alpha=alpha, target_modules=names, generator=generator, kind=kind, seed=seed,
                            dropout=dropout)
    report = train_causal_lm(base, data, out, config=config, lr=lr, steps=steps, batch_size=batch_size,
                             seq_len=seq_len, overwrite=overwrite, progress=True)
    click.echo(f"{out}: {report.summary()}")


COMMANDS = [train_command]
