"""The trainer: attach / memory-efficient autograd / save / merge / resume, and ``randlora-io train``."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file
from tiny_models import LLAMA_TARGETS, peft_randlora, tiny_gpt2, tiny_llama

from randlora_io.format.adapter import read_adapter
from randlora_io.errors import BaseModelMismatchError, HeaderError
from randlora_io.train import RandloraConfig, RandloraLayer, load_into, randlora_linear, randlora_linear_reference
from randlora_io.train import attach
from randlora_io.train.loop import train_causal_lm

IDS = torch.randint(0, 90, (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def randomise(handle, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("generator,kind", [("philox", "dense"), ("philox", "very_sparse"), ("peft", "sparse")])
def test_step_zero_outputs_equal_the_base_exactly(make, generator, kind):
    base = logits(make())
    model = make()
    handle = attach(model, RandloraConfig(r=4, generator=generator, kind=kind, seed=3))
    assert torch.equal(logits(model), base)
    assert all(isinstance(layer, RandloraLayer) for layer in handle.layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"randlora_(lambda|gamma)$", n) for n in trainable)
    assert handle.shared.on("cpu") is handle.shared.on(torch.device("cpu"))  # one shared copy per device
    if make is tiny_gpt2:
        assert all(layer.spec.fan_in_fan_out for layer in handle.layers.values())  # Conv1D found and flagged


@pytest.mark.parametrize("mode", ["factored", "merged"])
@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (8, 8), (10, 5)])
def test_gradients_equal_autograd_on_the_naive_formula_float64(shape, mode):
    out_f, in_f = shape
    D, M, r = min(shape), max(shape), 3   # r ∤ D for most shapes: a partial last basis
    n = -(-D // r)
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(2, 3, in_f, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(out_f, in_f, dtype=torch.float64, generator=g)
    b = torch.randn(out_f, dtype=torch.float64, generator=g)
    lam = torch.randn(r, n, dtype=torch.float64, generator=g, requires_grad=True)
    gam = torch.randn(n, D, dtype=torch.float64, generator=g, requires_grad=True)
    A, U_B = torch.randn(r, D, generator=g), torch.randn(M, r * n, generator=g)

    def fast(x, lam, gam):
        return randlora_linear(x, x, W, b, lam, gam, A, U_B, 0.7, mode)

    assert torch.autograd.gradcheck(fast, (x, lam, gam))
    upstream = torch.randn(2, 3, out_f, dtype=torch.float64, generator=g)
    ours = torch.autograd.grad(fast(x, lam, gam), (x, lam, gam), upstream)
    naive = torch.autograd.grad(randlora_linear_reference(x, x, W, b, lam, gam, A, U_B, 0.7), (x, lam, gam), upstream)
    for a, e in zip(ours, naive):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    # with dropout (xd is not x) the factored path is always taken, and is exact too
    mask = torch.rand(x.shape, generator=g) > 0.3
    ours = torch.autograd.grad(randlora_linear(x, x * mask, W, b, lam, gam, A, U_B, 0.7, mode), (x, lam, gam),
                               upstream)
    naive = torch.autograd.grad(randlora_linear_reference(x, x * mask, W, b, lam, gam, A, U_B, 0.7), (x, lam, gam),
                                upstream)
    for a, e in zip(ours, naive):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_backward_saves_one_activation_and_no_delta(shape):
    """Saved for backward: xd (the layer input) and the tiny scales; never ΔW, S or a (tokens, K) product."""
    out_f, in_f = shape
    lin = torch.nn.Linear(in_f, out_f)
    handle_model = torch.nn.Sequential(lin)
    attach(handle_model, RandloraConfig(r=4, target_modules=["0"]))
    x = torch.randn(256, in_f, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        handle_model(x).sum().backward()
    new_bytes = sum(t.numel() * t.element_size() for t in saved
                    if not (isinstance(t, torch.nn.Parameter) or t._base is not None or t is lin.weight))
    activation = x.numel() * x.element_size()
    D, r = min(shape), 4
    scales = (r * -(-D // r) + -(-D // r) * D) * 4
    assert new_bytes <= activation + scales, (new_bytes, activation)


def test_forward_and_gradients_match_peft_randlora_with_the_same_scales():
    peft_model = peft_randlora(tiny_llama(), r=4, seed=3, alpha=16.0)
    ours = tiny_llama()
    handle = attach(ours, RandloraConfig(r=4, alpha=16.0, target_modules=LLAMA_TARGETS, generator="peft", seed=3))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            m = re.fullmatch(r"base_model\.model\.(.+)\.randlora_(lambda|gamma)\.default", name)
            if m:
                layer = handle.layers[m.group(1) + ".weight"]
                getattr(layer, f"randlora_{m.group(2)}").copy_(p)
    torch.testing.assert_close(logits(ours), logits(peft_model), rtol=1e-5, atol=1e-5)
    peft_model(IDS, labels=IDS).loss.backward()
    ours(input_ids=IDS, labels=IDS).loss.backward()
    peft_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    for key, layer in handle.layers.items():
        module = "base_model.model." + key.removesuffix(".weight")
        for which, ours_grad in (("lambda", layer.randlora_lambda.grad), ("gamma", layer.randlora_gamma.grad)):
            expected = peft_grads[f"{module}.randlora_{which}.default"]
            # fp32 sums in another order: compare against the gradient's own scale
            torch.testing.assert_close(ours_grad, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_save_merge_detach_and_load_into(make, tmp_path):
    model = make()
    base = logits(model)
    handle = attach(model, RandloraConfig(r=4, seed=9))
    randomise(handle)
    trained = logits(model)
    assert not torch.allclose(trained, base)
    path = tmp_path / "a.randlora.safetensors"
    adapter = handle.save(path)
    assert adapter.header.base_model["fingerprint"].startswith("sha256-weights:")
    assert read_adapter(path).header.bases_sha256 == adapter.header.bases_sha256

    fresh = make()
    resumed = load_into(fresh, path, check_fingerprint=True)
    torch.testing.assert_close(logits(fresh), trained, rtol=0, atol=0)
    assert resumed.trainable_parameters() == handle.trainable_parameters()

    merged = handle.merge()
    assert not any(isinstance(m, RandloraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged), trained, rtol=1e-5, atol=1e-5)
    resumed.detach()
    assert torch.equal(logits(fresh), base)

    other = make(seed=1)
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        load_into(other, path, check_fingerprint=True)
    assert not any(isinstance(m, RandloraLayer) for m in other.modules())


def test_targets_that_match_nothing_are_an_error():
    with pytest.raises(HeaderError, match="matched no Linear"):
        attach(tiny_llama(), RandloraConfig(target_modules=["qkv"]))
    with pytest.raises(HeaderError, match="r="):
        attach(tiny_llama(), RandloraConfig(r=200))


def write_pattern_data(path, rows=32, length=40, vocab=50):
    gen = torch.Generator().manual_seed(0)
    with open(path, "w") as fh:
        for _ in range(rows):
            start = int(torch.randint(0, 10, (1,), generator=gen))
            fh.write(json.dumps({"input_ids": [(start + 3 * j) % vocab for j in range(length)]}) + "\n")
    return path


def test_train_lowers_the_loss_and_the_merged_file_gives_the_trained_logits(llama_dir, tmp_path):
    data = write_pattern_data(tmp_path / "data.jsonl")
    out = tmp_path / "trained.randlora.safetensors"
    report = train_causal_lm(llama_dir, data, out, config=RandloraConfig(r=4), steps=25, batch_size=4, seq_len=32)
    assert report.loss_after < 0.9 * report.loss_before, report.summary()
    in_memory = logits(report.handle.model)

    run_cli("merge", llama_dir, out, "-o", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged), in_memory, rtol=1e-5, atol=1e-5)
    # only the targeted weights changed
    before, after = load_file(llama_dir / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(read_adapter(out).layers)


def test_cli_train_writes_a_file_and_reports_the_loss(llama_dir, tmp_path):
    data = write_pattern_data(tmp_path / "data.jsonl")
    out = tmp_path / "cli.randlora.safetensors"
    result = run_cli("train", llama_dir, data, "-o", out, "--r", "4", "--steps", "20", "--seq-len", "32",
                     "--targets", "q_proj,v_proj,down_proj", "--generator", "peft", "--seed", "5")
    before, after = map(float, re.search(r"loss ([\d.]+) → ([\d.]+)", result.output).groups())
    assert after < before
    header = read_adapter(out).header
    assert header.generator.name == "peft" and header.seed == 5 and header.rank == 4
    assert {k.split(".")[-2] for k in header.layers} == {"q_proj", "v_proj", "down_proj"}


def test_cli_train_bad_inputs_are_one_line(llama_dir, tmp_path):
    data = write_pattern_data(tmp_path / "data.jsonl")
    out = tmp_path / "o.safetensors"
    assert_one_line_error(run_cli("train", llama_dir, data, "-o", out, "--targets", "nope", check=False),
                          "matched no")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2\n')
    assert_one_line_error(run_cli("train", llama_dir, bad, "-o", out, check=False), "bad.jsonl:2")
    text = tmp_path / "plain.txt"
    text.write_text("hello world\n")
    assert_one_line_error(run_cli("train", llama_dir, text, "-o", out, check=False), "tokenizer")
    big = tmp_path / "big.jsonl"
    big.write_text('{"input_ids": [1, 2, 99999]}\n')
    assert_one_line_error(run_cli("train", llama_dir, big, "-o", out, check=False), "vocabulary")
    (tmp_path / "no_model").mkdir()  # a base dir without config.json (OUT beside it, not inside: that is refused)
    assert_one_line_error(run_cli("train", tmp_path / "no_model", data, "-o", out, check=False), "config.json")
    out.write_bytes(b"keep")
    assert_one_line_error(run_cli("train", llama_dir, data, "-o", out, check=False), "exists")
    assert out.read_bytes() == b"keep"


def test_text_data_uses_the_base_tokenizer(llama_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran"]
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(llama_dir)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(["the cat sat on the mat", "a dog ran on the mat"] * 20))
    report = train_causal_lm(llama_dir, text, tmp_path / "t.safetensors", config=RandloraConfig(r=4), steps=15,
                             seq_len=16, batch_size=4)
    assert report.loss_after < report.loss_before
