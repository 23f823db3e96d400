"""CPU merge: randlora-io's streaming merge vs PEFT (from_pretrained + PeftModel.from_pretrained + merge_and_unload +
save_pretrained), each in its own process, on a Llama-shaped bf16 checkpoint (≥ 1 GB, sharded) built here.
Prints wall time and peak RSS of each and their ratios, for the default (fp32 ΔW) merge and the opt-in
``--precision bf16`` one. Goal: ≥ 2x PEFT's speed at ≤ 1/3 of its peak RSS.

Run: python bench/bench_merge_cpu.py [--hidden 2048 --intermediate 5632 --layers 12 --rank 32 --repeat N
     --workdir DIR]
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_TARGETS as TARGETS  # noqa: E402
from common import bench_args, machine_line, report_self, run_worker, workdir  # noqa: E402


def build(work: Path, hidden: int, intermediate: int, layers: int, rank: int, shard_mb: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from randlora_io.adapter import build_adapter, write_adapter
    from randlora_io.converters.peft_randlora import adapter_to_peft_randlora
    from randlora_io.spec import GeneratorSpec, num_bases

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         vocab_size=32000, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    base = work / "base"
    base.mkdir(parents=True)
    config.save_pretrained(base)
    gen = torch.Generator().manual_seed(0)
    shard, shard_bytes, weight_map, index = {}, 0, {}, 0
    names = list(shapes)

    def flush():
        nonlocal shard, shard_bytes, index
        index += 1
        save_file(shard, str(base / f"model-{index:05d}.safetensors"), metadata={"format": "pt"})
        for k in shard:
            weight_map[k] = f"model-{index:05d}.safetensors"
        shard, shard_bytes = {}, 0

    for k in names:
        t = (torch.randn(shapes[k], generator=gen) * 0.02).to(torch.bfloat16)
        shard[k] = t
        shard_bytes += t.numel() * 2
        if shard_bytes >= shard_mb * 2**20:
            flush()
    if shard:
        flush()
    total = index
    renamed = {}
    for k, f in weight_map.items():
        i = int(f[6:11])
        renamed[k] = f"model-{i:05d}-of-{total:05d}.safetensors"
    for i in range(1, total + 1):
        (base / f"model-{i:05d}.safetensors").rename(base / f"model-{i:05d}-of-{total:05d}.safetensors")
    size = sum((base / f).stat().st_size for f in set(renamed.values()))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                   "weight_map": renamed}))

    layers_ = {k: (shapes[k], False) for k in names if any(f".{t}." in k for t in TARGETS) and k.endswith("weight")}
    lambdas, gammas = {}, {}
    for k, (s, _) in layers_.items():
        n = num_bases(min(s), rank)
        lambdas[k] = torch.randn(rank, n, generator=gen) * 0.01
        gammas[k] = torch.randn(n, min(s), generator=gen) * 0.01
    adapter = build_adapter(generator=GeneratorSpec(name="peft", kind="dense", seed=7, draw_dtype="bfloat16"),
                            rank=rank, alpha=2.0 * rank, layers=layers_, lambdas=lambdas, gammas=gammas)
    write_adapter(adapter, work / "adapter.safetensors")
    adapter_to_peft_randlora(adapter, work / "peft")
    print(f"built {size / 2**20:.0f} MiB bf16 checkpoint in {total} shards, {len(layers_)} adapted weights, r={rank}")


def worker(kind: str, work: Path) -> None:
    import torch

    out = work / f"out-{kind}"
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's output (--repeat); not timed
    start = time.perf_counter()
    if kind in ("ours", "ours_bf16"):
        from randlora_io.merge import merge

        merge(work / "base", [work / "adapter.safetensors"], out, device="cpu",
              precision="bf16" if kind == "ours_bf16" else "fp32")
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, work / "peft").merge_and_unload()
        model.save_pretrained(out, max_shard_size="400MB")
    report_self(inner_s=time.perf_counter() - start)


SIDES = (("ours", "randlora-io merge (fp32 ΔW, default)"), ("peft", "PEFT merge_and_unload"),
         ("ours_bf16", "randlora-io merge --precision bf16"))


def main() -> None:
    args = bench_args(hidden=2048, intermediate=5632, layers=12, rank=32, shard_mb=400, repeat=1)
    if args.worker == "build":
        return build(Path(args.workdir), args.hidden, args.intermediate, args.layers, args.rank, args.shard_mb)
    if args.worker:
        return worker(args.worker, Path(args.workdir))
    with workdir(args.workdir, "bench-merge-") as work:
        build_cmd = ["--workdir", str(work), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
                     "--layers", str(args.layers), "--rank", str(args.rank), "--shard-mb", str(args.shard_mb)]
        subprocess.run([sys.executable, __file__, "--worker", "build", *build_cmd], check=True)  # own process
        print(machine_line())
        ratios: dict[str, list[tuple[float, float]]] = {"ours": [], "ours_bf16": []}
        for run in range(1, args.repeat + 1):  # the sides alternate, so drift of the machine hits all of them
            if args.repeat > 1:
                print(f"run {run}/{args.repeat}")
            results = {kind: run_worker(__file__, kind, "--workdir", str(work)) for kind, _ in SIDES}
            for kind, name in SIDES:
                r = results[kind]
                print(f"{name:<38} wall {r['wall_s']:7.1f} s   peak RSS {r['peak_rss_mib']:7.0f} MiB")
            peft = results["peft"]
            for kind, name in (SIDES[0], SIDES[2]):
                r = results[kind]
                ratios[kind].append((peft["wall_s"] / r["wall_s"], r["peak_rss_mib"] / peft["peak_rss_mib"]))
                print(f"{name:<38} speed-up vs PEFT: {ratios[kind][-1][0]:.2f}x   "
                      f"peak RSS ratio (ours/PEFT): {ratios[kind][-1][1]:.2f}")
        if args.repeat > 1:
            print(f"over {args.repeat} runs (min / median / max):")
            for kind, name in (SIDES[0], SIDES[2]):
                speed, rss = (sorted(column) for column in zip(*ratios[kind]))
                print(f"{name:<38} speed-up vs PEFT {speed[0]:.2f} / {statistics.median(speed):.2f} / "
                      f"{speed[-1]:.2f}x   peak RSS ratio {rss[0]:.2f} / {statistics.median(rss):.2f} / {rss[-1]:.2f}")


if __name__ == "__main__":
    main()
