"""Converters against real PEFT 0.21.2: lossless RandLoRA round trips, LoRA → dense, fits and SVD, hostile inputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from tiny_models import peft_layer_deltas, peft_lora, peft_randlora, tiny_gpt2, tiny_llama

from randlora_io.format.adapter import build_adapter, read_adapter
from randlora_io.sources.dense import read_dense
from randlora_io.convert.dense import write_dense
from randlora_io.sources.randlora_file import RandloraSource

GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]


def _save_base(model, path):
    model.save_pretrained(path)
    return path


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


RANDLORA_CASES = [
    ("dense", False, torch.float32, "llama"), ("dense", True, torch.float32, "llama"),
    ("sparse", False, torch.float32, "llama"), ("very_sparse", True, torch.float32, "llama"),
    ("dense", False, torch.bfloat16, "llama"), ("dense", False, torch.float32, "gpt2"),
]


@pytest.mark.parametrize("kind,save_projection,dtype,arch", RANDLORA_CASES)
def test_peft_randlora_to_randlora_and_back(tmp_path, kind, save_projection, dtype, arch):
    gpt2 = arch == "gpt2"
    make = tiny_gpt2 if gpt2 else tiny_llama
    base = _save_base(make(dtype=dtype), tmp_path / "base")
    pm = peft_randlora(make(dtype=dtype), r=6, seed=11, sparse=kind == "sparse", very_sparse=kind == "very_sparse",
                       save_projection=save_projection, targets=GPT2_TARGETS if gpt2 else None, fan_in_fan_out=gpt2)
    pm.save_pretrained(tmp_path / "peft")
    expected = peft_layer_deltas(pm)

    out = run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", base).output
    assert "layers" in out
    adapter = read_adapter(tmp_path / "a.safetensors")
    assert adapter.header.generator.name == "peft" and adapter.header.generator.kind == kind
    for key, delta in expected.items():
        assert _rel(adapter.delta(key), delta) <= 1e-6, key

    # back to a PEFT dir; PEFT loads it and its logits equal the original adapter's
    run_cli("convert", tmp_path / "a.safetensors", tmp_path / "peft2", "--to", "peft-randlora")
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(make(dtype=dtype), tmp_path / "peft2")
    ids = torch.randint(0, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = pm(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert torch.equal(want, got) if dtype == torch.float32 else torch.allclose(want, got, atol=1e-2)


def test_randlora_file_is_40x_smaller_than_peft_with_saved_projection(tmp_path):
    base = _save_base(tiny_llama(), tmp_path / "base")
    pm = peft_randlora(tiny_llama(), r=32, seed=5, save_projection=True)
    pm.save_pretrained(tmp_path / "peft")
    run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
    peft_bytes = sum(f.stat().st_size for f in (tmp_path / "peft").iterdir())
    ratio = peft_bytes / (tmp_path / "a.safetensors").stat().st_size
    assert ratio >= 40, ratio


def test_philox_adapter_to_peft_loads_with_saved_bases(tmp_path):
    model = tiny_llama()
    base = _save_base(model, tmp_path / "base")
    # fit a philox adapter to a PEFT RandLoRA delta, then export to PEFT (bases must be saved)
    pm = peft_randlora(tiny_llama(), r=8, seed=1)
    pm.save_pretrained(tmp_path / "peft")
    run_cli("convert", tmp_path / "peft", tmp_path / "d.safetensors", "--to", "dense", "--base", base)
    run_cli("convert", tmp_path / "d.safetensors", tmp_path / "ph.safetensors", "--to", "randlora", "--rank", "8")
    run_cli("convert", tmp_path / "ph.safetensors", tmp_path / "peft_ph", "--to", "peft-randlora")
    assert json.loads((tmp_path / "peft_ph" / "adapter_config.json").read_text())["save_projection"] is True
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft_ph")
    ours = read_adapter(tmp_path / "ph.safetensors")
    for key, delta in peft_layer_deltas(reloaded).items():
        assert _rel(delta, ours.delta(key)) <= 1e-5, key


@pytest.mark.parametrize("use_rslora,patterns", [(False, False), (True, False), (False, True)])
def test_peft_lora_to_dense_equals_peft_delta(tmp_path, use_rslora, patterns):
    kwargs = {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3.0}} if patterns else {}
    pm = peft_lora(tiny_llama(), r=4, alpha=8.0, use_rslora=use_rslora, **kwargs)
    pm.save_pretrained(tmp_path / "lora")
    run_cli("convert", tmp_path / "lora", tmp_path / "d.safetensors", "--to", "dense")
    deltas = read_dense(tmp_path / "d.safetensors")
    expected = peft_layer_deltas(pm)
    assert set(deltas) == set(expected)
    for key in expected:
        assert _rel(deltas[key], expected[key]) <= 1e-6, key


def test_gpt2_lora_fan_in_fan_out_to_dense(tmp_path):
    pm = peft_lora(tiny_gpt2(), r=4, targets=GPT2_TARGETS, fan_in_fan_out=True)
    pm.save_pretrained(tmp_path / "lora")
    run_cli("convert", tmp_path / "lora", tmp_path / "d.safetensors", "--to", "dense")
    deltas, expected = read_dense(tmp_path / "d.safetensors"), peft_layer_deltas(pm)
    for key in expected:
        assert deltas[key].shape == expected[key].shape and _rel(deltas[key], expected[key]) <= 1e-6


def test_dense_of_a_randlora_delta_is_recovered(tmp_path):
    from test_format import make_adapter

    shapes = {"l0.weight": ((40, 24), False), "l1.weight": ((24, 40), False), "l2.weight": ((24, 24), False)}
    original = make_adapter(seed=9, r=4, shapes=shapes)
    source = RandloraSource(original)
    write_dense({k: source.delta(k) for k in shapes}, tmp_path / "d.safetensors")
    result = run_cli("convert", tmp_path / "d.safetensors", tmp_path / "fit.safetensors", "--to", "randlora",
                     "--rank", "4", "--seed", "9")
    fitted = read_adapter(tmp_path / "fit.safetensors")
    for key in shapes:
        assert _rel(fitted.delta(key), source.delta(key)) <= 1e-4, key
    assert "max error" in result.output


def test_random_full_rank_fit_reports_the_measured_error(tmp_path):
    g = torch.Generator().manual_seed(3)
    deltas = {"a.weight": torch.randn(32, 20, generator=g), "b.weight": torch.randn(20, 20, generator=g)}
    write_dense(deltas, tmp_path / "d.safetensors")
    from randlora_io.convert.run import convert

    report = convert(tmp_path / "d.safetensors", tmp_path / "f.safetensors", "randlora", rank=4, seed=1)
    fitted = read_adapter(tmp_path / "f.safetensors")
    for key, target in deltas.items():
        independent = float((fitted.delta(key).double() - target.double()).norm() / target.double().norm())
        assert abs(report.errors[key] - independent) <= 1e-6 * max(1.0, independent)
        assert 0 < independent < 1
    bound = report.overall_error / 2
    result = run_cli("convert", tmp_path / "d.safetensors", tmp_path / "g.safetensors", "--to", "randlora",
                     "--rank", "4", "--max-error", f"{bound}", check=False)
    assert_one_line_error(result, "max-error")
    assert not (tmp_path / "g.safetensors").exists()


def test_to_peft_lora_is_within_1pct_of_eckart_young(tmp_path):
    from test_format import make_adapter

    shapes = {"model.a.weight": ((48, 32), False), "model.b.weight": ((32, 48), False)}
    adapter = make_adapter(seed=2, r=4, shapes=shapes)
    from randlora_io.format.adapter import write_adapter

    write_adapter(adapter, tmp_path / "a.safetensors")
    k = 6
    result = run_cli("convert", tmp_path / "a.safetensors", tmp_path / "lora", "--to", "peft-lora", "--rank", k)
    assert "kept energy" in result.output
    from randlora_io.sources.peft_lora import read_peft_lora

    lora = read_peft_lora(tmp_path / "lora")
    for key in shapes:
        target = adapter.delta(key).double()
        s = torch.linalg.svdvals(target)
        optimal = float(s[k:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        got = float((lora[key].delta().double() - target).norm() / target.norm())
        assert got <= optimal * 1.01 + 1e-9, (got, optimal)


def test_randlora_file_to_dense_matches_reference(tmp_path):
    from test_format import make_adapter

    from randlora_io.format.adapter import write_adapter

    adapter = make_adapter(seed=4, r=3)
    write_adapter(adapter, tmp_path / "a.safetensors")
    run_cli("convert", tmp_path / "a.safetensors", tmp_path / "d.safetensors", "--to", "dense")
    deltas = read_dense(tmp_path / "d.safetensors")
    for key in adapter.layers:
        assert torch.equal(deltas[key], adapter.delta(key))


# ---------------------------------------------------------------------------------------------------- hostile inputs


@pytest.fixture
def peft_dir_and_base(tmp_path):
    base = _save_base(tiny_llama(), tmp_path / "base")
    pm = peft_randlora(tiny_llama(), r=4, seed=2, save_projection=True)
    pm.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", base


def _convert_fails(tmp_path, src, base, *fragments):
    dst = tmp_path / "out.safetensors"
    result = run_cli("convert", src, dst, "--to", "randlora", "--base", base, check=False)
    assert_one_line_error(result, *fragments)
    assert not dst.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_truncated_adapter_weights(tmp_path, peft_dir_and_base):
    src, base = peft_dir_and_base
    weights = src / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _convert_fails(tmp_path, src, base, "truncated")


def test_config_and_weights_disagree(tmp_path, peft_dir_and_base):
    src, base = peft_dir_and_base
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["r"] = 8
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    _convert_fails(tmp_path, src, base, "disagree")


def test_nan_scales(tmp_path, peft_dir_and_base):
    from safetensors.torch import load_file, save_file

    src, base = peft_dir_and_base
    tensors = load_file(src / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("randlora_gamma"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, src / "adapter_model.safetensors")
    _convert_fails(tmp_path, src, base, "nan")


def test_saved_projection_mismatch_refused_or_kept(tmp_path, peft_dir_and_base):
    from safetensors.torch import load_file, save_file

    src, base = peft_dir_and_base
    tensors = load_file(src / "adapter_model.safetensors")
    tensors["base_model.randlora_B"] = tensors["base_model.randlora_B"] * 1.5
    save_file(tensors, src / "adapter_model.safetensors")
    _convert_fails(tmp_path, src, base, "differ")
    run_cli("convert", src, tmp_path / "kept.safetensors", "--to", "randlora", "--base", base, "--keep-bases")
    kept = read_adapter(tmp_path / "kept.safetensors")
    assert kept.header.stored_bases and torch.equal(kept.bases().B, tensors["base_model.randlora_B"].flatten(1))


def test_pickle_bin_is_refused(tmp_path, peft_dir_and_base):
    src, base = peft_dir_and_base
    os.remove(src / "adapter_model.safetensors")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    import pickle

    (src / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    _convert_fails(tmp_path, src, base, "refused")
    assert not (tmp_path / "pwned").exists()


def test_unknown_peft_type(tmp_path, peft_dir_and_base):
    src, base = peft_dir_and_base
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["peft_type"] = "VERA"
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    _convert_fails(tmp_path, src, base, "peft_type")


def test_module_missing_from_base(tmp_path, peft_dir_and_base):
    src, _ = peft_dir_and_base
    other = _save_base(tiny_gpt2(), tmp_path / "gpt2")
    _convert_fails(tmp_path, src, other, "does not have")


def test_existing_output_is_refused_and_untouched(tmp_path, peft_dir_and_base):
    src, base = peft_dir_and_base
    dst = tmp_path / "exists.safetensors"
    dst.write_bytes(b"keep me")
    assert_one_line_error(run_cli("convert", src, dst, "--to", "randlora", "--base", base, check=False), "exists")
    assert dst.read_bytes() == b"keep me"


def test_build_adapter_refuses_bad_rank():
    from randlora_io.errors import HeaderError
    from randlora_io.format.spec import GeneratorSpec

    with pytest.raises(HeaderError, match="rank"):
        build_adapter(generator=GeneratorSpec(name="philox", kind="dense", seed=0), rank=0, alpha=1.0,
                      layers={"w": ((4, 4), False)}, lambdas={"w": torch.zeros(0, 4)}, gammas={"w": torch.zeros(4, 4)})


# ------------------------------------------------------------------ issue #14 items 2, 3, 8: PEFT's bases exactly


def _peft_deltas_close(adapter, expected, bound=1e-6):
    for key, want in expected.items():
        assert _rel(adapter.delta(key), want) <= bound, (key, _rel(adapter.delta(key), want))


@pytest.mark.parametrize("kind", ["sparse", "very_sparse"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_convert_with_base_keeps_peft_cast_of_the_bases_to_the_base_dtype(tmp_path, kind, dtype):
    """PEFT rounds its fp32 sparse bases to the base layers' dtype: the converted file must record that cast."""
    base = _save_base(tiny_llama(dtype=dtype), tmp_path / "base")
    pm = peft_randlora(tiny_llama(dtype=dtype), r=6, seed=13, sparse=kind == "sparse",
                       very_sparse=kind == "very_sparse")
    pm.save_pretrained(tmp_path / "peft")
    run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
    adapter = read_adapter(tmp_path / "a.safetensors")
    assert adapter.header.generator.cast_dtype == str(dtype).removeprefix("torch.")
    _peft_deltas_close(adapter, peft_layer_deltas(pm))


