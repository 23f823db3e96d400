"""The attach handle's state: merge once (never W + 2ΔW), unmerge, detach, disable_adapter(), tied weights refused,
and the wrapper exposing the wrapped layer's attributes (T5 reads ``module.weight``)."""

from __future__ import annotations

import pytest
import torch
from test_train import logits, randomise  # shared helpers
from tiny_models import tiny_gpt2, tiny_llama

from randlora_io.errors import AdapterStateError, HeaderError
from randlora_io.train import RandloraConfig
from randlora_io.train import attach


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained(make=tiny_llama, dtype=torch.float32, **config):
    model = make(dtype=dtype)
    handle = attach(model, RandloraConfig(r=4, seed=2, **config))
    randomise(handle)
    return model, handle


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_twice_adds_delta_once(make):
    model, handle = trained(make)
    expected = logits(model)
    deltas = {k: layer.delta() for k, layer in handle.layers.items()}
    originals = {k: layer.base_layer.weight.detach().clone() for k, layer in handle.layers.items()}
    handle.merge()
    once = weights(model)
    handle.merge()                              # a no-op, not W + 2ΔW
    assert all(torch.equal(once[k], v) for k, v in weights(model).items())
    for key in deltas:
        torch.testing.assert_close(once[key], originals[key] + deltas[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


def test_merge_after_detach_is_refused_and_changes_nothing():
    model, handle = trained()
    before = weights(handle.detach())
    with pytest.raises(AdapterStateError, match="detached"):
        handle.merge()
    assert all(torch.equal(before[k], v) for k, v in weights(model).items())


@pytest.mark.parametrize("detach", [True, False])
def test_unmerge_restores_float32_weights(detach):
    model, handle = trained()
    base_weights = {k: layer.base_layer.weight.detach().clone() for k, layer in handle.layers.items()}
    attached_logits = logits(model)
    handle.merge(detach=detach)
    # training λ after the merge must not change what unmerge takes out
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(1.0)
    handle.unmerge()
    assert handle.attached and not handle.merged
    for key, w in base_weights.items():
        restored = handle.layers[key].base_layer.weight
        assert float((restored - w).abs().max()) <= 1e-6   # one fp32 rounding of W + ΔW, taken out again
    with torch.no_grad():
        for p in handle.parameters():
            p.sub_(1.0)
    torch.testing.assert_close(logits(model), attached_logits, rtol=1e-5, atol=1e-5)
    handle.unmerge()                            # a no-op when not merged


def test_unmerge_restores_bfloat16_weights_exactly_when_kept():
    model, handle = trained(dtype=torch.bfloat16)
    before = {k: layer.base_layer.weight.detach().clone() for k, layer in handle.layers.items()}
    handle.merge(detach=False)                  # keeps the pre-merge bf16 weights by default
    assert any(not torch.equal(handle.layers[k].base_layer.weight, w) for k, w in before.items())
    handle.unmerge()
    assert all(torch.equal(handle.layers[k].base_layer.weight, w) for k, w in before.items())


def test_merged_attached_model_runs_the_base_layer_only():
    model, handle = trained()
    expected = logits(model)
    handle.merge(detach=False)
    assert handle.attached and all(layer.merged for layer in handle.layers.values())
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)   # ΔW counted once
    with pytest.raises(AdapterStateError, match="merged"):
        handle.save("never-written.safetensors")
    with pytest.raises(AdapterStateError, match="unmerge"):
        with handle.disable_adapter():
            pass


def test_disable_adapter_gives_the_base_and_restores():
    base = logits(tiny_llama())
    model, handle = trained()
    adapted = logits(model)
    with handle.disable_adapter():
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), adapted)
    handle.detach()
    with pytest.raises(AdapterStateError, match="detached"):
        with handle.disable_adapter():
            pass


def test_an_explicit_target_on_a_tied_lm_head_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                         tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(HeaderError, match=r"lm_head: its weight is tied to model\.embed_tokens\.weight"):
        attach(model, RandloraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert not any(type(m).__name__ == "RandloraLayer" for m in model.modules())
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    attach(model, RandloraConfig(r=4))         # all-linear leaves the output layer out: fine


def test_wrapper_exposes_the_wrapped_layer_attributes():
    model, handle = trained()
    layer = handle.layers["model.layers.0.mlp.down_proj.weight"]
    base = layer.base_layer
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)
    _, gpt2 = trained(tiny_gpt2)
    conv = gpt2.layers["transformer.h.0.attn.c_attn.weight"]
    assert conv.weight is conv.base_layer.weight and conv.nf == conv.base_layer.nf   # any attribute, forwarded
    assert (conv.in_features, conv.out_features) == (48, 144)


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def test_t5_trains_with_the_wrapper_on_wo():
    """T5's DenseActDense reads ``self.wo.weight`` in its forward: the wrapper must expose it."""
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    base = tiny_t5()
    with torch.no_grad():
        expected = base(input_ids=ids, labels=ids).logits
    model = tiny_t5()
    handle = attach(model, RandloraConfig(r=4, target_modules=["q", "v", "wi", "wo"]))
    assert "encoder.block.0.layer.1.DenseReluDense.wo.weight" in handle.layers
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, labels=ids).logits, expected, rtol=0, atol=0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in handle.parameters())


def test_unmerge_of_bfloat16_without_the_kept_original_is_within_one_rounding():
    """merge() (detaching) keeps no copy of half-precision weights; unmerge then subtracts ΔW: W back to within one
    rounding of the dtype at |W + ΔW| (the documented tolerance), never W + 2ΔW or W − ΔW."""
    model, handle = trained(dtype=torch.bfloat16)
    before = {k: layer.base_layer.weight.detach().float().clone() for k, layer in handle.layers.items()}
    deltas = {k: layer.delta() for k, layer in handle.layers.items()}
    handle.merge()
    handle.unmerge()
    for key, w in before.items():
        restored = handle.layers[key].base_layer.weight.float()
        bound = 2.0 ** -7 * torch.maximum((w + deltas[key]).abs(), w.abs())   # bf16: 8 significant bits
        assert ((restored - w).abs() <= bound).all(), key
