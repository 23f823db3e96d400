"""``merge_into_state_dict`` on GPT-2 style weights without a config.json: the caller passes the orientation
(``model_config`` or ``conv1d``), and the result equals PEFT's merge_and_unload; without it, a one-line refusal
that names both options (before, the only advice was a CLI flag)."""

from __future__ import annotations

import pytest
import torch

from randlora_io.errors import LayerTypeError
from randlora_io.merge.state_dict import merge_into_state_dict
from tiny_models import randomize_trainable, tiny_gpt2


def _adapter(tmp_path):
    """A LoRA on GPT-2's Conv1D c_attn and on its Linear lm_head: the adapter's single fan_in_fan_out flag cannot
    be right for both."""
    from peft import LoraConfig, get_peft_model

    peft_model = randomize_trainable(get_peft_model(tiny_gpt2(), LoraConfig(
        r=4, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True, init_lora_weights=False)))
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model


@pytest.mark.parametrize("how", ["model_config", "conv1d"])
def test_orientation_passed_by_the_caller_merges_like_peft(tmp_path, how):
    peft_model = _adapter(tmp_path)
    expected = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    model = tiny_gpt2()
    state = model.state_dict()  # as training code passes it: the tied lm_head and wte are one tensor
    before = {k: v.clone() for k, v in state.items()}
    kwargs = ({"model_config": model.config.to_dict()} if how == "model_config" else
              {"conv1d": [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]})
    merged = merge_into_state_dict(state, tmp_path / "adapter", **kwargs)
    assert not torch.equal(merged["transformer.h.0.attn.c_attn.weight"], before["transformer.h.0.attn.c_attn.weight"])
    assert all(torch.equal(state[k], before[k]) for k in state)  # the input is not modified
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_without_orientation_the_refusal_names_the_options(tmp_path):
    _adapter(tmp_path)
    state = dict(tiny_gpt2().state_dict())
    with pytest.raises(LayerTypeError) as info:
        merge_into_state_dict(state, tmp_path / "adapter")
    assert str(info.value) == (
        f"{tmp_path / 'adapter'}: cannot tell whether 'transformer.h.0.attn.c_attn.weight' is a GPT-2 style Conv1D "
        "layer (weight stored (in, out)) or a Linear one: a state dict carries no layer types, and the adapter's "
        "single fan_in_fan_out=false does not say it per layer; pass model_config=model.config.to_dict() or "
        "conv1d=[the Conv1D layers] to merge_into_state_dict")


def test_state_dict_with_one_side_of_a_tie_replaced_is_refused(tmp_path):
    """GPT-2's wte and lm_head are one tensor in its state dict: modules_to_save on wte leaves PEFT's lm_head
    original, which one tensor cannot hold (the merged tensor was written under both names before)."""
    from peft import LoraConfig, get_peft_model

    randomize_trainable(get_peft_model(tiny_gpt2(), LoraConfig(
        r=4, target_modules=["c_attn"], modules_to_save=["wte"], fan_in_fan_out=True))).save_pretrained(
        tmp_path / "adapter")
    model = tiny_gpt2()
    with pytest.raises(Exception) as info:
        merge_into_state_dict(model.state_dict(), tmp_path / "adapter", model_config=model.config.to_dict())
    assert str(info.value) == (
        f"{tmp_path / 'adapter'}: replaces 'transformer.wte.weight' with its trained copy (modules_to_save) but not "
        "'lm_head.weight', which is the same tensor in this state dict (tied): PEFT's merged model has the two "
        "differ; untie them in the model first, or train with ensure_weight_tying=True")
