"""Streaming merge against PEFT's merge_and_unload: state dicts, logits, sharding, weights, unmerge, bad inputs."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file
from tiny_models import peft_lora, peft_randlora, tiny_gpt2, tiny_llama

from randlora_io.format.adapter import read_adapter

GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]


def _load_state(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _peft_merged_state(pm):
    merged = pm.merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _digest(path):
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at magnitude |x| (exact powers of two)."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    return torch.pow(2.0, torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(dtype).tiny))) - mant)


def _compare(ours, theirs, dtype, base=None):
    for key, want in theirs.items():
        if key not in ours:
            continue  # tied lm_head: saved once by transformers
        got = ours[key]
        assert got.dtype == want.dtype, key
        if dtype == torch.float32:
            denom = want.float().norm().clamp_min(1e-12)
            assert float((got.float() - want.float()).norm() / denom) <= 1e-5, key
        else:
            # PEFT rounds ΔW to bf16, then rounds W + ΔW again: the two agree within 1 ulp of the operands'
            # magnitude (where W and ΔW cancel, PEFT's first rounding dominates the tiny result).
            w0 = base[key].float()
            magnitude = torch.maximum(torch.maximum(w0.abs(), want.float().abs()), (want.float() - w0).abs())
            assert bool(((got.float() - want.float()).abs() <= _ulp(magnitude, dtype)).all()), key


def _assert_correctly_rounded(ours, base, deltas, dtype):
    """Ours is W + ΔW computed in float32 and rounded once: within half an ulp of the exact float64 sum."""
    for key, delta in deltas.items():
        exact = base[key].double() + delta.double()
        err = (ours[key].double() - exact).abs()
        # slack: ΔW itself is computed in float32, with error relative to the operands' magnitude, not the sum's
        operands = torch.maximum(base[key].double().abs(), delta.double().abs())
        ratio = float((err / (0.5 * _ulp(exact.float(), dtype).double() + 1e-6 * operands + 1e-30)).max())
        assert ratio <= 1.0, (key, ratio)


MERGE_CASES = [
    ("llama", "dense", torch.float32, None), ("llama", "sparse", torch.float32, None),
    ("llama", "very_sparse", torch.float32, "20KB"), ("llama", "dense", torch.bfloat16, "30KB"),
    ("gpt2", "dense", torch.float32, None),
]


@pytest.mark.parametrize("arch,kind,dtype,shard", MERGE_CASES)
def test_merge_randlora_equals_peft(tmp_path, arch, kind, dtype, shard):
    gpt2 = arch == "gpt2"
    make = tiny_gpt2 if gpt2 else tiny_llama
    base = tmp_path / "base"
    kwargs = {"max_shard_size": shard} if shard else {}
    make(dtype=dtype).save_pretrained(base, **kwargs)
    if shard:
        assert (base / "model.safetensors.index.json").exists()
    digest = _digest(base)
    pm = peft_randlora(make(dtype=dtype), r=6, seed=3, sparse=kind == "sparse", very_sparse=kind == "very_sparse",
                       targets=GPT2_TARGETS if gpt2 else None, fan_in_fan_out=gpt2)
    pm.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_logits = pm(input_ids=ids).logits
    expected = _peft_merged_state(pm)

    # straight from the PEFT dir, and through our file: both must equal PEFT
    run_cli("merge", base, tmp_path / "peft", "-o", tmp_path / "out1")
    run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
    run_cli("merge", base, tmp_path / "a.safetensors", "-o", tmp_path / "out2")
    base_state = _load_state(base)
    for out in ("out1", "out2"):
        _compare(_load_state(tmp_path / out), expected, dtype, base_state)
    if dtype != torch.float32:
        adapter = read_adapter(tmp_path / "a.safetensors")
        _assert_correctly_rounded(_load_state(tmp_path / "out2"), base_state,
                                  {k: adapter.delta(k) for k in adapter.layers}, dtype)
    assert _digest(base) == digest  # BASE untouched
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out1", dtype=dtype)
    with torch.no_grad():
        got_logits = merged(input_ids=ids).logits
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(got_logits.float(), want_logits.float(), atol=tol, rtol=tol)
    if shard:
        assert sorted(p.name for p in (tmp_path / "out1").glob("*.safetensors")) == \
            sorted(p.name for p in base.glob("*.safetensors"))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_lora_equals_peft(tmp_path, use_rslora):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    pm = peft_lora(tiny_llama(), r=4, use_rslora=use_rslora)
    pm.save_pretrained(tmp_path / "lora")
    expected = _peft_merged_state(pm)
    run_cli("merge", base, tmp_path / "lora", "-o", tmp_path / "out")
    _compare(_load_state(tmp_path / "out"), expected, torch.float32)


@pytest.mark.parametrize("method", ["randlora", "lora"])
def test_adapter_targeting_lm_head_equals_peft(tmp_path, method):
    """PEFT saves a targeted lm_head's own weight beside the adapter (``.base_layer.weight``): it is checked against
    BASE, not refused, and the merge (from the PEFT dir and, for RandLoRA, through our file) equals PEFT's."""
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    targets = ["q_proj", "lm_head"]
    pm = (peft_randlora(tiny_llama(), r=6, seed=2, targets=targets) if method == "randlora"
          else peft_lora(tiny_llama(), r=4, targets=targets))
    pm.save_pretrained(tmp_path / "peft")
    assert any(".base_layer." in k for k in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    expected = _peft_merged_state(pm)
    run_cli("merge", base, tmp_path / "peft", "-o", tmp_path / "out")
    merged = _load_state(tmp_path / "out")
    assert not torch.equal(merged["lm_head.weight"], _load_state(base)["lm_head.weight"])
    _compare(merged, expected, torch.float32)
    if method == "randlora":
        run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
        run_cli("merge", base, tmp_path / "a.safetensors", "-o", tmp_path / "out2")
        _compare(_load_state(tmp_path / "out2"), expected, torch.float32)


def test_lm_head_copy_unlike_the_base_and_tied_lm_head_are_refused(tmp_path):
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    peft_randlora(tiny_llama(), r=6, seed=2, targets=["q_proj", "lm_head"]).save_pretrained(tmp_path / "peft")
    other = tmp_path / "other"  # same architecture and shapes, another lm_head
    shutil.copytree(base, other)
    state = _load_state(base)
    state["lm_head.weight"] = state["lm_head.weight"] + 1e-3
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    _merge_fails(tmp_path, other, tmp_path / "peft", "lm_head.weight", "differs from the base")
    result = run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", other,
                     check=False)
    assert_one_line_error(result, "differs from the base")
    assert not (tmp_path / "a.safetensors").exists()

    tied = tmp_path / "tied"
    config = tiny_llama().config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tied)
    assert "lm_head.weight" not in _load_state(tied)
    # into a tied base the lm_head ΔW goes to the one shared tensor (as PEFT merges it, sources/ties.py), and the
    # adapter's saved lm_head copy is checked against that tensor: here trained on another (untied) base, refused
    _merge_fails(tmp_path, tied, tmp_path / "peft", "'model.embed_tokens.weight'", "trained on another base")


