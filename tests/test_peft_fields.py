"""Every PEFT 0.21.2 LoraConfig / RandLoraConfig field is classified (sources/peft_fields.py), and the options
PEFT's model is not ``W + ΔW`` under are refused by name, word for word — on the old code an activated LoRA was
merged as a plain one (exit 0) and RandLoRA's bias="randlora_only" was refused as a damaged config."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import merge_refusal, run_cli
from randlora_io.sources.peft_fields import HANDLED, LORA_FIELDS, NO_EFFECT, RANDLORA_FIELDS, REFUSED, VERA_FIELDS
from tiny_models import peft_lora, randomize_trainable, tiny_llama


@pytest.mark.parametrize("config_cls, table", [("LoraConfig", LORA_FIELDS), ("RandLoraConfig", RANDLORA_FIELDS),
                                               ("VeraConfig", VERA_FIELDS)])
def test_every_field_of_the_installed_peft_is_classified(config_cls, table):
    """Fails when a PEFT upgrade adds a field nobody decided on (decide it in peft_fields.py)."""
    import peft

    names = {f.name for f in dataclasses.fields(getattr(peft, config_cls))}
    assert not names - set(table), f"unclassified {config_cls} fields: {sorted(names - set(table))}"
    assert {f.kind for f in table.values()} <= {HANDLED, NO_EFFECT, REFUSED}
    assert all(f.why for f in table.values())
    assert all(f.fix for f in table.values() if f.kind == REFUSED)


def _llama_with_bias():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, attention_bias=True, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _merges_like_peft(tmp_path, peft_model) -> dict:
    """Save ``peft_model``, merge it into ``tmp_path/base`` with the CLI, and check tensors and logits against PEFT's
    own merge; returns the merged tensors."""
    from transformers import AutoModelForCausalLM

    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.arange(10).view(1, -1)
    with torch.no_grad():
        expected_logits = peft_model(ids).logits
    expected = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-5, msg=key)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(ids).logits
    torch.testing.assert_close(got, expected_logits, rtol=1e-4, atol=1e-5)
    return merged


def test_randlora_bias_randlora_only_merges_like_peft(tmp_path):
    from peft import RandLoraConfig, get_peft_model

    _llama_with_bias().save_pretrained(tmp_path / "base")
    config = RandLoraConfig(r=8, target_modules=["q_proj", "v_proj"], bias="randlora_only", init_weights=False)
    merged = _merges_like_peft(tmp_path, randomize_trainable(get_peft_model(_llama_with_bias(), config)))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.bias"
    assert not torch.equal(merged[key], base[key])


@pytest.mark.parametrize("bias", ["vera_only", "all"])
def test_vera_trained_biases_merge_like_peft(tmp_path, bias):
    """VeRA's bias option: PEFT trains and saves the biases (of the adapted layers, or all); they replace the base's."""
    from peft import VeraConfig, get_peft_model

    _llama_with_bias().save_pretrained(tmp_path / "base")
    config = VeraConfig(r=8, target_modules=["q_proj", "v_proj"], bias=bias, save_projection=False)
    merged = _merges_like_peft(tmp_path, randomize_trainable(get_peft_model(_llama_with_bias(), config)))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    for key in ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.q_proj.weight"):
        assert not torch.equal(merged[key], base[key]), key
    changed = not torch.equal(merged["model.layers.0.self_attn.k_proj.bias"], base["model.layers.0.self_attn.k_proj.bias"])
    assert changed == (bias == "all")


def test_activated_lora_is_refused_word_for_word(tmp_path):
    """aLoRA by real PEFT: its update starts after the invocation tokens, so no merged weight is its model."""
    from peft import LoraConfig, get_peft_model

    tiny_llama().save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6],
                        init_lora_weights=False)
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "adapter")
    assert merge_refusal(tmp_path / "base", tmp_path / "adapter", tmp_path / "out") == (
        f"randlora-io: error: {tmp_path / 'adapter' / 'adapter_config.json'}: adapter_config.json "
        "alora_invocation_tokens=[5, 6]: activated LoRA applies its update only after the invocation tokens, so no "
        "merged weight equals it (PEFT refuses to merge it too); serve the adapter unmerged")


def _edited_lora(tmp_path, **fields):
    """A real PEFT LoRA dir whose adapter_config.json then gets ``fields`` (as a newer or other PEFT would write)."""
    tiny_llama().save_pretrained(tmp_path / "base")
    peft_lora(tiny_llama(), targets=["q_proj"]).save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))
    return f"randlora-io: error: {path}: adapter_config.json "


@pytest.mark.parametrize("field, value", [
    (name, value) for name, value in [
        ("use_qalora", True), ("layer_replication", [[0, 1]]), ("lora_bias", True), ("megatron_config", {"x": 1}),
        ("trainable_token_indices", [1, 2]),
        ("use_bdlora", {"blocks": 2}), ("arrow_config", {"top_k": 2}), ("kasa_config", {"beta": 1.0}),
        ("init_lora_weights", "pissa_niter_4"), ("init_lora_weights", "olora"), ("init_lora_weights", "corda"),
        ("init_lora_weights", "loftq"), ("init_lora_weights", "lora_ga"),
    ]])
def test_each_refused_option_is_named_with_its_reason(tmp_path, field, value):
    prefix = _edited_lora(tmp_path, **{field: value})
    spec = LORA_FIELDS[field]
    assert merge_refusal(tmp_path / "base", tmp_path / "adapter", tmp_path / "out") == (
        f"{prefix}{field}={value!r}: {spec.why}; {spec.fix}")


@pytest.mark.parametrize("field, value", [("init_lora_weights", "eva"), ("init_lora_weights", "orthogonal"),
                                          ("init_lora_weights", "mica"), ("init_lora_weights", "gaussian"),
                                          ("lora_dropout", 0.1), ("use_qalora", False), ("runtime_config",
                                          {"ephemeral_gpu_offload": True}), ("newer_option", None)])
def test_options_without_effect_on_the_merged_weights_pass(tmp_path, field, value):
    _edited_lora(tmp_path, **{field: value})
    run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")


def test_an_unknown_option_that_is_set_is_refused(tmp_path):
    prefix = _edited_lora(tmp_path, lora_future_trick={"on": True})
    assert merge_refusal(tmp_path / "base", tmp_path / "adapter", tmp_path / "out") == (
        f"{prefix}lora_future_trick={{'on': True}}: an option PEFT 0.21.2 does not have (a newer PEFT?), which could "
        "change the merged weights in a way this merge does not know; merge with the PEFT that wrote it, or remove "
        "the key if it is at its default")


@pytest.mark.parametrize("variant", ["velora", "monteclora"])
def test_training_only_variants_merge_like_peft(tmp_path, variant):
    """VeLoRA and MonteCLoRA differ from LoRA while training only; PEFT merges them as W + s·B·A and its eval forward
    equals that (their extra saved tensors are skipped, not refused)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import MontecloraConfig, VeloraConfig

    tiny_llama().save_pretrained(tmp_path / "base")
    extra = ({"velora_config": VeloraConfig(num_groups=4)} if variant == "velora"
             else {"monteclora_config": MontecloraConfig(num_samples=2)})
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **extra)
    _merges_like_peft(tmp_path, randomize_trainable(get_peft_model(tiny_llama(), config)).eval())
