"""Refusals name the real reason and the option to change, checked word for word (issue #25): a LoRA on a
Conv1d / Conv2d or an Embedding layer, a config whose rank disagrees with the weights, an adapter for another
architecture. The old messages blamed the config ("config says r=4" where r is 4) or guessed ("another
architecture?")."""

from __future__ import annotations

import json

from conftest import assert_one_line_error, merge_refusal, run_cli
from tiny_models import peft_lora, tiny_gpt2, tiny_llama, tiny_whisper


def _refusal(tmp_path, model, targets) -> str:
    from peft import LoraConfig, get_peft_model

    model.save_pretrained(tmp_path / "base")
    get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).save_pretrained(
        tmp_path / "adapter")
    result = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", check=False)
    assert_one_line_error(result)
    assert not (tmp_path / "out").exists()
    return result.stderr.strip().removeprefix(f"randlora-io: error: {tmp_path / 'adapter'}: ")


def test_lora_on_conv1d_names_the_layer_type(tmp_path):
    assert _refusal(tmp_path, tiny_whisper(tied=False), ["conv1"]) == (
        "'model.encoder.conv1' is a LoRA on an nn.Conv1d layer (lora_A [4, 8, 3], lora_B [32, 4, 1]): only Linear "
        "and Conv1D layers can be merged here; merge this adapter with PEFT's merge_and_unload, or leave that layer "
        "out of target_modules")


def test_lora_on_an_embedding_names_the_layer_type(tmp_path):
    assert _refusal(tmp_path, tiny_whisper(tied=False), ["embed_tokens"]) == (
        "'base_model.model.model.decoder.embed_tokens.lora_embedding_A' is a LoRA on an nn.Embedding layer "
        "(lora_embedding_A): only Linear and Conv1D layers can be merged here; merge this adapter with PEFT's "
        "merge_and_unload, or leave the embedding out of target_modules")


def test_rank_that_disagrees_with_the_weights_blames_the_config(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    peft_lora(tiny_llama(), targets=["q_proj"]).save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 8
    config_path.write_text(json.dumps(config))
    assert merge_refusal(tmp_path / "base", tmp_path / "adapter", tmp_path / "out") == (
        f"randlora-io: error: {tmp_path / 'adapter'}: 'model.layers.0.self_attn.q_proj' has lora_A "
        "[4, 64] and lora_B [64, 4], but adapter_config.json gives it rank r=8 (r / rank_pattern): config and "
        "weights disagree (a hand-edited config?)")


def test_adapter_for_another_architecture_says_so(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "base")
    peft_lora(tiny_llama(), targets=["q_proj"]).save_pretrained(tmp_path / "adapter")
    result = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "'model.layers.0.self_attn.q_proj.weight'",
                          "nor any 'q_proj.weight' layer at all: the adapter was trained on another architecture")


def test_validate_without_a_local_base_calls_a_scale_shape_mismatch_a_shape_error(tmp_path):
    """It was reported as NaN/Inf (NonFiniteError) though every value is finite."""
    from tiny_models import peft_randlora

    peft_randlora(tiny_llama(), targets=["q_proj"]).save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"], config["base_model_name_or_path"] = 16, "no/such-model"
    config_path.write_text(json.dumps(config))
    result = run_cli("validate", tmp_path / "adapter", check=False)
    assert_one_line_error(result, "do not fit r=16", "config and weights disagree")
    assert "NaN" not in result.stderr