def test_two_adapters_weighted_and_unmerge(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    for name, seed in (("p1", 1), ("p2", 2)):
        peft_randlora(tiny_llama(), r=6, seed=seed, scale_seed=seed + 10).save_pretrained(tmp_path / name)
        run_cli("convert", tmp_path / name, tmp_path / f"{name}.safetensors", "--to", "randlora", "--base", base)
    a1, a2 = (read_adapter(tmp_path / f"p{i}.safetensors") for i in (1, 2))
    run_cli("merge", base, tmp_path / "p1.safetensors", tmp_path / "p2.safetensors", "--weight", "0.7",
            "--weight", "0.3", "-o", tmp_path / "both")
    base_state, both = _load_state(base), _load_state(tmp_path / "both")
    for key in a1.layers:
        want = base_state[key].double() + 0.7 * a1.delta(key).double() + 0.3 * a2.delta(key).double()
        assert float((both[key].double() - want).norm() / want.norm()) <= 1e-6
    run_cli("unmerge", tmp_path / "both", tmp_path / "p1.safetensors", tmp_path / "p2.safetensors", "--weight", "0.7",
            "--weight", "0.3", "-o", tmp_path / "back")
    back = _load_state(tmp_path / "back")
    for key, tensor in base_state.items():
        assert float((back[key] - tensor).norm() / tensor.norm()) <= 1e-6, key
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "both" / name).read_bytes() == (base / name).read_bytes()


