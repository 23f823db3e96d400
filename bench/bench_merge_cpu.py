"""CPU merge: randlora-io's streaming merge vs PEFT (from_pretrained + PeftModel.from_pretrained + merge_and_unload +
save_pretrained), each in its own process, on a Llama-shaped bf16 checkpoint (sharded as on the Hub) built here.

For each adapter kind (dense, sparse, very_sparse: the same λ, γ, PEFT's generator) it prints, side by side, PEFT and
each of our precisions: ``fp32`` (the float32 addmm, the reference), ``auto`` (the default fast path: CSR for very
sparse bases, int8 limbs on AMX CPUs, else fp32), ``int8`` (the integer limbs, ternary kinds) and ``bf16`` (opt-in):
wall time, peak RSS, bytes written, and the ratios to PEFT. Goals (#18): ternary ≥ 5× PEFT, dense ≥ 2×, at ≤ 0.3 of
its peak RSS.

Run: python bench/bench_merge_cpu.py [--size small|1b|7b] [--kinds dense,sparse,very_sparse]
     [--sides peft,fp32,auto,int8,bf16] [--repeat N] [--workdir DIR] [--rank 32] [--layers L]
A ``--workdir`` that already holds a build (base/ and the kinds' adapters) is reused as it is, so it must come from a
run with the same --size, --layers and --rank. ``--size 1b`` (default) is h 2048, i 5632, 12 layers (1.2 GB); ``7b`` is Llama-2-7B's shape (h 4096, i 11008, 32
layers, vocab 32000, 13.5 GB, 10 GB shards: needs ~30 GB of disk and, for PEFT, ~30 GB of RAM); ``small`` is a
seconds-long smoke run (tests/test_merge_fastpaths.py runs it).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_TARGETS as TARGETS  # noqa: E402
from common import bench_args, dir_bytes, machine_line, report_self, run_worker, workdir  # noqa: E402
from common import start_checkpoint  # noqa: E402
from common import write_safetensors_streaming  # noqa: E402

# name: (hidden, intermediate, layers, attention heads, kv heads, vocab, shard MiB)
SIZES = {
    "small": (256, 688, 2, 4, 2, 1000, 2),
    "1b": (2048, 5632, 12, 32, 8, 32000, 400),
    "7b": (4096, 11008, 32, 32, 32, 32000, 9537),  # Llama-2-7b-hf: two shards of ≤ 10 GB
}
KINDS = ("dense", "sparse", "very_sparse")
SIDES = {"peft": "PEFT merge_and_unload", "fp32": "ours --precision fp32 (reference)",
         "auto": "ours --precision auto (default path)", "int8": "ours --precision int8",
         "bf16": "ours --precision bf16"}


def build_base(work: Path, size: str, layers: int) -> dict[str, tuple[int, ...]]:
    """A random bf16 Llama checkpoint of ``size`` in ``work/base``, sharded with an index; returns its shapes."""
    import torch
    from transformers import LlamaConfig

    hidden, intermediate, n_layers, heads, kv, vocab, shard_mb = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers or n_layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    base, shapes = start_checkpoint(work, config)
    gen = torch.Generator().manual_seed(0)
    groups: list[dict[str, tuple[int, ...]]] = [{}]
    group_bytes = 0
    for k, shape in shapes.items():  # keys into shards of ≤ shard_mb, in model order, as save_pretrained does
        nbytes = 2 * math.prod(shape)
        if groups[-1] and group_bytes + nbytes > shard_mb * 2**20:
            groups.append({})
            group_bytes = 0
        groups[-1][k] = shape
        group_bytes += nbytes
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors_streaming(base / name, group,
                                    lambda k: (torch.randn(shapes[k], generator=gen) * 0.02).to(torch.bfloat16))
        weight_map.update(dict.fromkeys(group, name))
    size_bytes = dir_bytes(base, "*.safetensors")
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size_bytes},
                                                                   "weight_map": weight_map}))
    print(f"built {size_bytes / 2**20:.0f} MiB bf16 checkpoint ({size}) in {len(groups)} shards")
    return shapes


def build_adapters(work: Path, shapes: dict[str, tuple[int, ...]], rank: int, kinds: list[str]) -> None:
    """Per kind: ``adapter-KIND.safetensors`` and the equivalent PEFT dir ``peft-KIND`` (same λ, γ, PEFT's
    generator; ternary bases cast to bf16 as PEFT does on a bf16 model)."""
    import torch

    from randlora_io.format.adapter import build_adapter, write_adapter
    from randlora_io.convert.peft_randlora import adapter_to_peft_randlora
    from randlora_io.format.spec import GeneratorSpec, num_bases

    layers = {k: (s, False) for k, s in shapes.items() if any(f".{t}." in k for t in TARGETS) and k.endswith("weight")}
    gen = torch.Generator().manual_seed(1)
    lambdas, gammas = {}, {}
    for k, (s, _) in layers.items():
        n = num_bases(min(s), rank)
        lambdas[k] = torch.randn(rank, n, generator=gen) * 0.01
        gammas[k] = torch.randn(n, min(s), generator=gen) * 0.01
    for kind in kinds:
        generator = (GeneratorSpec(name="peft", kind="dense", seed=7, draw_dtype="bfloat16") if kind == "dense" else
                     GeneratorSpec(name="peft", kind=kind, seed=7, draw_dtype="float32", cast_dtype="bfloat16"))
        adapter = build_adapter(generator=generator, rank=rank, alpha=2.0 * rank, layers=layers, lambdas=lambdas,
                                gammas=gammas)
        write_adapter(adapter, work / f"adapter-{kind}.safetensors")
        adapter_to_peft_randlora(adapter, work / f"peft-{kind}")
    print(f"built {', '.join(kinds)} adapters: {len(layers)} adapted weights, r={rank}")


def auto_choice(work: Path, kind: str) -> str:
    """What ``--precision auto`` runs for this kind on this CPU (``ternary_merge.auto_path``)."""
    from randlora_io.format.adapter import read_adapter
    from randlora_io.merge.ternary import auto_path, ternary_basis

    return auto_path(ternary_basis(read_adapter(work / f"adapter-{kind}.safetensors").bases().B))


def worker(side: str, work: Path, kind: str) -> None:
    import torch

    out = work / f"out-{kind}-{side}"
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's output (--repeat); not timed
    start = time.perf_counter()
    if side == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, work / f"peft-{kind}").merge_and_unload()
        model.save_pretrained(out, max_shard_size="400MB")
    else:
        from randlora_io.merge.plan import merge

        merge(work / "base", [work / f"adapter-{kind}.safetensors"], out, device="cpu", precision=side)
    inner = time.perf_counter() - start
    report_self(inner_s=inner, bytes_out=dir_bytes(out, "*"))
    shutil.rmtree(out, ignore_errors=True)  # a 7b output is 13.5 GB: keep at most one on disk


def main() -> None:
    args = bench_args(choices={"size": ("1b", "small", "7b")}, lists={"kinds": KINDS, "sides": tuple(SIDES)},
                      rank=32, layers=0, repeat=1)
    work_arg = ["--workdir"]
    if args.worker == "build":
        shapes = build_base(Path(args.workdir), args.size, args.layers)
        return build_adapters(Path(args.workdir), shapes, args.rank, args.kinds)
    if args.worker:
        return worker(args.worker, Path(args.workdir), args.kinds[0])
    with workdir(args.workdir, "bench-merge-") as work:
        common_args = ["--size", args.size, "--layers", str(args.layers), "--rank", str(args.rank)]
        built = (work / "base" / "config.json").exists() and all(
            (work / f"adapter-{kind}.safetensors").exists() and (work / f"peft-{kind}").is_dir() for kind in args.kinds)
        if built:  # a --workdir kept from an earlier run of the same --size/--layers/--rank (a 7b build takes minutes)
            print(f"reusing the checkpoint and adapters in {work}")
        else:
            subprocess.run([sys.executable, __file__, "--worker", "build", *work_arg, str(work), *common_args,
                            "--kinds", ",".join(args.kinds)], check=True)  # own process: its RSS is not counted
        print(machine_line())
        ratios: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for run in range(1, args.repeat + 1):  # the sides alternate, so drift of the machine hits all of them
            if args.repeat > 1:
                print(f"run {run}/{args.repeat}")
            for kind in args.kinds:
                sides = [s for s in args.sides if not (s == "int8" and kind == "dense")]
                print(f"-- {kind} adapter (auto runs: {auto_choice(work, kind)})")
                results = {side: run_worker(__file__, side, *work_arg, str(work), "--kinds", kind) for side in sides}
                peft = results.get("peft")
                for side in sides:
                    r = results[side]
                    line = (f"{SIDES[side]:<38} wall {r['wall_s']:7.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                            f"wrote {r['bytes_out'] / 2**20:7.0f} MiB")
                    if peft is not None and side != "peft":
                        ratio = (peft["wall_s"] / r["wall_s"], r["peak_rss_mib"] / peft["peak_rss_mib"])
                        ratios.setdefault((kind, side), []).append(ratio)
                        line += f"  {ratio[0]:5.2f}x PEFT speed, {ratio[1]:.2f} of its RSS"
                    print(line)
        if args.repeat > 1 and ratios:
            print(f"over {args.repeat} runs (min / median / max):")
            for (kind, side), values in ratios.items():
                speed, rss = (sorted(column) for column in zip(*values))
                print(f"{kind:<12} {SIDES[side]:<38} speed-up vs PEFT {speed[0]:.2f} / {statistics.median(speed):.2f}"
                      f" / {speed[-1]:.2f}x   peak RSS ratio {rss[0]:.2f} / {statistics.median(rss):.2f} / "
                      f"{rss[-1]:.2f}")


if __name__ == "__main__":
    main()