@pytest.fixture
def fp16_drawn(monkeypatch):
    """PEFT on a machine without bf16 (V100, T4, older MPS): ``accelerate.is_bf16_available()`` is False."""
    import peft.tuners.randlora.model as randlora_model

    monkeypatch.setattr(randlora_model, "is_bf16_available", lambda *a, **k: False)


def test_peft_dense_bases_drawn_in_float16_need_and_take_the_draw_dtype(tmp_path, fp16_drawn):
    from randlora_io.convert.run import convert
    from test_merge import _compare, _load_state, _peft_merged_state

    base = _save_base(tiny_llama(), tmp_path / "base")
    pm = peft_randlora(tiny_llama(), r=6, seed=21)
    assert pm.base_model.randlora_A["default"].dtype == torch.float32  # cast to the fp32 model, drawn in fp16
    pm.save_pretrained(tmp_path / "peft")
    expected_deltas = peft_layer_deltas(pm)
    expected = _peft_merged_state(pm)

    # nothing in the dir says fp16: the default assumption is said in one line, with the way to choose the other
    result = run_cli("merge", base, tmp_path / "peft", "-o", tmp_path / "assumed")
    assert "assumed drawn in bfloat16" in result.stderr and "--peft-draw-dtype float16" in result.stderr
    with pytest.raises(AssertionError):
        _compare(_load_state(tmp_path / "assumed"), expected, torch.float32)

    result = run_cli("merge", base, tmp_path / "peft", "-o", tmp_path / "out", "--peft-draw-dtype", "float16")
    assert "assumed" not in result.stderr
    _compare(_load_state(tmp_path / "out"), expected, torch.float32)
    run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", base,
            "--peft-draw-dtype", "float16")
    adapter = read_adapter(tmp_path / "a.safetensors")
    assert adapter.header.generator.draw_dtype == "float16"
    _peft_deltas_close(adapter, expected_deltas)
    convert(tmp_path / "peft", tmp_path / "lib.safetensors", "randlora", base=base, peft_draw_dtype="float16")
    _peft_deltas_close(read_adapter(tmp_path / "lib.safetensors"), expected_deltas)

    # back to PEFT: a bf16-capable PEFT would redraw in bf16, so the fp16 bases are saved in the dir
    run_cli("convert", tmp_path / "a.safetensors", tmp_path / "peft2", "--to", "peft-randlora")
    assert json.loads((tmp_path / "peft2" / "adapter_config.json").read_text())["save_projection"] is True
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft2")
    for key, delta in peft_layer_deltas(reloaded).items():
        assert _rel(delta, expected_deltas[key]) <= 1e-6, key


