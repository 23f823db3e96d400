"""PEFT VeRA dirs (peft_type VERA, sources/peft_vera.py) merge as PEFT 0.21.2's own ``merge_and_unload``, against
real PEFT: saved and regenerated projections, keys 0 / ≥ 2^63 / negative, layers of different shapes (GQA k/v,
MLP), r above some layer dims, GPT-2 Conv1D, bf16 bases, vectors and projections saved in bf16. On the code before
this module every such dir was refused as "unsupported peft_type 'VERA'"."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, run_cli
from randlora_io.format.vera import peft_vera_bases, vera_seed
from tiny_models import LLAMA_TARGETS, peft_vera, tiny_gpt2, tiny_llama

GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]


def make_vera(tmp_path, model, *, r=8, seed=0, save_projection=True, targets=None, base_dtype=None,
              saved_dtype=None, **config):
    """Save ``model`` as BASE (cast to ``base_dtype`` first when given), wrap it in a PEFT VeRA adapter with random
    non-zero λ_b / λ_d (PEFT inits λ_b = 0: ΔW would be 0), optionally cast the adapter to ``saved_dtype`` (vectors
    and projections then saved in it), and save it. Returns (base dir, adapter dir)."""
    (model.to(base_dtype) if base_dtype else model).save_pretrained(tmp_path / "base")
    model = model.float() if base_dtype else model
    peft_model = peft_vera(model, r=r, seed=seed, save_projection=save_projection, targets=targets, **config)
    if saved_dtype is not None:
        peft_model = peft_model.to(saved_dtype)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def peft_merged(base, adapter) -> dict[str, torch.Tensor]:
    """PEFT's own result: BASE loaded in its dtype, the dir loaded onto it, ``merge_and_unload``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_merges_like_peft(tmp_path, base, adapter, targets, peft_dir=None) -> dict[str, torch.Tensor]:
    """Merge ``adapter`` with the CLI; every tensor bit-equal to PEFT's merge of ``peft_dir`` (default: the
    adapter itself; same float32 product, one rounding: PEFT adds its float32 ΔW into the weight in place), and
    every targeted weight changed."""
    expected = peft_merged(base, peft_dir or adapter)
    run_cli("merge", base, adapter, "-o", tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    before = load_file(str(base / "model.safetensors"))
    for key, tensor in merged.items():
        assert tensor.dtype == before[key].dtype, key
        assert torch.equal(tensor, expected[key]), (key, (tensor.float() - expected[key].float()).abs().max())
    targeted = [k for k in merged if k.endswith(".weight") and any(f".{t}." in k for t in targets)]
    assert targeted and all(not torch.equal(merged[k], before[k]) for k in targeted)
    return merged


CASES = {
    # name: (model, r, seed, save_projection, base dtype, saved dtype)
    "llama saved projection key 0": (tiny_llama, 8, 0, True, None, None),
    "llama regenerated key 2^63+5": (tiny_llama, 8, 2**63 + 5, False, None, None),
    "llama regenerated negative key, r above every hidden dim": (tiny_llama, 100, -3, False, None, None),
    "llama saved projection onto a bf16 base": (tiny_llama, 8, 7, True, torch.bfloat16, None),
    "llama regenerated onto a bf16 base": (tiny_llama, 8, 7, False, torch.bfloat16, None),
    "llama regenerated onto a fp16 base": (tiny_llama, 8, 2**64 - 1, False, torch.float16, None),
    "llama vectors and projections saved in bf16": (tiny_llama, 8, 5, True, torch.bfloat16, torch.bfloat16),
    "gpt2 Conv1D regenerated": (tiny_gpt2, 8, 11, False, None, None),
    "gpt2 Conv1D saved projection": (tiny_gpt2, 16, 2**63, True, None, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_peft_merge_and_unload(tmp_path, case):
    model_fn, r, seed, save_projection, base_dtype, saved_dtype = CASES[case]
    targets = GPT2_TARGETS if model_fn is tiny_gpt2 else LLAMA_TARGETS
    base, adapter = make_vera(tmp_path, model_fn(), r=r, seed=seed, save_projection=save_projection,
                              targets=targets, base_dtype=base_dtype, saved_dtype=saved_dtype)
    assert_merges_like_peft(tmp_path, base, adapter, targets)


def test_regenerated_bases_are_peft_draw_and_keys_wrap_like_torch():
    """Our draw is PEFT's ``_init_vera_A_vera_B`` bit for bit; a negative key is 2^64 + key, as manual_seed does."""
    from peft import VeraConfig, get_peft_model

    for key in (0, 2**63 + 1, -5):
        pm = get_peft_model(tiny_llama(), VeraConfig(r=8, projection_prng_key=key, target_modules=LLAMA_TARGETS))
        ours = peft_vera_bases(vera_seed(key), 8, max_out=96, max_in=96)
        assert torch.equal(ours.A, pm.base_model.vera_A["default"])
        assert torch.equal(ours.B, pm.base_model.vera_B["default"])
    assert vera_seed(-1) == 2**64 - 1
    with pytest.raises(ValueError):
        vera_seed(2**64)


def test_vera_mixes_with_lora_in_one_merge(tmp_path):
    """VeRA and LoRA dirs in one merge: W + ΔW_vera + ΔW_lora in float32, rounded once."""
    from peft import LoraConfig, get_peft_model

    from tiny_models import peft_layer_deltas

    base, vera = make_vera(tmp_path, tiny_llama(), save_projection=False, targets=["q_proj", "down_proj"])
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    expected = peft_merged(base, vera)
    for key, delta in peft_layer_deltas(lora).items():
        expected[key] = expected[key] + delta
    run_cli("merge", base, vera, tmp_path / "lora", "-o", tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-6, atol=1e-6, msg=key)


def test_inspect_and_validate(tmp_path):
    base, adapter = make_vera(tmp_path, tiny_llama(), save_projection=True)
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base)  # validate checks against a local base
    cfg_path.write_text(json.dumps(cfg))
    info = json.loads(run_cli("inspect", adapter, "--json").output)
    assert info["kind"] == "peft-vera" and info["method"] == "vera" and info["projections"]["saved"]
    assert len(info["layers"]) == 14 and info["layers"][0]["r"] == 8
    out = run_cli("validate", adapter).output
    assert "VeRA" in out and "the seed's draw" in out


def test_saved_projections_other_than_the_seed_are_used_as_peft_uses_them(tmp_path):
    """PEFT loads saved vera_A / vera_B over its own draw; the merge follows them (with a note), it does not
    regenerate from the key."""
    base, adapter = make_vera(tmp_path, tiny_llama(), save_projection=True, targets=["q_proj", "k_proj"])
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 0.5
    save_file(tensors, str(weights))
    assert_merges_like_peft(tmp_path, base, adapter, ["q_proj", "k_proj"])


@pytest.mark.parametrize("edit, fragments", [
    (lambda t, c: t.pop("base_model.vera_B"), ["saves base_model.vera_A but not base_model.vera_B"]),
    (lambda t, c: t.update({"base_model.vera_A": t["base_model.vera_A"][:, :10].contiguous()}), ["saved vera_a [8, 10]"]),
    (lambda t, c: t.update({k: v[:-1] for k, v in t.items() if k.endswith("q_proj.vera_lambda_b")}),
     ["vera_lambda_b [63]", "need [64]"]),
    (lambda t, c: c.update(r=4), ["vera_lambda_d [8]", "r=4"]),
    (lambda t, c: c.update(projection_prng_key=2**64), ["projection_prng_key", "[-2^63, 2^64)"]),
    (lambda t, c: c.update(target_modules=["q_proj", "k_proj", "v_proj"], init_weights=False),
     ["targets", "init_weights is false"]),
    (lambda t, c: t.update({k: v * float("nan") for k, v in t.items() if k.endswith("k_proj.vera_lambda_d")}),
     ["nan"]),
    (lambda t, c: [t.pop("base_model.vera_A"), t.pop("base_model.vera_B")],
     ["save_projection true but the weights hold no base_model.vera_a", "peft refuses"]),
])
def test_bad_dirs_are_refused_in_one_line(tmp_path, edit, fragments):
    base, adapter = make_vera(tmp_path, tiny_llama(), save_projection=True, targets=["q_proj", "k_proj"])
    weights, cfg_path = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    tensors, cfg = load_file(str(weights)), json.loads(cfg_path.read_text())
    edit(tensors, cfg)
    save_file(tensors, str(weights))
    cfg_path.write_text(json.dumps(cfg))
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_targeted_layers_without_saved_vectors_size_the_bases_as_peft_does(tmp_path):
    """A targeted layer whose vectors are not in the dir: PEFT adapts it from its init (λ_b = 0, ΔW = 0), and it
    still sizes the shared bases (here down_proj's 96 inputs): the other layers' slices come from those bases."""
    base, adapter = make_vera(tmp_path, tiny_llama(), save_projection=False, targets=["q_proj", "k_proj", "down_proj"])
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if ".down_proj." not in k}, str(weights))
    assert_merges_like_peft(tmp_path, base, adapter, ["q_proj", "k_proj"])


