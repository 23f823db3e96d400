"""End to end, offline: a tiny Llama built in code, a PEFT RandLoRA adapter on it, converted to a randlora file
(40x+ smaller), inspected, validated, merged by streaming into the checkpoint, and checked against PEFT's own merge.

Run: python examples/quickstart.py [WORKDIR]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel, RandLoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def cli(*args) -> None:
    print("$ randlora-io", *args, flush=True)
    subprocess.run([sys.executable, "-m", "randlora_io", *map(str, args)], check=True)


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="randlora-quickstart-"))
    base, peft_dir, ours, merged = work / "base", work / "peft-adapter", work / "adapter.safetensors", work / "merged"
    tiny_llama().save_pretrained(base)

    config = RandLoraConfig(r=32, randlora_alpha=64, projection_prng_key=1234, save_projection=True,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(tiny_llama(), config)
    with torch.no_grad():  # pretend we trained: random non-zero scales
        for name, p in peft_model.named_parameters():
            if "randlora_" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(peft_dir)

    cli("convert", peft_dir, ours, "--to", "randlora", "--base", base)
    cli("inspect", ours)
    cli("validate", ours)
    cli("merge", base, ours, "-o", merged)

    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = PeftModel.from_pretrained(tiny_llama(), peft_dir).merge_and_unload()(input_ids=ids).logits
        ours_logits = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
    peft_bytes = sum(f.stat().st_size for f in peft_dir.iterdir())
    diff = (ours_logits - reference).abs().max().item()
    print(f"PEFT dir {peft_bytes:,} B -> randlora file {ours.stat().st_size:,} B "
          f"({peft_bytes / ours.stat().st_size:.0f}x smaller)")
    print(f"max |logits(merged by randlora-io) - logits(PEFT merge_and_unload)| = {diff:.2e}")
    assert diff < 1e-4, "merged model disagrees with PEFT"
    print(f"ok: outputs in {work}")


if __name__ == "__main__":
    main()