def test_merge_into_state_dict_matches_the_cli(tmp_path):
    from randlora_io.merge.state_dict import merge_into_state_dict

    base = tmp_path / "base"
    model = tiny_llama()
    model.save_pretrained(base)
    peft_randlora(tiny_llama(), r=6, seed=4).save_pretrained(tmp_path / "p")
    run_cli("convert", tmp_path / "p", tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
    run_cli("merge", base, tmp_path / "a.safetensors", "-o", tmp_path / "out")
    merged = merge_into_state_dict(_load_state(base), read_adapter(tmp_path / "a.safetensors"))
    for key, tensor in _load_state(tmp_path / "out").items():
        assert torch.equal(merged[key], tensor), key


# ---------------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture
def setup(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    peft_randlora(tiny_llama(), r=6, seed=3).save_pretrained(tmp_path / "peft")
    run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
    return base, tmp_path / "a.safetensors"


def _merge_fails(tmp_path, base, adapter, *fragments, extra=()):
    digest = _digest(base)
    out = tmp_path / "out"
    result = run_cli("merge", base, adapter, "-o", out, *extra, check=False)
    assert_one_line_error(result, *fragments)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert _digest(base) == digest


def test_base_of_another_architecture(tmp_path, setup):
    _, adapter = setup
    other = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(other)
    _merge_fails(tmp_path, other, adapter, "does not have")


def test_shape_mismatch(tmp_path, setup):
    _, adapter = setup
    bigger = tmp_path / "bigger"
    tiny_llama(hidden=32, intermediate=48).save_pretrained(bigger)
    _merge_fails(tmp_path, bigger, adapter, "shape")


def test_nan_result_is_refused(tmp_path, setup):
    base, _ = setup
    from randlora_io.convert.dense import write_dense

    state = _load_state(base)
    key = "model.layers.0.self_attn.q_proj.weight"
    from safetensors.torch import save_file

    from randlora_io.sources.dense import METADATA_KEY

    save_file({key: torch.full_like(state[key], float("inf"))}, str(tmp_path / "inf.safetensors"),  # write_dense refuses
              metadata={METADATA_KEY: json.dumps({"format_version": "1.0"})})
    # the dense reader already refuses non-finite deltas; a huge finite one overflows in the merged weight instead
    _merge_fails(tmp_path, base, tmp_path / "inf.safetensors", "nan")
    write_dense({key: torch.full_like(state[key], 3e38)}, tmp_path / "big.safetensors")
    _merge_fails(tmp_path, base, tmp_path / "big.safetensors", "nan", extra=("--weight", "2"))


def test_existing_out_and_truncated_shard(tmp_path, setup):
    base, adapter = setup
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "exists")
    assert (tmp_path / "out" / "keep").read_text() == "x"
    (tmp_path / "out" / "keep").unlink()
    (tmp_path / "out").rmdir()
    shard = base / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    _merge_fails(tmp_path, base, adapter, "truncated")


def test_missing_layer_and_unreadable_or_garbage_shard(tmp_path, setup, monkeypatch):
    """A base lacking one adapted weight, a shard that cannot be opened, a shard of random bytes: one line each."""
    import builtins
    import os

    from safetensors.torch import save_file

    base, adapter = setup
    key = next(iter(read_adapter(adapter).layers))
    lacking = tmp_path / "lacking"
    shutil.copytree(base, lacking)
    state = _load_state(base)
    del state[key]
    save_file(state, str(lacking / "model.safetensors"), metadata={"format": "pt"})
    _merge_fails(tmp_path, lacking, adapter, "does not have", key)

    shard = str(base / "model.safetensors")
    real_open, real_os_open = builtins.open, os.open

    def refuse(opener):
        def guarded(path, *args, **kwargs):
            if os.fspath(path) == shard:
                raise PermissionError(13, "Permission denied", shard)
            return opener(path, *args, **kwargs)
        return guarded

    with monkeypatch.context() as patched:  # as root chmod 000 would not stop a read: refuse the opens instead
        patched.setattr(builtins, "open", refuse(real_open))
        patched.setattr(os, "open", refuse(real_os_open))
        _merge_fails(tmp_path, base, adapter, "model.safetensors", "cannot read", "permission denied")
    garbage = tmp_path / "garbage"
    shutil.copytree(base, garbage)
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    _merge_fails(tmp_path, garbage, adapter, "model.safetensors", "not a valid safetensors file")


def test_bad_index_files(tmp_path, setup):
    base, adapter = setup
    sharded = tmp_path / "sharded"
    tiny_llama().save_pretrained(sharded, max_shard_size="20KB")
    index_path = sharded / "model.safetensors.index.json"
    good = json.loads(index_path.read_text())
    first_key = next(iter(good["weight_map"]))
    other_shard = next(s for s in good["weight_map"].values() if s != good["weight_map"][first_key])
    for mutate, fragment in [
        (lambda ix: ix["weight_map"].update({first_key: "../evil.safetensors"}), "plain file name"),
        (lambda ix: ix["weight_map"].update({first_key: "/etc/passwd.safetensors"}), "plain file name"),
        (lambda ix: ix["weight_map"].update({first_key: "pytorch_model-1.bin"}), "pickle"),
        (lambda ix: ix["weight_map"].update({first_key: "model-missing.safetensors"}), "missing"),
        (lambda ix: ix["weight_map"].update({first_key: other_shard}), "but it is in"),
    ]:
        index = json.loads(json.dumps(good))
        mutate(index)
        index_path.write_text(json.dumps(index))
        _merge_fails(tmp_path, sharded, adapter, fragment)
    index_path.write_text(json.dumps(good))


def test_same_adapter_twice_and_pickle_base(tmp_path, setup):
    base, adapter = setup
    digest = _digest(base)
    result = run_cli("merge", base, adapter, adapter, "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "twice")
    assert _digest(base) == digest
    pickled = tmp_path / "pkl"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    _merge_fails(tmp_path, pickled, adapter, "pickle")


def test_dtype_float32_keeps_the_unrounded_sum(tmp_path):
    """--dtype float32 from a bf16 base: W + ΔW in float32 with no rounding to bf16 on the way."""
    base = tmp_path / "base"
    tiny_llama(dtype=torch.bfloat16).save_pretrained(base)
    peft_randlora(tiny_llama(dtype=torch.bfloat16), r=6, seed=5).save_pretrained(tmp_path / "peft")
    run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
    run_cli("merge", base, tmp_path / "a.safetensors", "--dtype", "float32", "-o", tmp_path / "out")
    adapter, base_state, got = read_adapter(tmp_path / "a.safetensors"), _load_state(base), _load_state(tmp_path / "out")
    assert all(t.dtype == torch.float32 for t in got.values() if t.is_floating_point())
    for key in adapter.layers:
        exact = base_state[key].double() + adapter.delta(key).double()
        assert float((got[key].double() - exact).norm() / exact.norm()) <= 1e-6, key
        assert not torch.equal(got[key], got[key].to(torch.bfloat16).float()), key  # not rounded through bf16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype" if "dtype" in json.loads(
        (base / "config.json").read_text()) else "torch_dtype"] == "float32"


