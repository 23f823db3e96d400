"""Training VeRA with the trainer (``RandloraConfig(method="vera")``): the memory-efficient autograd against the naive
formula and against real PEFT 0.21.2 (same bases from ``projection_prng_key``, same vectors → same logits and
gradients), save → the randlora file → merge / PEFT VeRA dir / load_into, resume, refusals, and a training run whose
merged model learned. On the code before this module ``method`` was not a config field (TypeError)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file
from test_train import IDS, logits, randomise, write_pattern_data
from tiny_models import LLAMA_TARGETS, peft_vera, tiny_gpt2, tiny_llama

from randlora_io.errors import AdapterShapeError, HeaderError
from randlora_io.format.vera_file import VeraAdapter, read_vera_adapter
from randlora_io.train import RandloraConfig, attach, load_into
from randlora_io.train.loop import train_causal_lm
from randlora_io.train.vera_function import vera_linear, vera_linear_reference, vera_update
from randlora_io.train.vera_layer import VeraTrainLayer

GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]


def vera(**kw) -> RandloraConfig:
    return RandloraConfig(method="vera", **kw)


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
@pytest.mark.parametrize("dropout_like", [False, True])
def test_gradients_equal_autograd_on_the_naive_formula_float64(shape, dropout_like):
    out_f, in_f = shape
    r = 5
    g = torch.Generator().manual_seed(sum(shape) + dropout_like)
    x = torch.randn(2, 3, in_f, dtype=torch.float64, generator=g, requires_grad=True)
    xd = (x * (torch.rand(x.shape, generator=g, dtype=torch.float64) > 0.3) * 1.4) if dropout_like else x
    W = torch.randn(out_f, in_f, dtype=torch.float64, generator=g)
    b = torch.randn(out_f, dtype=torch.float64, generator=g)
    lb = torch.randn(out_f, dtype=torch.float64, generator=g, requires_grad=True)
    ld = torch.randn(r, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(r, in_f + 3, dtype=torch.float64, generator=g)[:, :in_f]    # prefix slices, as layers use them
    B = torch.randn(out_f + 2, r, dtype=torch.float64, generator=g)[:out_f]
    grad = torch.randn(2, 3, out_f, dtype=torch.float64, generator=g)
    got = vera_linear(x, xd, W, b, lb, ld, A, B)
    want = vera_linear_reference(x, xd, W, b, lb, ld, A, B)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    ours = torch.autograd.grad(got, (x, lb, ld), grad, retain_graph=True)
    ref = torch.autograd.grad(want, (x, lb, ld), grad)
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)
    if not dropout_like:
        assert torch.autograd.gradcheck(lambda x_, lb_, ld_: vera_linear(x_, x_, W, b, lb_, ld_, A, B),
                                        (x, lb, ld))
    alone = vera_update(xd, lb, ld, A, B, (out_f, in_f))       # the adapter path alone (an FSDP-wrapped base)
    torch.testing.assert_close(alone, want - torch.nn.functional.linear(x, W, b), rtol=1e-11, atol=1e-11)


def test_backward_saves_one_activation_and_no_delta():
    """Only xd (and the parameters) are saved: no (T, r) or (T, out) intermediates, no ΔW."""
    out_f, in_f, r = 48, 32, 8
    x = torch.randn(4, 16, in_f, requires_grad=True)
    W, lb, ld = torch.randn(out_f, in_f), torch.zeros(out_f, requires_grad=True), torch.ones(r, requires_grad=True)
    A, B = torch.randn(r, in_f), torch.randn(out_f, r)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vera_linear(x, x, W, None, lb, ld, A, B)
    assert {id(t) for t in saved} <= {id(t) for t in (x, W, lb, ld, A, B)}


@pytest.mark.parametrize("make,targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, GPT2_TARGETS)])
def test_step_zero_outputs_equal_the_base_exactly(make, targets):
    base = logits(make())
    model = make()
    handle = attach(model, vera(r=8, target_modules=targets, seed=3))
    assert torch.equal(logits(model), base)
    assert all(isinstance(layer, VeraTrainLayer) for layer in handle.layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"vera_lambda_[bd]$", n) for n in trainable)
    if make is tiny_gpt2:
        assert all(layer.fan_in_fan_out for layer in handle.layers.values())


@pytest.mark.parametrize("make,targets,r,key", [
    (tiny_llama, LLAMA_TARGETS, 8, 0),
    (tiny_llama, LLAMA_TARGETS, 100, 2**63 + 5),      # r above every hidden dim; a key ≥ 2^63
    (tiny_gpt2, GPT2_TARGETS, 16, 11),                 # Conv1D: orientation from the layer
])
def test_forward_and_gradients_match_peft_vera_with_the_same_vectors(make, targets, r, key):
    peft_model = peft_vera(make(), r=r, seed=key, targets=targets)
    ours = make()
    handle = attach(ours, vera(r=r, target_modules=targets, generator="peft", seed=key))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            m = re.fullmatch(r"base_model\.model\.(.+)\.(vera_lambda_[bd])\.default", name)
            if m:
                getattr(handle.layers[m.group(1) + ".weight"], m.group(2)).copy_(p)
    want = logits(peft_model)
    assert not torch.allclose(want, logits(make()), atol=1e-3)           # the vectors do change the model
    torch.testing.assert_close(logits(ours), want, rtol=1e-5, atol=1e-5)
    peft_model(IDS, labels=IDS).loss.backward()
    ours(input_ids=IDS, labels=IDS).loss.backward()
    peft_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    for key_, layer in handle.layers.items():
        module = "base_model.model." + key_.removesuffix(".weight")
        for which in layer.SCALE_NAMES:
            expected = peft_grads[f"{module}.{which}.default"]
            torch.testing.assert_close(getattr(layer, which).grad, expected, rtol=1e-4,
                                       atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("make,targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, GPT2_TARGETS)])
@pytest.mark.parametrize("generator", ["philox", "peft"])
def test_save_merge_load_into_and_peft_vera_dir(make, targets, generator, tmp_path):
    make().save_pretrained(tmp_path / "base")
    model = make()
    base = logits(model)
    handle = attach(model, vera(r=8, target_modules=targets, generator=generator, seed=2**64 - 3))
    randomise(handle, scale=0.3)
    trained = logits(model)
    assert not torch.allclose(trained, base, atol=1e-3)
    path = tmp_path / "a.safetensors"
    adapter = handle.save(path)
    assert isinstance(adapter, VeraAdapter)
    on_disk = read_vera_adapter(path)   # bases regenerated from the seed and checked against the header
    assert on_disk.header.generator.method == "vera" and on_disk.header.generator.name == generator
    assert on_disk.header.bases_sha256 == adapter.header.bases_sha256

    fresh = make()
    resumed = load_into(fresh, path, check_fingerprint=True)
    assert torch.equal(logits(fresh), trained)
    resumed.detach()
    assert torch.equal(logits(fresh), base)

    run_cli("merge", tmp_path / "base", path, "-o", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged_file = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged_file), trained, rtol=1e-5, atol=1e-5)
    merged = handle.merge()
    state = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for key, tensor in merged.state_dict().items():   # the same float32 ΔW, one rounding: the same bytes
        if key in state:
            assert torch.equal(state[key], tensor), key

    if generator == "peft":  # PEFT can regenerate only its own draw
        run_cli("convert", path, tmp_path / "peft_dir", "--to", "peft-vera")
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(make(), tmp_path / "peft_dir")
        torch.testing.assert_close(logits(loaded), trained, rtol=1e-5, atol=1e-5)


def test_unmerge_restores_and_save_pretrained_writes_the_merged_model(tmp_path):
    model = tiny_llama()
    base = logits(model)
    handle = attach(model, vera(r=8, target_modules=LLAMA_TARGETS))
    randomise(handle, scale=0.3)
    trained = logits(model)
    with handle.disable_adapter():
        assert torch.equal(logits(model), base)
    model.save_pretrained(tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(logits(reloaded), trained, rtol=1e-5, atol=1e-5)
    handle.merge(detach=False)
    torch.testing.assert_close(logits(model), trained, rtol=1e-5, atol=1e-5)
    handle.unmerge()   # a float32 base: ΔW subtracted again (exact to float32 rounding)
    torch.testing.assert_close(logits(model), trained, rtol=1e-5, atol=1e-5)


def test_resume_loads_the_vectors_and_refuses_another_method(tmp_path):
    model = tiny_llama()
    handle = attach(model, vera(r=8, target_modules=LLAMA_TARGETS, seed=4))
    randomise(handle, scale=0.3)
    handle.save(tmp_path / "v.safetensors")
    trained = logits(model)
    other = tiny_llama()
    again = attach(other, vera(r=8, target_modules=LLAMA_TARGETS, seed=4))
    again.load_scales(tmp_path / "v.safetensors")
    assert torch.equal(logits(other), trained)

    randlora = attach(tiny_llama(), RandloraConfig(r=4, target_modules=LLAMA_TARGETS))
    randlora.save(tmp_path / "r.safetensors")
    with pytest.raises(AdapterShapeError, match="method"):
        again.load_scales(tmp_path / "r.safetensors")
    with pytest.raises(AdapterShapeError, match="method"):
        randlora.load_scales(tmp_path / "v.safetensors")


def test_config_refusals():
    with pytest.raises(HeaderError, match="no scaling factor"):
        vera(alpha=16.0)
    with pytest.raises(HeaderError, match="dense"):
        vera(kind="sparse")
    with pytest.raises(HeaderError, match="method must be one of"):
        RandloraConfig(method="lora")
    with pytest.raises(HeaderError, match="d_initial"):
        vera(d_initial=float("nan"))
    with pytest.raises(HeaderError, match="already has an adapter"):
        model = tiny_llama()
        attach(model, vera(target_modules=LLAMA_TARGETS))
        attach(model, RandloraConfig(r=4, target_modules=LLAMA_TARGETS))


def test_train_lowers_the_loss_and_the_merged_model_learned(llama_dir, tmp_path):
    data = write_pattern_data(tmp_path / "data.jsonl")
    out = tmp_path / "vera.safetensors"
    report = train_causal_lm(llama_dir, data, out, config=vera(r=32), steps=30, batch_size=4, seq_len=32, lr=5e-2)
    # VeRA trains ~1.3k parameters here (RandLoRA r=4: ~10×): 4.88 → 4.31 in 30 steps
    assert report.loss_after < 0.93 * report.loss_before, report.summary()
    in_memory = logits(report.handle.model)

    run_cli("merge", llama_dir, out, "-o", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    torch.testing.assert_close(logits(merged), in_memory, rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[(s + 3 * j) % 50 for j in range(32)] for s in range(4)])
    with torch.no_grad():
        merged_loss = float(merged(input_ids=ids, labels=ids).loss)
        base_loss = float(base(input_ids=ids, labels=ids).loss)
    assert merged_loss < 0.93 * base_loss, (merged_loss, base_loss)
    before, after = load_file(llama_dir / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(read_vera_adapter(out).layers)


def test_cli_train_vera(llama_dir, tmp_path):
    data = write_pattern_data(tmp_path / "data.jsonl")
    out = tmp_path / "cli.safetensors"
    result = run_cli("train", llama_dir, data, "-o", out, "--method", "vera", "--r", "16", "--steps", "15",
                     "--seq-len", "32", "--lr", "0.02", "--targets", "q_proj,v_proj,down_proj", "--generator", "peft",
                     "--seed", "5")
    before, after = map(float, re.search(r"loss ([\d.]+) → ([\d.]+)", result.output).groups())
    assert after < before
    header = read_vera_adapter(out).header
    assert header.generator.method == "vera" and header.seed == 5 and header.rank == 16
    assert {k.split(".")[-2] for k in header.layers} == {"q_proj", "v_proj", "down_proj"}
    assert_one_line_error(run_cli("train", llama_dir, data, "-o", tmp_path / "x.safetensors", "--method", "vera",
                                  "--alpha", "3", check=False), "no scaling factor")


@pytest.mark.parametrize("method,dtype", [("vera", torch.bfloat16), ("vera", torch.float16),
                                          ("randlora", torch.float16)])
def test_trained_on_a_half_base_merges_as_peft_merges_its_peft_dir(method, dtype, tmp_path):
    """PEFT rounds its shared bases to a half layer's dtype: the trainer's peft generator records that cast, so the
    trained file, our merge, and PEFT's merge of the converted PEFT dir agree bit for bit on the half base. (Before,
    the file said float32 bases and PEFT's merge of its dir differed from ours by the bases' rounding.)"""
    from test_peft_vera import peft_merged

    tiny_llama().to(dtype).save_pretrained(tmp_path / "base")
    model = tiny_llama().to(dtype)
    config = vera(r=8, target_modules=LLAMA_TARGETS, generator="peft", seed=6) if method == "vera" else \
        RandloraConfig(r=4, target_modules=LLAMA_TARGETS, generator="peft", seed=6)
    handle = attach(model, config)
    assert handle.generator.cast_dtype == str(dtype).removeprefix("torch.")
    randomise(handle, scale=0.3)
    handle.save(tmp_path / "a.safetensors")
    run_cli("convert", tmp_path / "a.safetensors", tmp_path / "peft_dir", "--to", f"peft-{method}")
    expected = peft_merged(tmp_path / "base", tmp_path / "peft_dir")
    run_cli("merge", tmp_path / "base", tmp_path / "a.safetensors", "-o", tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    before = load_file(str(tmp_path / "base" / "model.safetensors"))
    changed = 0
    for key, tensor in merged.items():
        if method == "vera":
            assert torch.equal(tensor, expected[key]), (key, (tensor.float() - expected[key].float()).abs().max())
        else:  # PEFT's RandLoRA adds a half ΔW in half (two roundings; README, Numerics): ≤ 2 ulp of operands
            ours, peft, w = tensor.float(), expected[key].float(), before[key].float()
            top = torch.maximum(torch.maximum(ours.abs(), peft.abs()), w.abs()).to(dtype)
            ulp = torch.nextafter(top, torch.full_like(top, float("inf"))).float() - top.float()
            assert bool(((ours - peft).abs() <= 2 * ulp).all()), key   # 2: PEFT's two roundings across a binade
        changed += not torch.equal(tensor, before[key])
    assert changed == len(handle.layers)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_an_attached_vera_model_compiles_to_one_graph(dropout):
    import torch._dynamo as dynamo

    dynamo.reset()
    model = tiny_llama(layers=1)
    attach(model, vera(r=8, dropout=dropout))
    model.train()
    explained = dynamo.explain(model)(input_ids=IDS)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_the_layer_under_autocast_matches_the_float32_reference(amp):
    """Under autocast the base product runs in the autocast dtype, the adapter path in float32, the output in the
    autocast dtype; the vectors' gradients stay float32 and match the float32 reference to the half rounding."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 10, 24, generator=g)
    W, b = torch.randn(16, 24, generator=g), torch.randn(16, generator=g)
    lb = torch.randn(16, generator=g).requires_grad_()
    ld = torch.randn(8, generator=g).requires_grad_()
    A, B = torch.randn(8, 24, generator=g), torch.randn(16, 8, generator=g)
    with torch.autocast("cpu", dtype=amp):
        y = vera_linear(x, x, W, b, lb, ld, A, B)
    assert y.dtype == amp
    grads = torch.autograd.grad(y.float().sum(), (lb, ld))
    want = vera_linear_reference(x, x, W, b, lb, ld, A, B)
    want_grads = torch.autograd.grad(want.sum(), (lb, ld))
    tol = 2e-2 if amp is torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol * float(want.abs().max()))
    for got, exp in zip(grads, want_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, exp, rtol=tol, atol=tol * float(exp.abs().max()))
