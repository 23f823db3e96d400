"""Composite models whose parts use one leaf name for different layer types (checkpoint/base_model.py): a GPTBigCode
encoder (``c_attn`` / ``c_proj`` are nn.Linear) under a GPT-2 decoder (the same names are Conv1D). Orientation comes
from each module's own type; on the old code it came from the leaf name across the whole model, so one side was
transposed (refused where shapes differ, silently wrong on the square ``attn.c_proj``)."""

from __future__ import annotations

import pytest
import torch

from conftest import merge_refusal, run_cli
from tiny_models import randomize_trainable

IDS = torch.arange(8).view(1, -1)


def _encoder_decoder():
    from transformers import EncoderDecoderConfig, EncoderDecoderModel, GPT2Config, GPTBigCodeConfig

    torch.manual_seed(0)
    encoder = GPTBigCodeConfig(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
    decoder = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32, add_cross_attention=True,
                         is_decoder=True, bos_token_id=1, eos_token_id=2)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = 1, 0
    return EncoderDecoderModel(config=config).eval()


def _adapter(method: str):
    from peft import LoraConfig, RandLoraConfig, get_peft_model

    targets = ["c_attn", "c_proj"]
    config = (LoraConfig(r=4, target_modules=targets, init_lora_weights=False) if method == "lora"
              else RandLoraConfig(r=8, target_modules=targets, init_weights=False))
    return randomize_trainable(get_peft_model(_encoder_decoder(), config))


def test_premise_one_leaf_name_two_layer_types():
    from transformers.pytorch_utils import Conv1D

    model = _encoder_decoder()
    assert type(model.get_submodule("encoder.h.0.attn.c_proj")) is torch.nn.Linear
    assert isinstance(model.get_submodule("decoder.transformer.h.0.attn.c_proj"), Conv1D)
    assert model.get_submodule("encoder.h.0.attn.c_proj").weight.shape == (32, 32)  # square: no shape check helps


@pytest.mark.parametrize("method", ["lora", "randlora"])
def test_composite_model_merges_like_peft(tmp_path, method):
    from transformers import EncoderDecoderModel

    _encoder_decoder().save_pretrained(tmp_path / "base")
    peft_model = _adapter(method)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(input_ids=IDS, decoder_input_ids=IDS).logits
        expected_state = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")
    merged = EncoderDecoderModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS, decoder_input_ids=IDS).logits, expected, rtol=1e-4,
                                   atol=1e-5)
    for key, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, expected_state[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_composite_model_without_transformers_model_is_refused(tmp_path, monkeypatch):
    """Where the model cannot be built (no transformers), the layer types are not guessed from names."""
    from randlora_io.checkpoint import base_model

    _encoder_decoder().save_pretrained(tmp_path / "base")
    _adapter("lora").save_pretrained(tmp_path / "adapter")
    monkeypatch.setattr(base_model, "meta_model", lambda root: None)
    assert merge_refusal(tmp_path / "base", tmp_path / "adapter", tmp_path / "out") == (
        f"randlora-io: error: {tmp_path / 'adapter'}: the base at {tmp_path / 'base'} is a composite model "
        "(encoder-decoder, gpt2, gpt_bigcode) whose parts use the same layer names for Conv1D and Linear layers; "
        "telling each layer's type needs transformers and the base's config.json naming a class it builds: install "
        "transformers (pip install transformers)")
    assert not (tmp_path / "out").exists()
