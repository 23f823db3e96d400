"""Checkpoints transformers stores rearranged (a ``WeightConverter`` in its conversion mapping: transposed, fused on
disk and chunked in memory): an adapter on the in-memory layers merges exactly as PEFT's ``merge_and_unload`` saved
by ``save_pretrained``, logits included; square shapes on purpose (a transpose missed there changes no shape)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, merge_refusal, run_cli
from tiny_models import randomize_trainable, tiny_ergo, tiny_hrm_text

IDS = torch.arange(12).view(1, -1)


def _adapter(model, method: str, targets: list[str]):
    from peft import LoraConfig, RandLoraConfig, get_peft_model

    method = method.removesuffix("-file")
    if method == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    else:
        config = RandLoraConfig(r=8, target_modules=targets, init_weights=False)
    return randomize_trainable(get_peft_model(model, config))


def _merge_and_compare(tmp_path, build, method, targets, changed):
    build().save_pretrained(tmp_path / "base")
    on_disk = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert all(key in on_disk for key in changed)  # the premise: these are the checkpoint's own names
    peft_model = _adapter(build(), method, targets)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected_logits = peft_model(IDS).logits
    peft_model.merge_and_unload().save_pretrained(tmp_path / "peft_merged")
    expected = load_file(str(tmp_path / "peft_merged" / "model.safetensors"))
    adapter = tmp_path / "adapter"
    if method.endswith("-file"):  # through our format: in-memory names kept, mapped when merged
        run_cli("convert", adapter, tmp_path / "a.safetensors", "--to", "randlora", "--base", tmp_path / "base")
        adapter = tmp_path / "a.safetensors"
    run_cli("merge", tmp_path / "base", adapter, "-o", tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(merged) == set(expected) == set(on_disk)
    for key in changed:
        assert not torch.equal(merged[key], on_disk[key]), key
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    loaded = type(build()).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "randlora", "randlora-file"])
def test_transposed_on_disk_square_shared_expert_merges_like_peft(tmp_path, method):
    """Ergo stores its shared expert (in, out): on the old code ΔW was added untransposed (logits off by ~0.1)."""
    _merge_and_compare(tmp_path, tiny_ergo, method, ["up_proj", "down_proj", "o_proj", "linear"],
                       ["layers.1.feed_forward.shared_up_proj", "layers.1.feed_forward.shared_down_proj",
                        "layers.1.feed_forward.gate_kernel", "layers.1.attention.wo.weight",
                        "layers.0.feed_forward.up.weight"])


@pytest.mark.parametrize("method", ["lora", "randlora", "randlora-file"])
def test_fused_on_disk_chunked_in_memory_merges_like_peft(tmp_path, method):
    """HrmText: only ``up_proj`` of the fused gate_up and only ``k_proj`` of the fused gqkv are adapted, so the other
    chunks must stay exactly the base's; ``o_proj`` is renamed only (it was refused on the old code)."""
    _merge_and_compare(tmp_path, tiny_hrm_text, method, ["up_proj", "k_proj", "o_proj"],
                       ["model.H_module.layers.0.mlp.gate_up_proj.weight",
                        "model.L_module.layers.1.attn.gqkv_proj.weight", "model.H_module.layers.0.attn.o_proj.weight"])
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    key = "model.H_module.layers.0.mlp.gate_up_proj.weight"
    torch.testing.assert_close(merged[key][:32], base[key][:32], rtol=0, atol=0)  # gate: untouched


def test_conversion_that_is_not_a_rearrangement_is_refused_by_name(tmp_path, monkeypatch):
    """An operation the module has not read (here: Transpose taken off the list) is a refusal, never a guess."""
    from randlora_io.sources import conversion

    tiny_ergo().save_pretrained(tmp_path / "base")
    _adapter(tiny_ergo(), "lora", ["up_proj"]).save_pretrained(tmp_path / "adapter")
    monkeypatch.setattr(conversion, "REARRANGING_OPS", conversion.REARRANGING_OPS - {"Transpose"})
    assert merge_refusal(tmp_path / "base", tmp_path / "adapter", tmp_path / "out") == (
        f"randlora-io: error: {tmp_path / 'adapter'}: layer 'model.layers.1.mlp.shared_experts.up_proj.weight': "
        "transformers loads it through Transpose operation, which is not a rearrangement of the weight's elements; "
        "merge with PEFT and save_pretrained instead")
    assert not (tmp_path / "out").exists()


def test_conversion_whose_round_trip_differs_is_refused(tmp_path, monkeypatch):
    """The reverted ΔW is loaded back through transformers' forward operations; a mismatch refuses the layer."""
    from randlora_io.sources import conversion

    tiny_ergo().save_pretrained(tmp_path / "base")
    _adapter(tiny_ergo(), "lora", ["up_proj"]).save_pretrained(tmp_path / "adapter")
    real = conversion.ModelConversions._convert_on_load
    monkeypatch.setattr(conversion.ModelConversions, "_convert_on_load",
                        lambda self, tensors: {k: v.T.contiguous() for k, v in real(self, tensors).items()})
    result = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "and back does not give the same ΔW")
    assert not (tmp_path / "out").exists()


def test_modules_to_save_on_a_converted_parameter_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    tiny_ergo().save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["o_proj"], modules_to_save=["shared_experts"])
    randomize_trainable(get_peft_model(tiny_ergo(), config)).save_pretrained(tmp_path / "adapter")
    result = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "modules_to_save", "stores it as Transpose")
    assert not (tmp_path / "out").exists()
