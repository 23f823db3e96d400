"""Export a 7B-shaped RandLoRA adapter to PEFT LoRA at an error budget (``convert --to peft-lora --max-error E``):
full float64 SVD per layer vs the randomised path (``--svd randomized``), time and peak RSS, each in its own process.

The adapter: one Llama-2-7B block (h=4096, i=11008: q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008),
r=32, philox bases, λ of basis b scaled by max(decay^b, 1e-4) (a synthetic spectrum that decays, as trained updates' do; random
λ/γ without it give a nearly flat spectrum, whose budget needs most of the rank and where the randomised path hands
over to the full SVD). 7B has 32 such blocks (224 layers): the per-block time × 32 is the extrapolation printed.
A ``delta only`` row times forming each ΔW (the part both paths share).

Run: python bench/bench_export_lora.py [--runs 3 --decay-pct 50 --max-error-pct 10 --full-runs 1]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_args, machine_line, report_self, run_worker, workdir  # noqa: E402

H, I, R = 4096, 11008, 32
SHAPES = {**{f"model.layers.0.self_attn.{p}.weight": (H, H) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
          "model.layers.0.mlp.gate_proj.weight": (I, H), "model.layers.0.mlp.up_proj.weight": (I, H),
          "model.layers.0.mlp.down_proj.weight": (H, I)}


def build(work: Path, decay: float) -> None:
    import torch

    from randlora_io.format.adapter import build_adapter, write_adapter
    from randlora_io.format.spec import GeneratorSpec, num_bases

    gen = torch.Generator().manual_seed(0)
    lambdas, gammas = {}, {}
    for key, shape in SHAPES.items():
        n = num_bases(min(shape), R)
        # floored at 1e-4: past it a basis holds < 1e-8 of the energy, and decay^b alone reaches float32 denormals
        # (0.5^127), which make every GEMM on them ~20x slower on x86
        scale = (decay ** torch.arange(n, dtype=torch.float64)).clamp_min(1e-4).float()
        lambdas[key] = torch.randn(R, n, generator=gen) * scale
        gammas[key] = torch.randn(n, min(shape), generator=gen)
    adapter = build_adapter(generator=GeneratorSpec(name="philox", kind="dense", seed=3), rank=R, alpha=2.0 * R,
                            layers={k: (s, False) for k, s in SHAPES.items()}, lambdas=lambdas, gammas=gammas)
    write_adapter(adapter, work / "a.safetensors")


def worker(kind: str, work: Path, max_error: float) -> None:
    start = time.perf_counter()
    extra = {}
    if kind == "delta":
        from randlora_io.sources.randlora_file import RandloraSource
        from randlora_io.format.adapter import read_adapter

        source = RandloraSource(read_adapter(work / "a.safetensors"))
        for key in source.keys():
            source.delta(key).double().pow(2).sum()  # what the export does besides the SVD
    else:
        from randlora_io.convert.run import convert

        report = convert(work / "a.safetensors", work / f"lora-{kind}", "peft-lora", max_error=max_error,
                         svd=kind, overwrite=True)
        extra = {"ranks": report.lora.needed, "errors": report.errors, "methods": report.lora.methods}
    report_self(inner_s=time.perf_counter() - start, **extra)


def main() -> None:
    args = bench_args(runs=3, full_runs=1, decay_pct=50, max_error_pct=10)
    max_error = args.max_error_pct / 100
    if args.worker:
        return worker(args.worker, Path(args.workdir), max_error)
    with workdir(args.workdir, "bench-export-lora-") as work:
        print(machine_line())
        build(work, args.decay_pct / 100)
        common = ("--workdir", str(work), "--max-error-pct", str(args.max_error_pct))
        rows = {"delta only": [run_worker(__file__, "delta", *common) for _ in range(args.runs)],
                "randomized": [run_worker(__file__, "randomized", *common) for _ in range(args.runs)],
                "full": [run_worker(__file__, "full", *common) for _ in range(args.full_runs)]}
        print(f"7B-shaped RandLoRA block: {len(SHAPES)} layers, r={R}, λ decay {args.decay_pct / 100} per basis, "
              f"--max-error {max_error}")
        for key in SHAPES:
            fast, ref = rows["randomized"][0], rows["full"][0]
            print(f"  {key:<38} {SHAPES[key][0]:>5}x{SHAPES[key][1]:<5}  rank {fast['ranks'][key]:>4} "
                  f"({fast['methods'][key]}) / {ref['ranks'][key]:>4} (full)  "
                  f"error {fast['errors'][key]:.4f} / {ref['errors'][key]:.4f}")
        for name, runs in rows.items():
            walls = [r["wall_s"] for r in runs]
            print(f"{name:<12} wall min {min(walls):6.1f} s  median {statistics.median(walls):6.1f} s  "
                  f"({len(runs)} run{'s' * (len(runs) > 1)})  peak RSS {max(r['peak_rss_mib'] for r in runs):6.0f} "
                  f"MiB  → 224 layers (32 blocks) ≈ {32 * statistics.median(walls) / 60:5.1f} min")


if __name__ == "__main__":
    main()
