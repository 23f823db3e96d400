"""Conversion speed on a Llama-1B-shaped RandLoRA adapter (h=2048, i=5632, kv=256, 22 layers, 7 projections):
PEFT dir → randlora and randlora → dense, next to PEFT's own load + save of the same adapter; each in its own process.

Run: python bench/bench_convert.py [--layers 22 --rank 32]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_TARGETS as TARGETS  # noqa: E402
from common import bench_args, machine_line, report_self, run_worker, workdir  # noqa: E402


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)


def meta_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in LlamaForCausalLM(llama_config(layers)).state_dict().items()}


def build(work: Path, layers: int, rank: int) -> None:
    import torch

    from randlora_io.format.adapter import build_adapter
    from randlora_io.convert.peft_randlora import adapter_to_peft_randlora
    from randlora_io.format.spec import GeneratorSpec, num_bases

    shapes = meta_shapes(layers)
    gen = torch.Generator().manual_seed(0)
    targets = {k: (s, False) for k, s in shapes.items() if any(f".{t}." in k for t in TARGETS)}
    lambdas = {k: torch.randn(rank, num_bases(min(s), rank), generator=gen) for k, (s, _) in targets.items()}
    gammas = {k: torch.randn(num_bases(min(s), rank), min(s), generator=gen) for k, (s, _) in targets.items()}
    adapter = build_adapter(generator=GeneratorSpec(name="peft", kind="dense", seed=3, draw_dtype="bfloat16"),
                            rank=rank, alpha=2.0 * rank, layers=targets, lambdas=lambdas, gammas=gammas)
    adapter_to_peft_randlora(adapter, work / "peft")


def worker(kind: str, work: Path, layers: int) -> None:
    start = time.perf_counter()
    if kind == "peft_to_randlora":
        from randlora_io.format.adapter import write_adapter
        from randlora_io.sources.peft_randlora import peft_randlora_to_adapter

        write_adapter(peft_randlora_to_adapter(work / "peft", meta_shapes(layers)), work / "a.safetensors")
    elif kind == "randlora_to_dense":
        from randlora_io.convert.run import convert

        convert(work / "a.safetensors", work / "dense.safetensors", "dense")
    else:
        import torch
        from peft import PeftModel
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config(layers))
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        PeftModel.from_pretrained(model, work / "peft").save_pretrained(work / "peft-resaved")
    report_self(inner_s=time.perf_counter() - start)


def main() -> None:
    args = bench_args(layers=22, rank=32)
    if args.worker:
        return worker(args.worker, Path(args.workdir), args.layers)
    with workdir(args.workdir, "bench-convert-") as work:
        print(machine_line())
        build(work, args.layers, args.rank)
        common = ("--workdir", str(work), "--layers", str(args.layers))
        rows = [("PEFT load + save (reference)", run_worker(__file__, "peft_load_save", *common)),
                ("PEFT dir -> randlora", run_worker(__file__, "peft_to_randlora", *common)),
                ("randlora -> dense", run_worker(__file__, "randlora_to_dense", *common))]
        size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        print(f"Llama-1B-shaped adapter: {args.layers} layers x 7 projections, r={args.rank}; "
              f"PEFT dir {size(work / 'peft') / 2**20:.2f} MiB, randlora file "
              f"{size(work / 'a.safetensors') / 2**20:.2f} MiB, dense {size(work / 'dense.safetensors') / 2**20:.0f} MiB")
        ref = rows[0][1]["wall_s"]
        for name, r in rows:
            print(f"{name:<30} wall {r['wall_s']:6.1f} s  peak RSS {r['peak_rss_mib']:6.0f} MiB  "
                  f"({ref / r['wall_s']:.2f}x PEFT load+save speed)")


if __name__ == "__main__":
    main()
