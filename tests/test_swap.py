"""Live adapter swap (``randlora_io.swap``): apply in place equals ``merge_into_state_dict``; remove gives the exact
original weights back (bf16 and fp32, Llama and GPT-2 Conv1D); refusals change nothing.

Oracle: ``merge_into_state_dict`` (itself tested against PEFT's ``merge_and_unload``) and, once, PEFT directly."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from tiny_models import peft_randlora, tiny_gpt2, tiny_llama

from randlora_io import apply_adapter, merge_into_state_dict, remove_adapter
from randlora_io.format.adapter import read_adapter
from randlora_io.errors import AdapterStateError, BaseModelMismatchError, NonFiniteError
from randlora_io.sources.dense import DenseSource
from randlora_io.merge.swap import applied_adapters

MODELS = {"llama": (tiny_llama, None), "gpt2": (tiny_gpt2, ["c_attn", "c_fc", "c_proj"])}


def make_adapter(tmp_path, arch: str, r: int = 4, seed: int = 1, scale_seed: int = 1, targets=None):
    """A PEFT RandLoRA adapter on the tiny model, converted to a randlora file; returns it read back."""
    build, default_targets = MODELS[arch]
    base = tmp_path / f"base-{arch}"
    if not base.exists():
        build().save_pretrained(base)
    peft_dir = tmp_path / f"peft-{arch}-{seed}-{scale_seed}"
    peft_randlora(build(), r=r, seed=seed, scale_seed=scale_seed,
                  targets=targets or default_targets).save_pretrained(peft_dir)
    out = tmp_path / f"{peft_dir.name}.safetensors"
    run_cli("convert", peft_dir, out, "--to", "randlora", "--base", base)
    return read_adapter(out)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_apply_equals_merge_into_state_dict_and_remove_restores_exactly(tmp_path, arch, dtype):
    adapter = make_adapter(tmp_path, arch)
    model = MODELS[arch][0]().to(dtype)
    original = snapshot(model)
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    expected = merge_into_state_dict(model.state_dict(), adapter)

    keys = apply_adapter(model, adapter)
    assert sorted(keys) == sorted(adapter.layers) and applied_adapters(model) == [adapter.source]
    assert_state_equal(model, expected)
    assert all(not torch.equal(expected[k], original[k]) for k in keys)          # every targeted weight changed
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == pointers  # in place, nothing reallocated

    assert sorted(remove_adapter(model, adapter)) == sorted(keys)
    assert_state_equal(model, original)
    assert applied_adapters(model) == []


def test_applied_model_computes_what_peft_merge_and_unload_gives(tmp_path):
    base = tmp_path / "base-llama"
    tiny_llama().save_pretrained(base)
    peft_model = peft_randlora(tiny_llama(), r=4, seed=1, scale_seed=1)
    peft_model.save_pretrained(tmp_path / "peft")
    run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
    want = peft_model.merge_and_unload().state_dict()
    model = tiny_llama()
    apply_adapter(model, read_adapter(tmp_path / "a.safetensors"))
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, want[key], rtol=1e-5, atol=1e-6)


def test_weights_stack_and_removal_is_last_in_first_out(tmp_path):
    a = make_adapter(tmp_path, "llama", seed=1, scale_seed=1)
    b = make_adapter(tmp_path, "llama", seed=2, scale_seed=5)
    model = tiny_llama(dtype=torch.bfloat16)
    original = snapshot(model)
    apply_adapter(model, a, 0.5)
    after_a = snapshot(model)
    assert_state_equal(model, {**original, **merge_into_state_dict(original, a, 0.5)})
    apply_adapter(model, b, -1.0)
    assert_state_equal(model, merge_into_state_dict(after_a, b, -1.0))
    after_b = snapshot(model)
    with pytest.raises(AdapterStateError, match="remove that one first"):
        remove_adapter(model, a)
    assert_state_equal(model, after_b)                                           # the refusal changed nothing
    remove_adapter(model, b)
    assert_state_equal(model, after_a)
    remove_adapter(model, a)
    assert_state_equal(model, original)
    with pytest.raises(AdapterStateError, match="not applied"):
        remove_adapter(model, a)


def test_weight_minus_one_subtracts_but_only_remove_is_exact(tmp_path):
    a = make_adapter(tmp_path, "llama")
    model = tiny_llama(dtype=torch.bfloat16)
    original = snapshot(model)
    apply_adapter(model, a)
    applied = snapshot(model)
    apply_adapter(model, a, -1.0)
    state = model.state_dict()
    for key in a.layers:   # back within the two bf16 roundings (half an ulp of W+ΔW, then of W), not bit for bit
        back, w, w1 = state[key].float(), original[key].float(), applied[key].float()
        assert bool(((back - w).abs() <= 2**-8 * (w1.abs() + back.abs())).all()), key
    remove_adapter(model, a)          # the later (-1) application
    remove_adapter(model, a)
    assert_state_equal(model, original)


def test_remove_refuses_when_a_weight_changed_since_apply(tmp_path):
    a = make_adapter(tmp_path, "llama")
    model = tiny_llama()
    apply_adapter(model, a)
    key = next(iter(a.layers))
    param = model.get_parameter(key)
    with torch.no_grad():
        param.mul_(1.0)        # an in-place change (say, a training step) since the apply
    changed = snapshot(model)
    with pytest.raises(AdapterStateError, match="modified in place"):
        remove_adapter(model, a)
    assert_state_equal(model, changed)


def test_apply_refuses_before_changing_anything(tmp_path):
    gpt2 = tiny_gpt2()
    original = snapshot(gpt2)
    with pytest.raises(BaseModelMismatchError, match="model does not have"):
        apply_adapter(gpt2, make_adapter(tmp_path, "llama"))
    wte = gpt2.state_dict()["lm_head.weight"]
    tied = DenseSource({"lm_head.weight": torch.ones_like(wte)}, "tied.safetensors")
    with pytest.raises(BaseModelMismatchError, match="tied"):
        apply_adapter(gpt2, tied)
    key = "transformer.h.0.attn.c_attn.weight"
    bad = DenseSource({key: torch.ones(3, 3)}, "bad.safetensors")
    with pytest.raises(BaseModelMismatchError, match="shape"):
        apply_adapter(gpt2, bad)
    assert_state_equal(gpt2, original)
    assert applied_adapters(gpt2) == []


def test_non_finite_result_rolls_back_the_weights_already_changed():
    model = tiny_llama()
    original = snapshot(model)
    first, second = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    deltas = {first: torch.ones_like(original[first]), second: torch.full_like(original[second], float("inf"))}
    with pytest.raises(NonFiniteError, match="unchanged"):
        apply_adapter(model, DenseSource(deltas, "inf.safetensors"))
    assert_state_equal(model, original)
    assert applied_adapters(model) == []


def test_kernel_path_in_place_on_bf16_is_within_one_rounding_and_removal_is_exact(tmp_path):
    """The path CUDA takes (Triton kernel straight into the bf16 weight, no float32 copy), run by the interpreter."""
    a = make_adapter(tmp_path, "llama", targets=["q_proj", "down_proj"])
    model = tiny_llama(dtype=torch.bfloat16)
    original = snapshot(model)
    expected = merge_into_state_dict(model.state_dict(), a)
    apply_adapter(model, a, kernel="triton")
    state = model.state_dict()
    for key in a.layers:
        got, want = state[key].float(), expected[key].float()
        ulp = torch.pow(2.0, torch.floor(torch.log2(want.abs().clamp_min(2.0**-126))) - 7)
        assert bool(((got - want).abs() <= ulp).all()), key
        assert not torch.equal(state[key], original[key])
    remove_adapter(model, a)
    assert_state_equal(model, original)


def test_backups_are_compact_and_exact_whatever_the_update_size(tmp_path):
    """bf16: a small update (≈ 2 % of W) keeps the int8 ulp difference plus the few far-moved elements, well under a
    copy; an update that moves many elements far (sign flips) keeps the whole original; fp32 always keeps a copy.
    All restore bit for bit."""
    from randlora_io.merge.swap import _APPLIED

    adapter = make_adapter(tmp_path, "llama")
    for dtype in (torch.bfloat16, torch.float32):
        model = tiny_llama(dtype=dtype)
        original = snapshot(model)
        apply_adapter(model, adapter, 0.002)
        for key, backup in getattr(model, _APPLIED)[0].backups.items():
            size = original[key].numel() * original[key].element_size()
            if dtype == torch.bfloat16:
                assert backup.full is None and backup.index.numel() > 0 and backup.nbytes() < 0.75 * size, key
            else:
                assert backup.full is not None and backup.nbytes() == size, key
        remove_adapter(model, adapter)
        assert_state_equal(model, original)

        key_some, key_all = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
        w = original[key_some].float()
        deltas = {key_some: torch.where(torch.arange(w.numel()).reshape(w.shape) % 50 == 0, -3 * w, 1e-3 * w),
                  key_all: -2 * original[key_all].float()}               # 2 % of signs flip / every sign flips
        big = DenseSource(deltas, str(tmp_path / "big.safetensors"))
        apply_adapter(model, big)
        backups = getattr(model, _APPLIED)[0].backups
        assert (backups[key_some].full is None) == (dtype == torch.bfloat16)
        assert backups[key_all].full is not None
        remove_adapter(model, tmp_path / "big.safetensors")   # by path, as it was applied

        assert_state_equal(model, original)


def test_a_peft_dir_applied_by_path_equals_merge_into_state_dict_by_path(tmp_path):
    """Opened from a path, the adapter is read as ``merge_into_state_dict`` reads it: PEFT casts its (sparse) bases to
    the weights' dtype, so a bf16 model must get the bf16-rounded bases, bit for bit the same result."""
    peft_dir = tmp_path / "peft-sparse"
    peft_randlora(tiny_llama(), r=4, seed=2, sparse=True).save_pretrained(peft_dir)
    model = tiny_llama(dtype=torch.bfloat16)
    original = snapshot(model)
    expected = merge_into_state_dict(model.state_dict(), peft_dir)
    apply_adapter(model, peft_dir)
    assert_state_equal(model, expected)
    remove_adapter(model, peft_dir)
    assert_state_equal(model, original)
