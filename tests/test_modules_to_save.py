"""PEFT's modules_to_save (a trained classification head saved in full) and trained biases (``bias="lora_only"`` /
``"all"``): merge writes them over the base's, equal to PEFT's ``merge_and_unload``; conversions carry them or refuse."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_cli
from tiny_models import randomize_trainable, tiny_bert_classifier, tiny_llama, tiny_llama_classifier


def _adapter(model, method: str, *, bias: str = "none", targets=("query", "value"), modules_to_save=None):
    from peft import LoraConfig, RandLoraConfig, get_peft_model

    if method == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="SEQ_CLS", bias=bias,
                            modules_to_save=modules_to_save)
    else:
        config = RandLoraConfig(r=4, randlora_alpha=8, target_modules=list(targets), task_type="SEQ_CLS",
                                bias=bias, modules_to_save=modules_to_save)
    return randomize_trainable(get_peft_model(model, config))


def _save_pair(tmp_path, build, method, **kw):
    """BASE saved from ``build()``, an adapter trained on the same weights, and PEFT's merged state dict."""
    base = tmp_path / "base"
    build().save_pretrained(base)
    peft_model = _adapter(build(), method, **kw)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    expected = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return base, adapter, expected


def _assert_equal_to_peft(out, expected, changed):
    merged = load_file(str(out / "model.safetensors"))
    for key in changed:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("method,bias", [("lora", "lora_only"), ("randlora", "all"), ("lora", "none")])
def test_bert_head_and_biases_merge_like_peft(tmp_path, method, bias):
    base, adapter, expected = _save_pair(tmp_path, tiny_bert_classifier, method, bias=bias)
    before = load_file(str(base / "model.safetensors"))
    run_cli("merge", base, adapter, "-o", tmp_path / "out")
    q_bias = "bert.encoder.layer.0.attention.self.query.bias"
    changed = ["classifier.weight", "classifier.bias", q_bias]
    assert not torch.equal(before["classifier.weight"], expected["classifier.weight"])  # the head was trained
    assert torch.equal(before[q_bias], expected[q_bias]) == (bias == "none")
    _assert_equal_to_peft(tmp_path / "out", expected, changed)


def test_llama_score_head_merges_like_peft(tmp_path):
    base, adapter, expected = _save_pair(tmp_path, tiny_llama_classifier, "randlora", targets=("q_proj", "v_proj"))
    run_cli("merge", base, adapter, "-o", tmp_path / "out")
    _assert_equal_to_peft(tmp_path / "out", expected, ["score.weight"])


def test_merge_into_state_dict_replaces_the_head(tmp_path):
    from randlora_io.merge.state_dict import merge_into_state_dict

    base, adapter, expected = _save_pair(tmp_path, tiny_bert_classifier, "lora", bias="all")
    merged = merge_into_state_dict(load_file(str(base / "model.safetensors")), adapter)
    for key in ("classifier.weight", "classifier.bias", "bert.pooler.dense.bias"):
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6)


def test_base_without_the_head_is_refused_in_one_line(tmp_path):
    """An adapter trained on LlamaForSequenceClassification merged into a causal-LM checkpoint (no ``score``)."""
    tiny_llama(hidden=32, intermediate=48, layers=1, vocab=64).save_pretrained(tmp_path / "causal")
    _, adapter, _ = _save_pair(tmp_path, tiny_llama_classifier, "lora", targets=("q_proj", "v_proj"))
    result = run_cli("merge", tmp_path / "causal", adapter, "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "score.weight", "modules_to_save", "AutoModelForSequenceClassification")
    assert not (tmp_path / "out").exists()


def test_weighted_merge_of_a_head_is_refused(tmp_path):
    base, adapter, _ = _save_pair(tmp_path, tiny_bert_classifier, "lora")
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--weight", "0.5", check=False)
    assert_one_line_error(result, "classifier.", "weight 0.5")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("to", ["randlora", "dense"])
def test_convert_to_formats_without_room_for_the_head_refuses(tmp_path, to):
    base, adapter, _ = _save_pair(tmp_path, tiny_bert_classifier, "randlora", bias="lora_only")
    dst = tmp_path / "converted"
    result = run_cli("convert", adapter, dst, "--to", to, "--base", base, check=False)
    assert_one_line_error(result, "modules_to_save", "merge the adapter")
    assert not dst.exists()


def _merged_from_peft_dir(build, adapter_dir):
    from peft import PeftModel

    model = PeftModel.from_pretrained(build(), str(adapter_dir))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("method,bias,to", [("randlora", "all", "peft-randlora"), ("lora", "lora_only", "peft-lora"),
                                            ("lora", "lora_only", "peft-randlora")])
def test_convert_to_peft_keeps_head_and_biases(tmp_path, method, bias, to):
    """The converted dir, loaded by PEFT and merged, has the source's trained head and biases (and, lossless for
    RandLoRA → peft-randlora, the same weights)."""
    base, adapter, expected = _save_pair(tmp_path, tiny_bert_classifier, method, bias=bias)
    dst = tmp_path / "converted"
    run_cli("convert", adapter, dst, "--to", to, "--rank", "4", "--base", base)
    got = _merged_from_peft_dir(tiny_bert_classifier, dst)
    trained = ["classifier.weight", "classifier.bias", "bert.encoder.layer.0.attention.self.query.bias"]
    exact = [k for k in got if k.endswith(".bias")] + trained if method != "randlora" else list(got)
    for key in exact:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
