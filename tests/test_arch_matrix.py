"""Architecture matrix: RandLoRA and LoRA adapters made by real PEFT 0.21.2 on tiny models of many architectures
(tests/tiny_archs.py), merged by ``merge`` straight from the PEFT dir and through ``convert --to randlora``, equal to
PEFT's ``merge_and_unload``; the merged checkpoint gives PEFT's logits; ``--to peft-randlora`` loads back into PEFT
with PEFT's own ΔW. float32 within 1e-5 relative; bfloat16 within one rounding of the operands (PEFT rounds ΔW to
bf16 and adds in bf16, we add in float32 and round once)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from test_merge import _compare, _load_state, _peft_merged_state
from tiny_archs import ARCHS
from tiny_models import peft_layer_deltas, peft_lora, peft_randlora


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _check_logits(arch, out, inputs, want, dtype):
    if dtype != torch.float32:
        return  # bf16 logits of two different roundings differ by more than a meaningful bound; weights are checked
    merged = type(arch.model()).from_pretrained(out, dtype=dtype).eval()
    with torch.no_grad():
        got = merged(**inputs)
    got = got.logits if hasattr(got, "logits") else got.last_hidden_state
    assert torch.allclose(got.float(), want.float(), atol=1e-4, rtol=1e-4), float((got - want).abs().max())


def _forward(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_randlora_and_lora_merge_equal_peft(tmp_path, name, dtype):
    arch = ARCHS[name]
    base = tmp_path / "base"
    arch.model(dtype).save_pretrained(base)
    base_state = _load_state(base)

    # RandLoRA (dense bases, not saved: regenerated at PEFT's size and cast)
    pm = peft_randlora(arch.model(dtype), r=4, seed=5, targets=arch.targets)
    pm.save_pretrained(tmp_path / "rl")
    inputs = arch.inputs(pm)
    want = _forward(pm, inputs)
    peft_deltas = peft_layer_deltas(pm)
    expected = _peft_merged_state(pm)
    run_cli("merge", base, tmp_path / "rl", "-o", tmp_path / "out_rl")
    run_cli("convert", tmp_path / "rl", tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
    run_cli("merge", base, tmp_path / "a.safetensors", "-o", tmp_path / "out_file")
    for out in ("out_rl", "out_file"):
        _compare(_load_state(tmp_path / out), expected, dtype, base_state)
    _check_logits(arch, tmp_path / "out_rl", inputs, want, dtype)

    # the round trip: our file back to a PEFT dir that PEFT loads with the same ΔW
    from peft import PeftModel

    run_cli("convert", tmp_path / "a.safetensors", tmp_path / "rl2", "--to", "peft-randlora")
    reloaded = PeftModel.from_pretrained(arch.model(dtype), tmp_path / "rl2")
    for key, delta in peft_layer_deltas(reloaded).items():
        assert _rel(delta, peft_deltas[key]) <= 1e-6, key

    # LoRA
    pl = peft_lora(arch.model(dtype), r=4, targets=arch.targets)
    pl.save_pretrained(tmp_path / "lora")
    want = _forward(pl, inputs)
    expected = _peft_merged_state(pl)
    run_cli("merge", base, tmp_path / "lora", "-o", tmp_path / "out_lora")
    _compare(_load_state(tmp_path / "out_lora"), expected, dtype, base_state)
    _check_logits(arch, tmp_path / "out_lora", inputs, want, dtype)
