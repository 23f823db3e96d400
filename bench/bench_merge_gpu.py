"""GPU merge of one layer: the Triton kernel vs bare ``torch.addmm_`` of the same (M × K × D) GEMM vs PEFT's merge.

For each bf16 weight shape and rank: the kernel with B drawn in the kernel (native philox generator) and with B loaded
from the shared bases, bare ``addmm_`` of bf16 B (M, K) and S (K, D) into the bf16 weight (the compute bound), and
PEFT RandLoRA's ``merge()`` of an ``nn.Linear`` of that shape. Prints the median time of each, its throughput
(2·M·K·D FLOP), the ratios the issue sets goals for (kernel ≥ 0.8× bare GEMM throughput, ≥ 3× faster than PEFT) and
the peak extra device memory of each (goal ≤ 64 MiB per layer for the kernel).

Run on a GPU: python bench/bench_merge_gpu.py
Smoke run on CPU (Triton interpreter, tiny shapes, times meaningless): TRITON_INTERPRET=1 python bench/bench_merge_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
RANKS = [32, 128]
SMOKE_SHAPES, SMOKE_RANKS = [(40, 24), (24, 40)], [4]


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up, and its peak extra device memory (MiB,
    NaN on CPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    extra = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync()
        extra = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), extra


def peft_linear(out_f: int, in_f: int, r: int, device: torch.device):
    """A PEFT RandLoRA model around one bf16 ``nn.Linear(in_f, out_f)`` with non-zero λ, γ; returns its layer."""
    from peft import RandLoraConfig, get_peft_model

    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(in_f, out_f, bias=False))
    model = get_peft_model(model.to(device, torch.bfloat16), RandLoraConfig(r=r, target_modules=["lin"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "randlora_lambda" in name or "randlora_gamma" in name:
                p.normal_(0, 0.1)
    return model.base_model.model.lin


def bench_layer(out_f: int, in_f: int, r: int, device: torch.device,
                repeats: int) -> tuple[dict[str, tuple[float, float]], float]:
    """{method: (median s, peak extra MiB)} for one bf16 layer, and the GEMM's FLOP count 2·M·K·D."""
    from randlora_io.basis import generate_bases
    from randlora_io.delta import scaled_A
    from randlora_io.kernels.merge_triton import merge_layer_reference_, merge_layer_triton_
    from randlora_io.spec import GeneratorSpec, LayerSpec, num_bases

    D, M = min(out_f, in_f), max(out_f, in_f)
    n = num_bases(D, r)
    K = r * n
    layer = LayerSpec(key="lin.weight", shape=(out_f, in_f), fan_in_fan_out=False, num_bases=n)
    gen = GeneratorSpec(name="philox", kind="dense", seed=11)
    bases = generate_bases(gen, r, D, M, device)
    lam = torch.randn(r, n, device=device) * 0.1
    gam = torch.randn(n, D, device=device) * 0.1
    weight = torch.randn(out_f, in_f, device=device).to(torch.bfloat16)
    B16 = bases.B[:M, :K].to(torch.bfloat16)
    S16 = scaled_A(lam, bases.A[:, :D], gam).to(torch.bfloat16)
    w_md = weight if in_f == D else weight.T
    peft_layer = peft_linear(out_f, in_f, r, device)

    # before timing: the kernel's result on this device against the torch reference (both round once to bf16)
    got = merge_layer_triton_(weight.clone(), layer, lam, gam, bases.A, None, 1.0, gen).float()
    want = merge_layer_reference_(weight.clone(), layer, lam, gam, bases.A, bases.B, 1.0).float()
    ulp = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    print(f"{f'{out_f}x{in_f}':<14}{r:>5}  check: max |kernel - reference| / (bf16 eps * |W|) = "
          f"{float(((got - want).abs() / ulp).max()):.2f}")

    def peft_merge():
        peft_layer.merge()
        peft_layer.merged_adapters.clear()  # merge again next time (the weight accumulates, as the kernel's does)

    return {
        "kernel, B drawn in-kernel": timed(lambda: merge_layer_triton_(weight, layer, lam, gam, bases.A, None, 1e-3, gen),
                                           device, repeats),
        "kernel, B loaded": timed(lambda: merge_layer_triton_(weight, layer, lam, gam, bases.A, bases.B, 1e-3),
                                  device, repeats),
        "bare addmm_ (bf16)": timed(lambda: w_md.addmm_(B16, S16, alpha=1e-3), device, repeats),
        "PEFT merge": timed(peft_merge, device, repeats),
    }, 2.0 * M * K * D


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes, ranks = (SMOKE_SHAPES, SMOKE_RANKS) if args.smoke else (SHAPES, RANKS)
    repeats = 1 if args.smoke else args.repeats
    name = "CPU (Triton interpreter; times are not meaningful)" if args.smoke else torch.cuda.get_device_name(device)
    print(f"device: {name}; torch {torch.__version__}; bf16 weights; median of {repeats}")
    print(f"{'W (out x in)':<14}{'r':>5}  {'method':<27}{'ms':>9}{'TFLOP/s':>9}{'extra MiB':>11}")
    for out_f, in_f in shapes:
        for r in ranks:
            rows, flop = bench_layer(out_f, in_f, r, device, repeats)
            for method, (sec, extra) in rows.items():
                print(f"{f'{out_f}x{in_f}':<14}{r:>5}  {method:<27}{sec * 1e3:9.3f}{flop / sec / 1e12:9.2f}{extra:11.1f}")
            kernel = rows["kernel, B drawn in-kernel"][0]
            print(f"{'':<21}kernel throughput / bare GEMM: {rows['bare addmm_ (bf16)'][0] / kernel:.2f}x   "
                  f"speed-up vs PEFT: {rows['PEFT merge'][0] / kernel:.2f}x")


if __name__ == "__main__":
    main()
