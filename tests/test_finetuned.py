"""Fine-tuned full checkpoints as merge inputs (sources/finetuned.py): their task vector τ = W_ft − W_base, streamed
tensor by tensor, composes with adapters (task arithmetic today; the methods of issue #26 take it the same way)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from conftest import merge_refusal, run_cli
from tiny_models import peft_lora, tiny_gpt2, tiny_llama


def _finetuned(tmp_path, name: str, scale: float, seed: int):
    """A 'fine-tuned' tiny Llama: every floating tensor of the base moved by scale·N(0, 1)."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(tmp_path / name)
    return load_file(str(tmp_path / name / "model.safetensors"))


def test_a_finetuned_checkpoint_merged_alone_gives_it_back(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    ft = _finetuned(tmp_path, "ft", 0.01, 1)
    run_cli("merge", tmp_path / "base", tmp_path / "ft", "-o", tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(merged) == set(ft)
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, ft[key], rtol=0, atol=2e-7, msg=key)  # W + (W_ft − W) in float32


def test_task_arithmetic_of_two_finetuned_and_an_adapter(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    ft1, ft2 = _finetuned(tmp_path, "ft1", 0.01, 1), _finetuned(tmp_path, "ft2", 0.02, 2)
    peft_model = peft_lora(tiny_llama(), targets=["q_proj"])
    peft_model.save_pretrained(tmp_path / "lora")
    lora_merged = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    run_cli("merge", tmp_path / "base", tmp_path / "ft1", tmp_path / "ft2", tmp_path / "lora", "-o", tmp_path / "out",
            "--weight", "0.5", "--weight", "-0.25", "--weight", "1")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, tensor in merged.items():
        expected = (base[key] + 0.5 * (ft1[key] - base[key]) - 0.25 * (ft2[key] - base[key])
                    + (lora_merged[key] - base[key]))
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-6, msg=key)


def test_finetuned_checkpoint_of_another_architecture_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_gpt2().save_pretrained(tmp_path / "ft")
    message = merge_refusal(tmp_path / "base", tmp_path / "ft", tmp_path / "out")
    assert "a fine-tuned checkpoint of another architecture" in message, message


def test_finetuned_checkpoint_of_another_size_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_llama(intermediate=80).save_pretrained(tmp_path / "ft")
    assert merge_refusal(tmp_path / "base", tmp_path / "ft", tmp_path / "out") == (
        f"randlora-io: error: {tmp_path / 'ft'}: 'model.layers.0.mlp.down_proj.weight' is [64, 80] but the base's is "
        "[64, 96]: another model size or a resized vocabulary")


def test_the_base_itself_is_not_a_finetuned_input(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    message = merge_refusal(tmp_path / "base", tmp_path / "base", tmp_path / "out")
    assert message == (f"randlora-io: error: {tmp_path / 'base'}: is the base itself (its task vector is zero); give a "
                       "fine-tuned checkpoint")


def test_convert_refuses_a_finetuned_checkpoint(tmp_path):
    from conftest import assert_one_line_error

    tiny_llama().save_pretrained(tmp_path / "base")
    _finetuned(tmp_path, "ft", 0.01, 1)
    result = run_cli("convert", tmp_path / "ft", tmp_path / "a.safetensors", "--to", "dense", "--base",
                     tmp_path / "base", check=False)
    assert_one_line_error(result, "a fine-tuned full checkpoint is not an adapter")
    assert not (tmp_path / "a.safetensors").exists()


def test_a_float64_finetuned_checkpoint_is_merged_not_skipped(tmp_path):
    """A fine-tune saved in float64 (all of it, or one tensor): τ is taken in float64 and rounded once. Before,
    float64 tensors were left out of the task vector: exit 0 with the base's weights there."""
    from safetensors.torch import save_file

    tiny_llama().save_pretrained(tmp_path / "base")
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    ft = _finetuned(tmp_path, "ft", 0.01, 1)
    as64 = {k: (v.double() if k == "model.norm.weight" or "q_proj" in k else v) for k, v in ft.items()}
    save_file(as64, str(tmp_path / "ft" / "model.safetensors"), metadata={"format": "pt"})
    for method in ([], ["--method", "ties", "--density", "1"]):
        out = tmp_path / f"out{len(method)}"
        run_cli("merge", tmp_path / "base", tmp_path / "ft", "-o", out, *method)
        merged = load_file(str(out / "model.safetensors"))
        for key, tensor in merged.items():
            tau = (as64[key].double() - base[key].double()).float()
            assert torch.equal(tensor, base[key] + tau), key
            if not torch.equal(ft[key], base[key]):
                assert not torch.equal(tensor, base[key]), key


def test_a_finetuned_checkpoint_in_merge_into_state_dict_is_refused_naming_it(tmp_path):
    import pytest

    from randlora_io import merge_into_state_dict
    from randlora_io.errors import SourceFormatError

    tiny_llama().save_pretrained(tmp_path / "base")
    _finetuned(tmp_path, "ft", 0.01, 1)
    with pytest.raises(SourceFormatError, match=r"ft: a fine-tuned checkpoint .* merge_into_state_dict has only a"):
        merge_into_state_dict(tiny_llama().state_dict(), str(tmp_path / "ft"))
