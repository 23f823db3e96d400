"""CPU merge: randlora-io's streaming merge vs PEFT (from_pretrained + PeftModel.from_pretrained + merge_and_unload +
save_pretrained), each in its own process, on a Llama-shaped bf16 checkpoint (≥ 1 GB, sharded) built here.
Prints wall time and peak RSS of each and their ratios, for the default (fp32 ΔW) merge and the opt-in
``--precision bf16`` one. Goal: ≥ 2x PEFT's speed at ≤ 1/3 of its peak RSS.

Run: python bench/bench_merge_cpu.py [--hidden 2048 --intermediate 5632 --layers 12 --rank 32 --workdir DIR]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_TARGETS as TARGETS  # noqa: E402
from common import bench_args, report_self, run_worker, workdir  # noqa: E402


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

    start = time.perf_counter()
    out = work / f"out-{kind}"
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


def main() -> None:
    args = bench_args(hidden=2048, intermediate=5632, layers=12, rank=32, shard_mb=400)
    if args.worker == "build":
        return build(Path(args.workdir), args.hidden, args.intermediate, args.layers, args.rank, args.shard_mb)
    if args.worker:
        return worker(args.worker, Path(args.workdir))
    with workdir(args.workdir, "bench-merge-") as work:
        build_cmd = ["--workdir", str(work), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
                     "--layers", str(args.layers), "--rank", str(args.rank), "--shard-mb", str(args.shard_mb)]
        subprocess.run([sys.executable, __file__, "--worker", "build", *build_cmd], check=True)  # own process
        import torch

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        ours = run_worker(__file__, "ours", "--workdir", str(work))
        peft = run_worker(__file__, "peft", "--workdir", str(work))
        fast = run_worker(__file__, "ours_bf16", "--workdir", str(work))
        rows = (("randlora-io merge (fp32 ΔW, default)", ours), ("PEFT merge_and_unload", peft),
                ("randlora-io merge --precision bf16", fast))
        for name, r in rows:
            print(f"{name:<38} wall {r['wall_s']:7.1f} s   peak RSS {r['peak_rss_mib']:7.0f} MiB")
        for name, r in (rows[0], rows[2]):
            print(f"{name:<38} speed-up vs PEFT: {peft['wall_s'] / r['wall_s']:.2f}x   "
                  f"peak RSS ratio (ours/PEFT): {r['peak_rss_mib'] / peft['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