def test_saved_float16_bases_decide_the_draw_dtype(tmp_path, fp16_drawn):
    base = _save_base(tiny_llama(), tmp_path / "base")
    pm = peft_randlora(tiny_llama(), r=6, seed=22, save_projection=True)
    pm.save_pretrained(tmp_path / "peft")
    result = run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
    assert "assumed" not in result.stderr
    adapter = read_adapter(tmp_path / "a.safetensors")
    assert adapter.header.generator.draw_dtype == "float16" and not adapter.header.stored_bases
    _peft_deltas_close(adapter, peft_layer_deltas(pm))
    result = run_cli("convert", tmp_path / "peft", tmp_path / "b.safetensors", "--to", "randlora", "--base", base,
                     "--peft-draw-dtype", "bfloat16", check=False)
    assert_one_line_error(result, "drawn in bfloat16", "--keep-bases")


def _drop_per_layer_bases(peft_dir):
    from safetensors.torch import load_file, save_file

    weights = peft_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    kept = {k: v for k, v in tensors.items() if not (k.endswith((".randlora_A", ".randlora_B"))
                                                     and k.startswith("base_model.model."))}
    assert len(kept) < len(tensors) and "base_model.randlora_A" in kept
    save_file(kept, weights, metadata={"format": "pt"})


