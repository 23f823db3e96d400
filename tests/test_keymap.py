"""Adapters named by in-memory module paths merge into checkpoints whose keys transformers renames on load
(ViT in transformers ≥ 5: ``vit.layers.N.attention.q_proj`` in memory, ``vit.encoder.layer.N.attention.attention.query``
on disk), equal to PEFT's merge_and_unload saved by save_pretrained."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_cli
from tiny_models import peft_lora, peft_randlora, randomize_trainable, tiny_vit_classifier

VIT_TARGETS = ["q_proj", "v_proj", "fc1"]


def _merged_by_peft(peft_model, path):
    peft_model.merge_and_unload().save_pretrained(path)
    return load_file(str(path / "model.safetensors"))


def test_vit_checkpoint_keys_differ_from_module_names(tmp_path):
    """The premise: if transformers ever saves ViT under its module names again, this test says so."""
    model = tiny_vit_classifier()
    model.save_pretrained(tmp_path / "base")
    on_disk = set(load_file(str(tmp_path / "base" / "model.safetensors")))
    assert "vit.layers.0.attention.q_proj.weight" in dict(model.named_parameters())
    assert "vit.layers.0.attention.q_proj.weight" not in on_disk


@pytest.mark.parametrize("method", ["lora", "randlora", "dora"])
def test_vit_adapter_merges_like_peft(tmp_path, method):
    tiny_vit_classifier().save_pretrained(tmp_path / "base")
    model = tiny_vit_classifier()
    if method == "lora":
        peft_model = peft_lora(model, targets=VIT_TARGETS)
    elif method == "dora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=4, target_modules=VIT_TARGETS, use_dora=True, init_lora_weights=False)
        peft_model = get_peft_model(model, config)
    else:
        peft_model = peft_randlora(model, targets=VIT_TARGETS)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = _merged_by_peft(peft_model, tmp_path / "peft_merged")
    before = load_file(str(tmp_path / "base" / "model.safetensors"))
    run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(merged) == set(expected)
    query = "vit.encoder.layer.0.attention.attention.query.weight"
    assert not torch.equal(merged[query], before[query])
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_vit_classifier_head_adapter_merges_like_peft(tmp_path):
    """modules_to_save on ViT: the head's key is the same in memory and on disk, the adapted layers' are not."""
    from peft import LoraConfig, get_peft_model

    tiny_vit_classifier().save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"],
                        bias="lora_only")
    peft_model = randomize_trainable(get_peft_model(tiny_vit_classifier(), config))
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = _merged_by_peft(peft_model, tmp_path / "peft_merged")
    run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_unknown_key_without_a_mapping_still_fails_in_one_line(tmp_path):
    """A checkpoint without config.json: no mapping is known, the adapter's names are refused as before."""
    tiny_vit_classifier().save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "config.json").unlink()
    peft_lora(tiny_vit_classifier(), targets=["q_proj"]).save_pretrained(tmp_path / "adapter")
    result = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "q_proj")
    assert not (tmp_path / "out").exists()


def test_lora_on_multihead_attention_is_refused_naming_the_layer(tmp_path):
    """PEFT LoRA on an nn.MultiheadAttention (fused in_proj_weight, nested out_proj): refused with the reason,
    not "another architecture?"."""
    from tiny_models import tiny_siglip_vision

    tiny_siglip_vision().save_pretrained(tmp_path / "base")
    peft_lora(tiny_siglip_vision(), targets=["attention"]).save_pretrained(tmp_path / "adapter")
    result = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "head.attention", "MultiheadAttention")
    assert "another architecture" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_vit_randlora_converted_with_base_merges_like_peft(tmp_path):
    """convert --to randlora --base keeps the in-memory names; merging that file maps them onto the checkpoint."""
    tiny_vit_classifier().save_pretrained(tmp_path / "base")
    peft_model = peft_randlora(tiny_vit_classifier(), targets=VIT_TARGETS)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = _merged_by_peft(peft_model, tmp_path / "peft_merged")
    run_cli("convert", tmp_path / "adapter", tmp_path / "a.randlora", "--to", "randlora", "--base", tmp_path / "base")
    run_cli("merge", tmp_path / "base", tmp_path / "a.randlora", "-o", tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6, msg=key)
