"""Shared helpers for the benchmarks: run a worker in its own process and read its wall time and peak RSS."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


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
