"""ΔW on tied parameters the checkpoint stores once (sources/ties.py ``fold_tied_deltas``): PEFT wraps each tied
module on its own and ``merge_and_unload`` adds every wrapper's ΔW into the one shared tensor; OUT holds the same
tensor (the old code refused "another architecture?" for the second layer of a shared block, and a LoRA on a tied
lm_head)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from tiny_models import randomize_trainable, tiny_tied_llama

IDS = torch.arange(8).view(1, -1)


def _zamba2():
    from transformers import Zamba2Config, Zamba2ForCausalLM

    torch.manual_seed(0)
    config = Zamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, attention_head_dim=16, mamba_d_state=8, mamba_headdim=8,
                          n_mamba_heads=8, mamba_ngroups=1, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
                          num_mem_blocks=1, use_shared_attention_adapter=False, adapter_rank=4, intermediate_size=48,
                          use_mem_rope=False)
    return Zamba2ForCausalLM(config).eval()


def _adapter(model, method, targets):
    from peft import LoraConfig, RandLoraConfig, get_peft_model

    config = (LoraConfig(r=4, target_modules=targets, init_lora_weights=False) if method == "lora"
              else RandLoraConfig(r=8, target_modules=targets, init_weights=False))
    return randomize_trainable(get_peft_model(model, config))


@pytest.mark.parametrize("build, targets, shared", [
    (_zamba2, ["q_proj", "o_proj"], "model.layers.1.shared_transformer.self_attn.q_proj.weight"),
    (tiny_tied_llama, ["lm_head", "q_proj"], "model.embed_tokens.weight"),
])
@pytest.mark.parametrize("method", ["lora", "randlora"])
def test_tied_parameters_merge_like_peft(tmp_path, build, targets, shared, method):
    build().save_pretrained(tmp_path / "base")
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    peft_model = _adapter(build(), method, targets)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_by_peft = peft_model.merge_and_unload()
    with torch.no_grad():
        expected_logits = merged_by_peft(IDS).logits
    expected = dict(merged_by_peft.state_dict())
    result = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")
    assert f"shares its weight with {shared!r} in the base (tied)" in result.stderr, result.stderr
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(merged) == set(base)
    assert not torch.equal(merged[shared], base[shared])
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-5, msg=key)
    loaded = type(build()).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected_logits, rtol=1e-4, atol=1e-5)
