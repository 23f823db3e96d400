"""GPU merge of one layer: the Triton kernel vs bare ``torch.addmm_`` of the same (M × K × D) GEMM vs PEFT's merge,
and a 7B-shaped full-model live swap.

For each bf16 weight shape and rank: the kernel in its default ``split`` precision (bf16 tensor-core limbs) with B drawn
in the kernel (native philox generator) and with B loaded from the shared bases, the kernel in each other precision
(``bf16`` one MMA, ``tf32x3``, ``tf32``, ``ieee``) with B loaded, bare ``addmm_`` of bf16 B (M, K) and S (K, D) into
the bf16 weight (the compute bound), and PEFT RandLoRA's ``merge()`` of an ``nn.Linear`` of that shape. Prints the
median time of each, its throughput (2·M·K·D FLOP), the ratios the issue sets goals for (kernel ≥ 0.8× bare GEMM
throughput, ≥ 3× faster than PEFT), the peak extra device memory of each (goal ≤ 64 MiB a layer for the kernel) and
each precision's error against a float64 ΔW (the first call of each also autotunes; the warm-up absorbs it).
Then ``apply_adapter`` + ``remove_adapter`` of a RandLoRA adapter on a 7B-shaped bf16 model (32 layers × q, k, v, o
4096², gate, up 11008×4096, down 4096×11008), goal < 1 s for both on an H100/H200.

Run on a GPU: python bench/bench_merge_gpu.py          (--no-model skips the 7B part, --repeats N)
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
    from randlora_io.format.basis import generate_bases
    from randlora_io.format.delta import scaled_A
    from randlora_io.kernels.merge_triton import PRECISIONS, merge_layer_reference_, merge_layer_triton_
    from randlora_io.format.spec import GeneratorSpec, LayerSpec, num_bases

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

    # each precision's error on ΔW itself: the kernel adds into a zero float32 weight, compared with a float64 ΔW
    exact = (bases.B[:M, :K].double() @ scaled_A(lam, bases.A[:, :D], gam).double())
    exact = exact if in_f == D else exact.T
    for precision in PRECISIONS:
        got = merge_layer_triton_(torch.zeros(out_f, in_f, device=device), layer, lam, gam, bases.A, bases.B, 1.0,
                                  precision=precision)
        print(f"{'':<21}accuracy vs float64, {precision:<7}: max |error| / max |dW| = "
              f"{float((got.double() - exact).abs().max() / exact.abs().max()):.2e}")
    del exact

    rows = {
        "kernel, B drawn in-kernel": timed(lambda: merge_layer_triton_(weight, layer, lam, gam, bases.A, None, 1e-3, gen),
                                           device, repeats),
        "kernel, B loaded": timed(lambda: merge_layer_triton_(weight, layer, lam, gam, bases.A, bases.B, 1e-3),
                                  device, repeats),
    }
    for precision in PRECISIONS:
        if precision != "split":
            rows[f"kernel ({precision}), B from memory"] = timed(
                lambda p=precision: merge_layer_triton_(weight, layer, lam, gam, bases.A, bases.B, 1e-3, precision=p),
                device, repeats)
    rows["bare addmm_ (bf16)"] = timed(lambda: w_md.addmm_(B16, S16, alpha=1e-3), device, repeats)
    rows["PEFT merge"] = timed(peft_merge, device, repeats)
    return rows, 2.0 * M * K * D


def llama_7b_shapes(hidden: int = 4096, intermediate: int = 11008, layers: int = 32) -> dict[str, tuple[int, int]]:
    """Weight key → (out, in) of every projection of a Llama-7B-shaped model."""
    shapes = {}
    for i in range(layers):
        for name, shape in [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                            ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (intermediate, hidden)), ("mlp.up_proj", (intermediate, hidden)),
                            ("mlp.down_proj", (hidden, intermediate))]:
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    return shapes


def bench_model_swap(shapes: dict[str, tuple[int, int]], r: int, device: torch.device, repeats: int) -> None:
    """``apply_adapter`` + ``remove_adapter`` of a philox RandLoRA adapter on all projections of a bf16 model made of
    bare ``nn.Linear`` layers of ``shapes``: median seconds of each, peak extra device memory, exact restore check."""
    from randlora_io import apply_adapter, build_adapter, remove_adapter
    from randlora_io.format.spec import GeneratorSpec, num_bases

    model = torch.nn.Module()
    for key, (out_f, in_f) in shapes.items():
        lin = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, std=0.02)
        model.add_module(key.removesuffix(".weight").replace(".", "_"), lin)
    # the module names above flatten the dots; the adapter is keyed by the model's own state-dict keys
    keys = list(model.state_dict())
    g = torch.Generator().manual_seed(0)
    layers, lambdas, gammas = {}, {}, {}
    for key, (out_f, in_f) in zip(keys, shapes.values()):
        n = num_bases(min(out_f, in_f), r)
        layers[key] = ((out_f, in_f), False)
        lambdas[key] = torch.randn(r, n, generator=g) * 0.1
        gammas[key] = torch.randn(n, min(out_f, in_f), generator=g) * 0.1
    adapter = build_adapter(generator=GeneratorSpec(name="philox", kind="dense", seed=7), rank=r, alpha=2.0 * r,
                            layers=layers, lambdas=lambdas, gammas=gammas, checksum=False)
    adapter.bases(device, verify=False)      # generate the shared bases once, outside the timing
    params = sum(t.numel() for t in model.state_dict().values())
    originals = [t.detach().clone() for t in model.parameters()]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    apply_adapter(model, adapter)            # warm-up: compiles and autotunes the kernel for each distinct shape
    remove_adapter(model, adapter)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    applies, removes = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        apply_adapter(model, adapter)
        sync()
        applies.append(time.perf_counter() - start)
        start = time.perf_counter()
        remove_adapter(model, adapter)
        sync()
        removes.append(time.perf_counter() - start)
    extra = ((torch.cuda.max_memory_allocated(device) - before) / 2**30) if device.type == "cuda" else float("nan")
    exact = all(torch.equal(t.detach(), o) for t, o in zip(model.parameters(), originals))
    a, b = statistics.median(applies), statistics.median(removes)
    print(f"full model: {len(shapes)} bf16 weights, {params / 1e9:.2f} B params, r = {r}: apply {a:.3f} s, "
          f"remove {b:.3f} s, apply + remove {a + b:.3f} s (goal < 1 s); peak extra {extra:.2f} GiB "
          f"(backups for an exact remove); restored bit for bit: {exact}; philox dense bases (24-bit values: the split "
          "path's 6-MMA variant; PEFT's bf16 bases take 3)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-model", action="store_true", help="skip the 7B-shaped full-model apply + remove")
    args = p.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes, ranks = (SMOKE_SHAPES, SMOKE_RANKS) if args.smoke else (SHAPES, RANKS)
    repeats = 1 if args.smoke else args.repeats
    name = "CPU (Triton interpreter; times are not meaningful)" if args.smoke else torch.cuda.get_device_name(device)
    print(f"device: {name}; torch {torch.__version__}; bf16 weights; median of {repeats}")
    print(f"{'W (out x in)':<14}{'r':>5}  {'method':<31}{'ms':>9}{'TFLOP/s':>9}{'extra MiB':>11}")
    for out_f, in_f in shapes:
        for r in ranks:
            rows, flop = bench_layer(out_f, in_f, r, device, repeats)
            for method, (sec, extra) in rows.items():
                print(f"{f'{out_f}x{in_f}':<14}{r:>5}  {method:<31}{sec * 1e3:9.3f}{flop / sec / 1e12:9.2f}{extra:11.1f}")
            kernel = rows["kernel, B drawn in-kernel"][0]
            print(f"{'':<21}kernel throughput / bare GEMM: {rows['bare addmm_ (bf16)'][0] / kernel:.2f}x   "
                  f"speed-up vs PEFT: {rows['PEFT merge'][0] / kernel:.2f}x")
    if not args.no_model:
        model_shapes = llama_7b_shapes(64, 96, 2) if args.smoke else llama_7b_shapes()
        bench_model_swap(model_shapes, 4 if args.smoke else 32, device, repeats)


if __name__ == "__main__":
    main()