def test_peft_dir_with_only_the_shared_bases_reads_and_can_be_written(tmp_path):
    """PEFT after 0.21.2 saves base_model.randlora_A/B without a copy per layer; 0.21.2 loads that layout too."""
    from peft import PeftModel
    from test_merge import _compare, _load_state

    base = _save_base(tiny_gpt2(), tmp_path / "base")
    pm = peft_randlora(tiny_gpt2(), r=4, seed=6, save_projection=True, targets=GPT2_TARGETS, fan_in_fan_out=True)
    pm.save_pretrained(tmp_path / "peft")
    _drop_per_layer_bases(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft")
    expected_deltas = peft_layer_deltas(loaded)
    expected = {k: v.detach() for k, v in loaded.merge_and_unload().state_dict().items()}
    run_cli("merge", base, tmp_path / "peft", "-o", tmp_path / "out")
    _compare(_load_state(tmp_path / "out"), expected, torch.float32)
    run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
    _peft_deltas_close(read_adapter(tmp_path / "a.safetensors"), expected_deltas)

    run_cli("convert", tmp_path / "a.safetensors", tmp_path / "shared", "--to", "peft-randlora", "--save-projection",
            "--shared-projection-only")
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "shared" / "adapter_model.safetensors"))
    assert {"base_model.randlora_A", "base_model.randlora_B"} <= keys
    assert not any(k.endswith((".randlora_A", ".randlora_B")) and k.startswith("base_model.model.") for k in keys)
    reloaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "shared")
    for key, delta in peft_layer_deltas(reloaded).items():
        assert _rel(delta, expected_deltas[key]) <= 1e-6, key


