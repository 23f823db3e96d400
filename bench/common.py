"""Shared helpers for the benchmarks: run a worker in its own process and read its wall time and peak RSS."""

from __future__ import annotations

import argparse
import contextlib
import json
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


def bench_args(**int_options: int) -> argparse.Namespace:
    """``--worker`` / ``--workdir`` (every bench script runs its sides as workers) plus ``--name value`` integer
    options with the given defaults (underscores become dashes)."""
    p = argparse.ArgumentParser()
    p.add_argument("--worker")
    p.add_argument("--workdir")
    for name, default in int_options.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    return p.parse_args()


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