def test_convert_to_dense_and_to_peft_lora(tmp_path):
    """--to dense holds PEFT's ΔW; --to peft-lora --rank r is exact up to SVD rounding (VeRA's ΔW has rank ≤ r),
    and PEFT loads it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tiny_models import peft_layer_deltas

    base, adapter = make_vera(tmp_path, tiny_llama(), save_projection=False, targets=["q_proj", "k_proj", "up_proj"])
    expected = peft_layer_deltas(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter))
    run_cli("convert", adapter, tmp_path / "d.safetensors", "--to", "dense", "--base", base)
    dense = load_file(str(tmp_path / "d.safetensors"))
    assert dense.keys() == expected.keys()
    assert all(torch.equal(dense[k], expected[k]) for k in dense)
    run_cli("convert", adapter, tmp_path / "lora", "--to", "peft-lora", "--rank", "8", "--base", base)
    lora = peft_layer_deltas(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "lora"))
    for key, delta in expected.items():
        torch.testing.assert_close(lora[key], delta, rtol=1e-4, atol=1e-6, msg=key)


def test_live_apply_and_remove_on_a_model(tmp_path):
    """apply_adapter on a live model gives PEFT's merged weights; remove_adapter restores the original bit for bit."""
    from randlora_io import apply_adapter, remove_adapter

    base, adapter = make_vera(tmp_path, tiny_llama(), save_projection=False)
    expected = peft_merged(base, adapter)
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    keys = apply_adapter(model, adapter)
    assert len(keys) == 14
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    remove_adapter(model, adapter)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_saved_projections_under_save_projection_false_are_ignored_as_peft_ignores_them(tmp_path):
    """A config saying save_projection false while the weights still hold vera_A / vera_B (hand-edited): PEFT keeps
    its projections out of the state dict, ignores the saved ones and regenerates from the key; so does the merge
    (before: the saved ones were used, exit 0 with 4 weights off PEFT)."""
    base, adapter = make_vera(tmp_path, tiny_llama(), seed=4, save_projection=True, targets=["q_proj", "v_proj"])
    weights, cfg_path = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    tensors = load_file(str(weights))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 2  # not the seed's draw: PEFT must not use it
    save_file(tensors, str(weights))
    cfg = json.loads(cfg_path.read_text())
    cfg["save_projection"] = False
    cfg_path.write_text(json.dumps(cfg))
    assert_merges_like_peft(tmp_path, base, adapter, ["q_proj", "v_proj"])


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("via_file", [True, False])
def test_saved_float32_projections_on_a_half_base_convert_to_peft_vera_exactly(tmp_path, half, via_file):
    """PEFT uses saved float32 projections unrounded on a bf16/fp16 model, but rounds regenerated ones: a dir
    converted from such an adapter must keep them (before: written without them, 14 weights off PEFT's, exit 0).
    Via the randlora file (converted with the half base, then to peft-vera with no base) and directly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = make_vera(tmp_path, tiny_llama(), seed=7, save_projection=True, targets=LLAMA_TARGETS)
    tiny_llama().to(half).save_pretrained(tmp_path / "half")
    if via_file:
        run_cli("convert", adapter, tmp_path / "v.safetensors", "--to", "randlora", "--base", tmp_path / "half")
        run_cli("convert", tmp_path / "v.safetensors", tmp_path / "back", "--to", "peft-vera")
    else:
        run_cli("convert", adapter, tmp_path / "back", "--to", "peft-vera", "--base", tmp_path / "half")

    def merged(adapter_dir):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "half", dtype="auto")
        return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()

    want, got = merged(adapter), merged(tmp_path / "back")
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    run_cli("merge", tmp_path / "half", tmp_path / ("v.safetensors" if via_file else "back"), "-o", tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, value in out.items():
        assert torch.equal(value, want[key]), key


def test_a_no_cast_file_to_peft_vera_without_a_base_says_where_it_is_exact(tmp_path):
    base, adapter = make_vera(tmp_path, tiny_llama(), seed=3, save_projection=False, targets=["q_proj"])
    run_cli("convert", adapter, tmp_path / "v.safetensors", "--to", "randlora", "--base", base)
    result = run_cli("convert", tmp_path / "v.safetensors", tmp_path / "back", "--to", "peft-vera")
    assert "exact on a float32 model" in result.stderr and "--save-projection" in result.stderr
    assert "base_model.vera_A" not in load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