def test_merge_into_state_dict_casts_sparse_bases_to_the_state_dict_dtype(tmp_path):
    """The library merge of a PEFT dir into a bf16 state dict: W + ΔW rounded once, ΔW with PEFT's bf16 bases."""
    from randlora_io.merge.state_dict import merge_into_state_dict

    pm = peft_randlora(tiny_llama(dtype=torch.bfloat16), r=6, seed=13, sparse=True)
    pm.save_pretrained(tmp_path / "peft")
    deltas = peft_layer_deltas(pm)
    state = tiny_llama(dtype=torch.bfloat16).state_dict()
    ours = merge_into_state_dict(state, tmp_path / "peft")
    differ = total = 0
    for key, delta in deltas.items():
        want = (state[key].float() + delta).to(torch.bfloat16)  # the correctly rounded sum
        differ, total = differ + int((ours[key] != want).sum()), total + want.numel()
    assert differ <= 1e-3 * total, differ / total  # only ties decided by ΔW's last fp32 bits (without the cast: 19 %)


def _lora_merged_state(adapter_dir) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    return {k: v.detach().clone() for k, v in
            PeftModel.from_pretrained(tiny_gpt2(), str(adapter_dir)).merge_and_unload().state_dict().items()}


def test_a_gpt2_dense_delta_records_its_orientation_and_exports_to_lora_without_the_base(tmp_path):
    """A dense delta is stored like its weights ((in, out) for GPT-2's Conv1D): the file records which, so
    `convert --to peft-lora` orients the LoRA right without --base. Before: exported transposed (exit 0, square
    c_proj wrong by 140 %)."""
    base = _save_base(tiny_gpt2(), tmp_path / "base")
    pm = peft_lora(tiny_gpt2(), r=4, targets=GPT2_TARGETS, fan_in_fan_out=True)
    pm.save_pretrained(tmp_path / "lora")
    want = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    run_cli("convert", tmp_path / "lora", tmp_path / "d.safetensors", "--to", "dense", "--base", base)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["randlora_dense_delta"])
    assert sorted(meta["fan_in_fan_out"]) == sorted(read_dense(tmp_path / "d.safetensors"))
    run_cli("convert", tmp_path / "d.safetensors", tmp_path / "exported", "--to", "peft-lora", "--max-error", "1e-5")
    got = _lora_merged_state(tmp_path / "exported")
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_a_dense_delta_without_recorded_orientation_needs_the_base_for_gpt2_names(tmp_path):
    """A delta file that records no orientation (written from a mapping, or before it was recorded): a Conv1D-named
    weight cannot be oriented without the base's config: refused in one line; with --base it is exact."""
    base = _save_base(tiny_gpt2(), tmp_path / "base")
    pm = peft_lora(tiny_gpt2(), r=4, targets=["c_proj"], fan_in_fan_out=True)
    want = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    pm = peft_lora(tiny_gpt2(), r=4, targets=["c_proj"], fan_in_fan_out=True)
    write_dense(peft_layer_deltas(pm), tmp_path / "d.safetensors")  # a mapping: no orientation recorded
    result = run_cli("convert", tmp_path / "d.safetensors", tmp_path / "x", "--to", "peft-lora", "--rank", "4",
                     check=False)
    assert_one_line_error(result, "Conv1D", "--base")
    assert not (tmp_path / "x").exists()
    run_cli("convert", tmp_path / "d.safetensors", tmp_path / "x", "--to", "peft-lora", "--rank", "4",
            "--base", base)
    got = _lora_merged_state(tmp_path / "x")
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_a_dense_delta_whose_recorded_orientation_contradicts_the_base_is_refused(tmp_path):
    base = _save_base(tiny_gpt2(), tmp_path / "base")
    pm = peft_lora(tiny_gpt2(), r=4, targets=["c_proj"], fan_in_fan_out=True)
    write_dense(peft_layer_deltas(pm), tmp_path / "d.safetensors", conv1d=[])  # claims: all Linear
    result = run_cli("convert", tmp_path / "d.safetensors", tmp_path / "x", "--to", "peft-lora", "--rank", "4",
                     "--base", base, check=False)
    assert_one_line_error(result, "records", "Conv1D")
    assert not (tmp_path / "x").exists()


