"""Tied weights and modules_to_save (sources/ties.py): exact where PEFT's merged model keeps the tie, a one-line
refusal where it unties it (one side replaced), compared with PEFT's merged model's logits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, merge_refusal, run_cli
from tiny_models import randomize_trainable, tiny_tied_llama, tiny_whisper

IDS = torch.arange(10).view(1, -1)


def _adapter(model, modules_to_save, ensure_weight_tying=False):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=modules_to_save,
                        ensure_weight_tying=ensure_weight_tying, init_lora_weights=False)
    return randomize_trainable(get_peft_model(model, config))


@pytest.mark.parametrize("saved", [["embed_tokens"], ["lm_head"]])
def test_ensure_weight_tying_merges_like_peft(tmp_path, saved):
    """One trained tensor for both sides, saved twice by PEFT: OUT keeps the tie (refused as an unsupported tensor
    before)."""
    tiny_tied_llama().save_pretrained(tmp_path / "base")
    peft_model = _adapter(tiny_tied_llama(), saved, ensure_weight_tying=True)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(IDS).logits
    run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")
    assert set(load_file(str(tmp_path / "out" / "model.safetensors"))) == \
        set(load_file(str(tmp_path / "base" / "model.safetensors")))
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("saved, replaced, other", [
    (["embed_tokens"], "model.embed_tokens.weight", "lm_head.weight"),
    (["lm_head"], "lm_head.weight", "model.embed_tokens.weight"),
])
def test_one_side_of_a_tie_replaced_is_refused_word_for_word(tmp_path, saved, replaced, other):
    """PEFT's merged model: the trained copy on one side, the original on the other. The old code wrote only the
    trained embedding, so on load the head became it too (exit 0, logits off)."""
    tiny_tied_llama().save_pretrained(tmp_path / "base")
    _adapter(tiny_tied_llama(), saved).save_pretrained(tmp_path / "adapter")
    assert merge_refusal(tmp_path / "base", tmp_path / "adapter", tmp_path / "out") == (
        f"randlora-io: error: {tmp_path / 'adapter'}: replaces {replaced!r} with its trained copy (modules_to_save) "
        f"but not {other!r}, which the base ties to it (tie_word_embeddings): PEFT's merged model has the two "
        "differ, and a tied checkpoint cannot hold that; untie the base first (load it, set "
        "config.tie_word_embeddings=False, save_pretrained) and merge into that, or train with "
        "ensure_weight_tying=True")
    assert not (tmp_path / "out").exists()


def _untie(model, head: str, embed: str):
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    module = model.get_submodule(head)
    module.weight = torch.nn.Parameter(model.get_submodule(embed).weight.detach().clone())
    return model


def test_untied_base_then_merges_like_peft(tmp_path):
    """The refusal's recipe works: into the untied base the merge is exact (logits of PEFT's merged model)."""
    from transformers import LlamaForCausalLM

    _untie(tiny_tied_llama(), "lm_head", "model.embed_tokens").save_pretrained(tmp_path / "base")
    assert "lm_head.weight" in load_file(str(tmp_path / "base" / "model.safetensors"))
    peft_model = _adapter(tiny_tied_llama(), ["embed_tokens"])
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(IDS).logits
    run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")
    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_whisper_decoder_embedding_tied_to_proj_out_is_refused(tmp_path):
    """The same class in an encoder-decoder: Whisper's proj_out shares the decoder's embed_tokens."""
    tiny_whisper().save_pretrained(tmp_path / "base")
    assert "proj_out.weight" not in load_file(str(tmp_path / "base" / "model.safetensors"))
    _adapter(tiny_whisper(), ["embed_tokens"]).save_pretrained(tmp_path / "adapter")
    result = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "'model.decoder.embed_tokens.weight'", "'proj_out.weight'", "tie_word_embeddings")
    assert not (tmp_path / "out").exists()
