"""One layer's ``W += s·B @ S`` by each CPU merge path, at real layer shapes: the float32 ``addmm_`` (the reference),
the int8 limbs, the grouped sparse product (very sparse bases) and the opt-in bf16 GEMM; min time of ``--repeat``
runs (the paths alternate), and the error against float64 relative to the float32 GEMM's own.

Bases as PEFT draws them for a model-wide min_dim (density 1/3 for sparse, 1/√min_dim for very_sparse; ±1 here, the
paths do not depend on the constant); λ, γ random. Shapes (M, D): a 1B model's 5632 × 2048 (min_dim 5632 as PEFT
sizes it, so very_sparse density 1/75) and a 7B model's 11008 × 4096 (min_dim 11008, density 1/105).

Run: python bench/bench_merge_paths.py [--repeat 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from common import machine_line  # noqa: E402

from randlora_io.format.delta import scaled_A  # noqa: E402
from randlora_io.merge.layer import Workspace, _addmm_bf16_  # noqa: E402
from randlora_io.merge.ternary import add_ternary_int8_, add_ternary_sparse_, ternary_basis  # noqa: E402

SHAPES = {"1b": (5632, 2048, 5632), "7b": (11008, 4096, 11008)}  # (M, D, model-wide min_dim)


def ternary(shape: tuple[int, int], density: float, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=gen)
    return (u > 1 - density / 2).float() - (u < density / 2).float()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"{'shape':<6} {'bases':<20} {'fp32 addmm':>11} {'int8 limbs':>11} {'sparse':>9} {'bf16':>8}   "
          "error vs float64 / the fp32 GEMM's (int8, sparse)")
    gen = torch.Generator().manual_seed(0)
    r = 32
    for name, (M, D, min_dim) in SHAPES.items():
        n = math.ceil(D / r)
        for kind, density in (("sparse", 1 / 3), ("very_sparse", 1 / math.sqrt(min_dim))):
            B = ternary((M, r * n), density, gen)
            A = ternary((r, D), density, gen)
            lam, gam = torch.randn(r, n, generator=gen) * 0.01, torch.randn(n, D, generator=gen) * 0.01
            S = scaled_A(lam, A, gam)
            W = torch.randn(M, D, generator=gen) * 0.02
            basis = ternary_basis(B)
            ws = Workspace()
            paths = {
                "fp32": lambda w: w.addmm_(B, S, alpha=0.5),
                "int8": lambda w: add_ternary_int8_(w, basis, S, 0.5, ws),
                "sparse": lambda w: add_ternary_sparse_(w, basis, lam, A, gam, 0.5),
                "bf16": lambda w: _addmm_bf16_(w, B, S, 0.5, ws),
            }
            if density > 1 / 28:
                paths.pop("sparse")  # auto never takes it there (its cost grows with density²·K)
            times = {k: math.inf for k in paths}
            results = {}
            for _ in range(args.repeat):
                for key, fn in paths.items():
                    w = W.clone()
                    start = time.perf_counter()
                    fn(w)
                    times[key] = min(times[key], time.perf_counter() - start)
                    results[key] = w
            exact = W.double() + 0.5 * (B.double() @ S.double())
            err = {k: float((v.double() - exact).norm() / (exact - W.double()).norm()) for k, v in results.items()}
            ms = {k: f"{1e3 * times[k]:.0f} ms" if k in times else "-" for k in ("fp32", "int8", "sparse", "bf16")}
            rel = ", ".join(f"{k} {err[k] / err['fp32']:.2f}x" for k in ("int8", "sparse") if k in err)
            label = f"{kind} (1/{round(1 / density)})"
            print(f"{name:<6} {label:<20} {ms['fp32']:>11} {ms['int8']:>11} {ms['sparse']:>9} {ms['bf16']:>8}   "
                  f"fp32 {err['fp32']:.1e}; {rel}; bf16 {err['bf16']:.1e}", flush=True)


if __name__ == "__main__":
    main()