def test_randlora_bases_saved_under_save_projection_false_are_ignored_as_peft_ignores_them(tmp_path):
    """save_projection false makes PEFT's basis buffers non-persistent: bases left in the weights (a hand-edited
    config) are ignored and regenerated on load. The merge does the same (before: refused as a seed mismatch)."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    base = _save_base(tiny_llama(), tmp_path / "base")
    peft_randlora(tiny_llama(), r=8, seed=3, save_projection=True).save_pretrained(tmp_path / "a")
    weights, cfg_path = tmp_path / "a" / "adapter_model.safetensors", tmp_path / "a" / "adapter_config.json"
    save_file({k: v * 2 if k.endswith("randlora_A") else v for k, v in load_file(str(weights)).items()}, str(weights))
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "save_projection": False}))
    want = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a")).merge_and_unload().state_dict()
    run_cli("merge", base, tmp_path / "a", "-o", tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, value in merged.items():
        assert torch.equal(value, want[key]), key


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_max_error_that_is_not_a_finite_number_is_refused_as_such(tmp_path, bad):
    base = _save_base(tiny_llama(), tmp_path / "base")
    peft_lora(tiny_llama(), targets=["q_proj"]).save_pretrained(tmp_path / "lora")
    result = run_cli("convert", tmp_path / "lora", tmp_path / "x", "--to", "peft-lora", "--max-error", bad,
                     "--base", base, check=False)
    assert_one_line_error(result, "must be a finite relative error")
    assert not (tmp_path / "x").exists()
