"""Train RandLoRA from a plain torch loop, without PEFT, and save it in the randlora format.

A tiny Llama is built in code (no downloads); the task is to continue arithmetic token sequences. After training,
the saved file is loaded into a fresh copy of the base with ``load_into`` and must give the same logits.

Run: python examples/train_torch_loop.py [--steps N] [--out FILE]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from randlora_io.train import RandloraConfig, load_into
from randlora_io.train import attach


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def batches(steps: int, batch: int = 8, length: int = 32, vocab: int = 64):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=gen)
        stride = torch.randint(1, 4, (batch, 1), generator=gen)
        yield (start + stride * torch.arange(length)) % vocab


def example_args() -> argparse.Namespace:
    """--steps N and --out FILE, shared by both training examples."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()) / "adapter.randlora.safetensors")
    return parser.parse_args()


def main() -> None:
    args = example_args()

    model = tiny_llama()
    handle = attach(model, RandloraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    print(f"trainable parameters: {handle.trainable_parameters():,} "
          f"(the base has {sum(p.numel() for p in model.parameters()):,})")
    optimizer = torch.optim.AdamW(handle.parameters(), lr=5e-3)
    model.train()
    for step, ids in enumerate(batches(args.steps), 1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 20 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    model.eval()
    handle.save(args.out)
    print(f"saved {args.out} ({args.out.stat().st_size:,} bytes)")

    ids = next(batches(1))
    fresh = tiny_llama().eval()
    load_into(fresh, args.out, check_fingerprint=True)
    with torch.no_grad():
        same = torch.allclose(fresh(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    print("reloaded adapter gives the trained logits:", same)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
