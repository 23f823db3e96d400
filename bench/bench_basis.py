"""Basis generation throughput (GB/s of float32 output) of both generators next to torch.rand of the same size.

Run: python bench/bench_basis.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from randlora_io.format.basis import generate_bases
from randlora_io.format.spec import GeneratorSpec, num_bases

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    print(machine_line())
    print(f"{'shape (r, min_dim, max_dim)':<30} {'generator':<22} {'MB':>8} {'s':>8} {'GB/s':>8} {'vs torch.rand':>14}")
    for r, min_dim, max_dim in [(32, 2048, 5632), (32, 4096, 11008)]:
        numel = r * min_dim + max_dim * num_bases(min_dim, r) * r
        mb = numel * 4 / 1e6
        t_rand = timed(lambda: torch.rand(numel))
        rows = [("torch.rand (reference)", t_rand)]
        for name, gen in [("philox dense", GeneratorSpec(name="philox", kind="dense", seed=1)),
                          ("philox sparse", GeneratorSpec(name="philox", kind="sparse", seed=1, threshold=715827882)),
                          ("peft dense (bf16 draw)", GeneratorSpec(name="peft", kind="dense", seed=1,
                                                                  draw_dtype="bfloat16")),
                          ("peft sparse", GeneratorSpec(name="peft", kind="sparse", seed=1, draw_dtype="float32"))]:
            rows.append((name, timed(lambda g=gen: generate_bases(g, r, min_dim, max_dim), repeats=2)))
        for name, t in rows:
            print(f"{str((r, min_dim, max_dim)):<30} {name:<22} {mb:8.1f} {t:8.3f} {mb / 1e3 / t:8.3f} "
                  f"{t_rand / t:13.2f}x")


if __name__ == "__main__":
    main()