def test_precision_bf16_is_within_a_bf16_rounding_of_the_exact_update(tmp_path):
    """The opt-in bf16 GEMM: ΔW rounded at bf16 precision (like PEFT's bf16 merge), nothing worse; logits match PEFT."""
    base = tmp_path / "base"
    tiny_llama(dtype=torch.bfloat16).save_pretrained(base)
    pm = peft_randlora(tiny_llama(dtype=torch.bfloat16), r=6, seed=4)
    pm.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_logits = pm(input_ids=ids).logits
    run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
    run_cli("merge", base, tmp_path / "a.safetensors", "--precision", "bf16", "--dtype", "float32",
            "-o", tmp_path / "out")
    adapter, base_state, got = read_adapter(tmp_path / "a.safetensors"), _load_state(base), _load_state(tmp_path / "out")
    worst = 0.0
    for key in adapter.layers:
        delta = adapter.delta(key).double()
        err = (got[key].double() - (base_state[key].double() + delta)).norm() / delta.norm()
        worst = max(worst, float(err))
    assert 0 < worst <= 2**-7, worst  # bf16-level, and not the exact fp32 result
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        got_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)(input_ids=ids).logits
    assert torch.allclose(got_logits.float(), want_logits.float(), atol=5e-2, rtol=5e-2)


def test_full_disk_mid_write(tmp_path, setup, monkeypatch):
    """ENOSPC while a shard is being written: one line naming the file, OUT absent, no temp dir left, BASE intact."""
    import errno
    import os

    base, adapter = setup
    digest = _digest(base)
    real_write, calls = os.write, []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.delattr(os, "copy_file_range", raising=False)  # every byte goes through os.write
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "No space left on device")
    assert ".safetensors" in result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert _digest(base) == digest
