"""Merge into an FP8 block-quantized checkpoint (#28): randlora-io into the fp8 layout (requantized, ``--dtype keep``)
and straight to a plain bf16 checkpoint (``--dtype bfloat16``), against the dequantize-to-bf16-then-merge path
(transformers' CPU loader dequantizes the fp8 checkpoint, ``save_pretrained`` writes bf16, then our merge into that),
each step in its own process: wall time, peak RSS, bytes written; min / median over ``--repeat`` runs.

The checkpoint is Llama-shaped (h 2048, i 5632, kv 512, vocab 32000, ``--layers`` layers, default 4), every
projection quantized in 128 × 128 blocks by ``randlora_io.checkpoint.fp8_blocks.quantize``, embeddings, norms and
lm_head bf16, in shards of ≤ 200 MiB; the adapter is a dense RandLoRA file, r ``--rank`` on all 7 projections.

Run: python bench/bench_merge_fp8.py [--layers L] [--rank R] [--repeat N] [--workdir DIR]
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
from bench_merge_cpu import build_adapters  # noqa: E402
from common import bench_args, dir_bytes, machine_line, report_self, run_worker, workdir  # noqa: E402
from common import start_checkpoint  # noqa: E402

SIDES = {"fp8": "ours into fp8 (requantized, --dtype keep)", "fp8-bf16": "ours fp8 -> bf16 (--dtype bfloat16)",
         "dequant": "transformers dequantize + save bf16", "bf16": "  then ours into that bf16 checkpoint"}
SHARD_BYTES = 200 * 2**20


def build(work: Path, layers: int, rank: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from randlora_io.checkpoint.fp8_blocks import quantize

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False, dtype="bfloat16")
    config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                  "activation_scheme": "dynamic", "modules_to_not_convert": ["lm_head"]}
    base, shapes = start_checkpoint(work, config)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, shape in shapes.items():
        w = torch.randn(shape, generator=gen) * 0.02
        if key.endswith("proj.weight"):
            codes, scale = quantize(w, (128, 128))
            part = {key: codes, key.removesuffix(".weight") + ".weight_scale_inv": scale}
        else:
            part = {key: w.to(torch.bfloat16)}
        nbytes = sum(t.numel() * t.element_size() for t in part.values())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1].update(part)
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(base / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = dir_bytes(base, "*.safetensors")
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    print(f"built {total / 2**20:.0f} MiB fp8 checkpoint in {len(shards)} shards ({layers} layers, blocks 128x128)")
    build_adapters(work, {k: s for k, s in shapes.items() if k.endswith("proj.weight")}, rank, ["dense"])


def worker(side: str, work: Path) -> None:
    out = work / f"out-{side}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if side == "dequant":
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(work / "base")  # CPU: dequantized to bf16 nn.Linear
        assert next(model.parameters()).dtype == torch.bfloat16
        model.save_pretrained(out, max_shard_size="400MB")
    else:
        from randlora_io.merge.plan import merge

        base = work / ("out-dequant" if side == "bf16" else "base")
        merge(base, [work / "adapter-dense.safetensors"], out, device="cpu",
              dtype="bfloat16" if side == "fp8-bf16" else "keep")
    inner = time.perf_counter() - start
    report_self(inner_s=inner, bytes_out=dir_bytes(out, "*"))
    if side != "dequant":
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    args = bench_args(layers=4, rank=32, repeat=3)
    if args.worker == "build":
        return build(Path(args.workdir), args.layers, args.rank)
    if args.worker:
        return worker(args.worker, Path(args.workdir))
    with workdir(args.workdir, "bench-fp8-") as work:
        if not (work / "base" / "config.json").exists():
            subprocess.run([sys.executable, __file__, "--worker", "build", "--workdir", str(work), "--layers",
                            str(args.layers), "--rank", str(args.rank)], check=True)
        print(machine_line())
        walls: dict[str, list[float]] = {}
        rss: dict[str, list[float]] = {}
        for run in range(1, args.repeat + 1):  # the sides alternate within each run
            print(f"run {run}/{args.repeat}")
            for side in SIDES:
                r = run_worker(__file__, side, "--workdir", str(work))
                walls.setdefault(side, []).append(r["wall_s"])
                rss.setdefault(side, []).append(r["peak_rss_mib"])
                print(f"{SIDES[side]:<44} wall {r['wall_s']:6.1f} s  peak RSS {r['peak_rss_mib']:6.0f} MiB  "
                      f"wrote {r['bytes_out'] / 2**20:6.0f} MiB")
            shutil.rmtree(work / "out-dequant", ignore_errors=True)
        walls["dequant+bf16"] = [a + b for a, b in zip(walls["dequant"], walls["bf16"])]
        rss["dequant+bf16"] = [max(a, b) for a, b in zip(rss["dequant"], rss["bf16"])]
        print(f"over {args.repeat} runs, min / median (the two-step path: wall summed, RSS the larger step):")
        for side in ("fp8", "fp8-bf16", "dequant+bf16"):
            w, m = sorted(walls[side]), sorted(rss[side])
            print(f"{side:<14} wall {w[0]:6.1f} / {statistics.median(w):6.1f} s   peak RSS {m[0]:6.0f} / "
                  f"{statistics.median(m):6.0f} MiB")
        fp8, two = statistics.median(walls["fp8"]), statistics.median(walls["dequant+bf16"])
        print(f"median speed-up of the fp8 merge over dequantize-then-merge: {two / fp8:.2f}x")


if __name__ == "__main__":
    main()
