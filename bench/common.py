"""Shared helpers for the benchmarks: run a worker in its own process and read its wall time and peak RSS."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM of its own address space. (getrusage's ru_maxrss is carried across
    fork + exec on Linux, so a worker would inherit the peak of the process that spawned it.)"""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report_self(**extra) -> None:
    """Print this process's peak RSS (MiB) as one JSON line; workers call it last."""
    peak = peak_rss_mib()
    print(json.dumps({"peak_rss_mib": peak, **extra}), flush=True)


def run_worker(script: str, *args: str) -> dict:
    """Run ``python script --worker args`` and return its JSON line plus the wall time seen from outside."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def machine_line() -> str:
    """One line naming the CPU model, its core count, torch's version and thread count: timings move with the
    machine (the project's CI machines are not all the same CPU), so every bench output says where it ran."""
    import os
    import platform

    import torch

    model = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"cpu: {model}, {os.cpu_count()} cores; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bench_args(choices: dict[str, tuple[str, ...]] | None = None, lists: dict[str, tuple[str, ...]] | None = None,
               **int_options: int) -> argparse.Namespace:
    """``--worker`` / ``--workdir`` (every bench script runs its sides as workers) plus ``--name value`` integer
    options with the given defaults (underscores become dashes); ``choices``: ``--name`` taking one of the given
    strings (the first is the default); ``lists``: ``--name a,b`` taking a comma-separated subset (default: all)."""
    p = argparse.ArgumentParser()
    p.add_argument("--worker")
    p.add_argument("--workdir")
    for name, default in int_options.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    for name, allowed in (choices or {}).items():
        p.add_argument(f"--{name.replace('_', '-')}", choices=allowed, default=allowed[0])
    for name, allowed in (lists or {}).items():
        def subset(text: str, allowed: tuple[str, ...] = allowed) -> list[str]:
            items = [item for item in text.split(",") if item]
            unknown = sorted(set(items) - set(allowed))
            if unknown or not items:
                raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)} (got {text!r})")
            return items
        p.add_argument(f"--{name.replace('_', '-')}", type=subset, default=list(allowed))
    return p.parse_args()


def start_checkpoint(work: Path, config) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """``work/base`` created holding ``config`` (a transformers config, saved as config.json), and the shapes of the
    state dict of the causal LM it builds (on the meta device, nothing allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    base = work / "base"
    base.mkdir(parents=True)
    config.save_pretrained(base)
    return base, shapes


def dir_bytes(path: Path, pattern: str) -> int:
    """Total size of the files in ``path`` matching ``pattern`` (0 when ``path`` does not exist)."""
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file()) if path.is_dir() else 0


def write_safetensors_streaming(path: Path, shapes: dict[str, tuple[int, ...]], make) -> None:
    """Write a bf16 ``.safetensors`` file tensor by tensor: ``make(key)`` returns each bf16 tensor of
    ``shapes[key]`` when its turn comes, so a multi-GB shard never sits in memory whole (``save_file`` would)."""
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, shape in shapes.items():
            tensor = make(key)
            assert tensor.dtype == torch.bfloat16 and tuple(tensor.shape) == tuple(shape), key
            f.write(memoryview(tensor.contiguous().view(torch.int16).numpy()).cast("B"))


@contextlib.contextmanager
def workdir(given: str | None, prefix: str) -> Iterator[Path]:
    """``given`` as a Path (kept afterwards), or a fresh temp dir removed at the end."""
    if given:
        yield Path(given)
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
