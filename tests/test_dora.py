"""DoRA (PEFT LoRA with use_dora=True): merge equals PEFT's merge_and_unload (Linear and GPT-2 Conv1D); the fast
in-place rescale equals its float64 reference; conversions refuse it (its update is not a ΔW)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_cli
from tiny_models import tiny_gpt2, tiny_llama
from randlora_io.merge.dora import dora_merge_, dora_reference


def _dora(model, targets, fan_in_fan_out=False, seed=5):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False,
                        fan_in_fan_out=fan_in_fan_out)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as if trained: A, B and the magnitude all moved away from their init
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
    return peft_model


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_dora_merge_equals_its_reference(fan_in_fan_out):
    gen = torch.Generator().manual_seed(0)
    W, D = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen) * 0.1
    m = torch.rand(5 if fan_in_fan_out else 7, generator=gen) + 0.5
    merged = W.clone()
    dora_merge_(merged, D, m, fan_in_fan_out)
    torch.testing.assert_close(merged.double(), dora_reference(W, D, m, fan_in_fan_out), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("build,targets,fan", [
    (lambda: tiny_llama(hidden=32, intermediate=48, layers=1, vocab=64), ["q_proj", "k_proj", "down_proj"], False),
    (tiny_gpt2, ["c_attn", "c_proj"], True),
    (lambda: tiny_llama(hidden=32, intermediate=48, layers=1, vocab=64, dtype=torch.bfloat16), ["q_proj", "up_proj"],
     False),
], ids=["llama-linear", "gpt2-conv1d", "llama-bf16"])
def test_dora_merge_equals_peft(tmp_path, build, targets, fan):
    """fp32 within 1e-5; bf16 within one bf16 rounding of PEFT's (we round the float32 result once)."""
    build().save_pretrained(tmp_path / "base")
    peft_model = _dora(build(), targets, fan_in_fan_out=fan)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    before = load_file(str(tmp_path / "base" / "model.safetensors"))
    targeted = [k for k in merged if any(f".{t}.weight" in k for t in targets)]
    assert targeted
    for key in targeted:
        assert not torch.equal(merged[key], before[key]), key
        if merged[key].dtype == torch.bfloat16:
            torch.testing.assert_close(merged[key].float(), expected[key].float(), rtol=2**-8, atol=0, msg=key)
        else:
            torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_dora_convert_is_refused_with_the_reason(tmp_path):
    build = lambda: tiny_llama(hidden=32, intermediate=48, layers=1, vocab=64)  # noqa: E731
    build().save_pretrained(tmp_path / "base")
    _dora(build(), ["q_proj"]).save_pretrained(tmp_path / "adapter")
    for to in ("dense", "randlora"):
        result = run_cli("convert", tmp_path / "adapter", tmp_path / f"out-{to}", "--to", to, "--rank", "4",
                         "--base", tmp_path / "base", check=False)
        assert_one_line_error(result, "DoRA", "not a ΔW", "merge it")
        assert not (tmp_path / f"out-{to}").exists()


def test_weighted_dora_merge_is_refused(tmp_path):
    build = lambda: tiny_llama(hidden=32, intermediate=48, layers=1, vocab=64)  # noqa: E731
    build().save_pretrained(tmp_path / "base")
    _dora(build(), ["q_proj"]).save_pretrained(tmp_path / "adapter")
    result = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", "--weight", "2",
                     check=False)
    assert_one_line_error(result, "DoRA", "weight 2")
    assert not (tmp_path / "out").exists()


def test_dora_with_trained_head_and_biases_merges_like_peft(tmp_path):
    """A DoRA SEQ_CLS adapter with bias="lora_only": rescaled weights, replaced head and biases, all as PEFT."""
    from peft import LoraConfig, get_peft_model

    from tiny_models import randomize_trainable, tiny_bert_classifier

    tiny_bert_classifier().save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", bias="lora_only",
                        use_dora=True)
    peft_model = get_peft_model(tiny_bert_classifier(), config)
    with torch.no_grad():  # a positive magnitude near ‖W‖ (random signs would flip rows), the rest random
        magnitudes = {n: p.clone() for n, p in peft_model.named_parameters() if "lora_magnitude_vector" in n}
        randomize_trainable(peft_model)
        for name, p in peft_model.named_parameters():
            if name in magnitudes:
                p.copy_(magnitudes[name] * 1.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6, msg=key)
