"""``convert --to peft-lora --max-error E [--for vllm|sglang]`` (#28 part 2): per-layer ranks that meet E as an
independent float64 SVD measures it, PEFT loading each layer at its own rank, an engine's one rank from its allowed
set, its refusals, and the randomised SVD fast path against the full-SVD reference."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file
from tiny_models import peft_layer_deltas, peft_randlora, tiny_gpt2, tiny_llama

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_FIELDS = {"peft_type", "r", "lora_alpha", "target_modules", "bias", "modules_to_save", "use_rslora", "use_dora"}
# PEFT's get_delta_weight is float32, ours too, through different products: they differ by ~1e-7 relative, so the
# independent check of a measured error ≤ E allows that much on top of E
SLACK = 1e-5


def _tails64(delta: torch.Tensor) -> torch.Tensor:
    """Independent: the relative error of the best rank-k approximation at every k = 0 … min(shape), from
    torch.linalg.svdvals in float64 (len min(shape) + 1)."""
    s2 = torch.linalg.svdvals(delta.double()) ** 2
    return ((s2.sum() - torch.cat([torch.zeros(1, dtype=torch.float64), s2.cumsum(0)])).clamp_min(0) / s2.sum()).sqrt()


def _optimal_rank(delta: torch.Tensor, max_error: float) -> int:
    """Independent: the smallest k with sqrt(Σ_{i>k} σ²)/sqrt(Σ σ²) ≤ E (:func:`_tails64`)."""
    return int(torch.nonzero(_tails64(delta) <= max_error)[0])


def _written(out_dir) -> dict[str, torch.Tensor]:
    """{weight key: B @ A in float64} of a written PEFT LoRA dir (alpha = r: scaling 1)."""
    tensors = load_file(str(out_dir / "adapter_model.safetensors"))
    out = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[module + ".weight"] = tensors[key.replace("lora_A", "lora_B")].double() @ A.double()
    return out


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def randlora_pair(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    pm = peft_randlora(tiny_llama(), r=6, seed=3)
    pm.save_pretrained(tmp_path / "peft")
    return base, tmp_path / "peft", peft_layer_deltas(pm)


def _assert_peft_serves(out_dir, written, lora_ranks):
    """PEFT loads ``out_dir`` with each layer at its own rank, and its logits equal the base's weights plus the
    written ΔW_k added by hand."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), out_dir)
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            assert module.lora_A["default"].weight.shape[0] == lora_ranks[key], key
            assert module.scaling["default"] == 1.0, key
    by_hand = tiny_llama()
    with torch.no_grad():
        params = dict(by_hand.named_parameters())
        for key, delta in written.items():
            params[key].add_(delta.float())
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, by_hand(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("max_error", [0.3, 0.05])
def test_per_layer_ranks_are_the_smallest_meeting_the_budget(randlora_pair, tmp_path, max_error):
    base, peft, exact = randlora_pair
    out = tmp_path / "lora"
    result = run_cli("convert", peft, out, "--to", "peft-lora", "--max-error", max_error, "--base", base)
    written = _written(out)
    assert set(written) == set(exact)
    ranks = {}
    for key, delta in exact.items():
        factors = load_file(str(out / "adapter_model.safetensors"))
        k = factors[f"base_model.model.{key.removesuffix('.weight')}.lora_A.weight"].shape[0]
        ranks[key] = k
        assert k == _optimal_rank(delta, max_error), key
        err = _rel(written[key], delta)
        assert err <= max_error + SLACK, (key, err)
        assert f"rank {k} " in next(line for line in result.output.splitlines() if key in line)
    assert len(set(ranks.values())) > 1  # the layers really differ, so rank_pattern is exercised
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    _assert_peft_serves(out, written, ranks)


@pytest.mark.parametrize("engine", [None, "vllm"])
def test_report_errors_and_energy_are_measured(randlora_pair, tmp_path, engine):
    """The errors reported are those of the dir as PEFT will load it (padded or not), against PEFT's own ΔW."""
    from randlora_io.convert.run import convert

    base, peft, exact = randlora_pair
    report = convert(peft, tmp_path / "lora", "peft-lora", max_error=0.1, base=base, serve_for=engine)
    written = _written(tmp_path / "lora")
    for key, delta in exact.items():
        assert abs(report.errors[key] - _rel(written[key], delta)) <= SLACK
        s2 = torch.linalg.svdvals(delta.double()) ** 2
        k = report.lora.needed[key]
        assert abs(report.kept_energy[key] - float(s2[:k].sum() / s2.sum())) <= SLACK
        assert report.kept_energy[key] == pytest.approx(1 - report.errors[key] ** 2, abs=1e-4)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_engine_export_has_one_allowed_rank_and_loads_in_peft(randlora_pair, tmp_path, engine):
    base, peft, exact = randlora_pair
    out = tmp_path / "served"
    result = run_cli("convert", peft, out, "--to", "peft-lora", "--max-error", "0.1", "--for", engine,
                     "--base", base)
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config) <= VLLM_FIELDS and "rank_pattern" not in config
    needed = max(_optimal_rank(d, 0.1) for d in exact.values())
    r = config["r"]
    assert r == (min(v for v in VLLM_RANKS if v >= needed) if engine == "vllm" else needed)
    assert config["lora_alpha"] == r and config["modules_to_save"] is None and config["bias"] == "none"
    written = _written(out)
    for key, delta in exact.items():
        assert _rel(written[key], delta) <= 0.1 + SLACK, key
    assert f"--enable-lora --max-lora-rank {r}" in result.output
    _assert_peft_serves(out, written, {k: r for k in exact})


def _refused(tmp_path, src, *args, fragments=(), base=None):
    dst = tmp_path / "served"
    extra = ("--base", base) if base else ()
    result = run_cli("convert", src, dst, "--to", "peft-lora", *args, *extra, check=False)
    assert_one_line_error(result, *fragments)
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".served")]


def test_engine_refuses_a_budget_above_rank_512(tmp_path):
    from randlora_io.convert.dense import write_dense

    g = torch.Generator().manual_seed(0)
    write_dense({"model.layers.0.mlp.up_proj.weight": torch.randn(600, 600, generator=g)}, tmp_path / "d.safetensors")
    _refused(tmp_path, tmp_path / "d.safetensors", "--max-error", "0.01", "--for", "vllm",
             fragments=("needs rank", "512", "up_proj"))


def test_engine_refuses_ranks_it_does_not_accept_and_other_targets(randlora_pair, tmp_path):
    base, peft, _ = randlora_pair
    _refused(tmp_path, peft, "--rank", "48", "--for", "vllm", fragments=("--rank 48", "64"), base=base)
    result = run_cli("convert", peft, tmp_path / "d.safetensors", "--to", "dense", "--for", "vllm", "--base", base,
                     check=False)
    assert_one_line_error(result, "--to peft-lora")


def test_engine_refuses_embeddings_and_conv1d(tmp_path):
    from randlora_io.convert.dense import write_dense

    write_dense({"model.embed_tokens.weight": torch.ones(128, 64)}, tmp_path / "e.safetensors")
    _refused(tmp_path, tmp_path / "e.safetensors", "--max-error", "0.1", "--for", "vllm",
             fragments=("embed_tokens", "merge"))
    tiny_gpt2().save_pretrained(tmp_path / "gbase")
    peft_randlora(tiny_gpt2(), r=4, targets=["c_attn"], fan_in_fan_out=True).save_pretrained(tmp_path / "gpeft")
    _refused(tmp_path, tmp_path / "gpeft", "--max-error", "0.1", "--for", "sglang", fragments=("Conv1D",),
             base=tmp_path / "gbase")


@pytest.mark.parametrize("what", ["modules_to_save", "dora"])
def test_engine_refuses_modules_to_save_and_dora(tmp_path, what):
    from peft import LoraConfig, get_peft_model
    from tiny_models import randomize_trainable

    tiny_llama().save_pretrained(tmp_path / "base")
    extra = {"modules_to_save": ["lm_head"]} if what == "modules_to_save" else {"use_dora": True}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **extra)
    randomize_trainable(get_peft_model(tiny_llama(), config)).save_pretrained(tmp_path / "lora")
    _refused(tmp_path, tmp_path / "lora", "--max-error", "0.1", "--for", "vllm", base=tmp_path / "base",
             fragments=("modules_to_save" if what == "modules_to_save" else "DoRA", "merge"))


def test_zero_layers_are_left_out_and_the_rest_load_in_peft(tmp_path):
    from randlora_io.convert.dense import write_dense

    g = torch.Generator().manual_seed(1)
    low = torch.randn(64, 3, generator=g) @ torch.randn(3, 64, generator=g)
    deltas = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64),
              "model.layers.0.self_attn.o_proj.weight": low}
    write_dense(deltas, tmp_path / "d.safetensors")
    for engine in ((), ("--for", "vllm")):
        out = tmp_path / f"lora{len(engine)}"
        result = run_cli("convert", tmp_path / "d.safetensors", out, "--to", "peft-lora", "--max-error", "1e-5",
                         *engine)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["target_modules"] == ["model.layers.0.self_attn.o_proj"]
        assert "rank 0" in next(line for line in result.output.splitlines() if "q_proj" in line)
        r = 3 if not engine else 8
        assert config["r"] == r
        _assert_peft_serves(out, _written(out), {"model.layers.0.self_attn.o_proj.weight": r})
    _refused(tmp_path, _zero_file(tmp_path), "--max-error", "0.1", fragments=("zero",))


def _zero_file(tmp_path):
    from randlora_io.convert.dense import write_dense

    write_dense({"model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)}, tmp_path / "z.safetensors")
    return tmp_path / "z.safetensors"


def test_max_error_needs_a_bound_below_one_and_above_float32_rounding(randlora_pair, tmp_path):
    base, peft, _ = randlora_pair
    _refused(tmp_path, peft, "--max-error", "1", fragments=("below 1",), base=base)
    _refused(tmp_path, peft, "--max-error", "0", fragments=("float32",), base=base)
    _refused(tmp_path, peft, fragments=("--rank", "--max-error"), base=base)


# ------------------------------------------------------------------------------- randomised SVD vs the reference


def _spectral(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthonormal U (m, len(s)), V (n, len(s)): (m, n) float32, rank ≤ len(s)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return ((U * s.double()) @ V.T).float()


def _decaying(m: int, n: int, decay: float, seed: int) -> torch.Tensor:
    """σᵢ = decayⁱ (see :func:`_spectral`): (m, n) float32."""
    return _spectral(m, n, decay ** torch.arange(min(m, n), dtype=torch.float64), seed)


@pytest.mark.parametrize("decay,max_error", [(0.9, 0.01), (0.95, 0.05), (0.8, 1e-4)])
def test_randomized_path_agrees_with_the_full_svd_reference(decay, max_error):
    from randlora_io.convert.rank_budget import full_budget_factors, randomized_budget_factors

    W = _decaying(400, 500, decay, seed=int(decay * 100))  # rank ≈ 40–60, under a quarter of 400
    fast = randomized_budget_factors(W, max_error)
    ref = full_budget_factors(W, max_error)
    assert fast is not None and fast.method == "rsvd" and ref.method == "svd"
    assert fast.rank == ref.rank == _optimal_rank(W, max_error)
    for low in (fast, ref):
        independent = _rel(low.up.double() @ low.down.double(), W)
        assert independent <= max_error and abs(independent - low.rel_error) <= 1e-9
    assert abs(fast.rel_error - ref.rel_error) <= 1e-5


def test_randomized_path_hands_a_large_rank_to_the_gram_path():
    from randlora_io.convert.rank_budget import budget_factors, full_budget_factors, randomized_budget_factors

    W = torch.randn(400, 450, generator=torch.Generator().manual_seed(5))  # flat spectrum: most of the rank needed
    assert randomized_budget_factors(W, 0.3) is None
    low = budget_factors(W, 0.3, "randomized")
    assert low.method == "gram" and low.rank == _optimal_rank(W, 0.3) and low.rel_error <= 0.3
    assert low.rank == full_budget_factors(W, 0.3).rank


def test_tail_errors_formula():
    from randlora_io.convert.rank_budget import smallest_rank, tail_errors

    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    total = 14.0
    expected = [1.0, (5 / 14) ** 0.5, (1 / 14) ** 0.5, 0.0]
    assert torch.allclose(tail_errors(s, total), torch.tensor(expected, dtype=torch.float64))
    assert smallest_rank(s, total, 0.3) == 2 and smallest_rank(s, total, 0.0) == 3
    assert smallest_rank(s, total + 1.0, 0.0) is None  # energy beyond the given values


# Layers with min(out, in) ≥ 1024, where ``auto`` takes the randomised path: its rank must be the float64 optimum on
# any spectrum, not only a decaying one (#28 audit: on linspace(1, 0.5) the σ̃ of svd_lowrank, which underestimate σ,
# gave rank 134 where 128 is optimal, so vLLM's --max-lora-rank doubled to 256). Each budget is set just above the
# optimal rank's own float64 tail error (by a relative 1e-9, as the audit did), the hardest place for a guess.


def _cluster_at_cut() -> torch.Tensor:
    """σ = 0.93ⁱ for i < 40, sixteen values 0.93⁴⁰·(1 − 1e-7·j) (j < 16: the cut at 48 falls inside), then 0.93ⁱ."""
    head = 0.93 ** torch.arange(40, dtype=torch.float64)
    cluster = 0.93**40 * (1 - 1e-7 * torch.arange(16, dtype=torch.float64))
    return torch.cat([head, cluster, 0.93 ** torch.arange(40, 1008, dtype=torch.float64)])


_FLAT = torch.linspace(1, 0.5, 1024, dtype=torch.float64)
EXACT_RANK_CASES = {  # name: (shape, spectrum, optimal rank the budget is set for, whether the fast path must keep it)
    "flat": ((1024, 1024), _FLAT, 128, False),
    "cluster-at-cut": ((1024, 1024), _cluster_at_cut(), 48, True),
    "rank-deficient": ((1024, 1024), torch.linspace(1, 0.5, 200, dtype=torch.float64), 100, True),
    "wide-flat": ((1024, 3000), _FLAT, 64, False),
    "tall-decaying": ((3000, 1024), 0.97 ** torch.arange(1024, dtype=torch.float64), 90, True),
}


@pytest.mark.parametrize("method", ["randomized", "auto"])
@pytest.mark.parametrize("case", list(EXACT_RANK_CASES))
def test_large_layer_rank_is_the_float64_optimum_on_any_spectrum(case, method):
    from randlora_io.convert.rank_budget import budget_factors

    shape, s, target, fast = EXACT_RANK_CASES[case]
    W = _spectral(*shape, s, seed=len(case))
    # the independent oracle: float64 svdvals of the float32 matrix as stored, the tail error at every rank
    tails = _tails64(W)
    max_error = float(tails[target]) * (1 + 1e-9)
    optimal = int(torch.nonzero(tails <= max_error)[0])
    assert optimal == target  # the budget is where it was meant to be
    low = budget_factors(W, max_error, method)
    assert low.rank == optimal, (case, method, low.rank, low.method)
    independent = _rel(low.up.double() @ low.down.double(), W)
    assert independent <= max_error and abs(independent - low.rel_error) <= 1e-9
    if fast:  # a spectrum the randomised path can certify: it must not hand over to the full SVD
        assert low.method == "rsvd", case


@pytest.mark.parametrize("spectrum,proves", [("power-0.5", False), ("power-1", True), ("geometric-0.98", True)])
def test_fast_path_returns_the_optimal_rank_or_hands_over(spectrum, proves):
    """Over a sweep of budgets, each just above the tail error at some rank, the fast path either proves its rank
    (then it is the optimum) or returns None for the reference: never a guess. On σᵢ = i^-½ the energy past any
    q ≤ 256 stays above σ_k², so nothing can be proven there; the other two decay fast enough for some budgets."""
    from randlora_io.convert.rank_budget import randomized_budget_factors

    i = torch.arange(1024, dtype=torch.float64)
    s = {"power-0.5": (i + 1) ** -0.5, "power-1": (i + 1) ** -1.0, "geometric-0.98": 0.98**i}[spectrum]
    W = _spectral(1024, 1024, s, seed=7)
    tails = _tails64(W)
    proven = []
    for target in (1, 4, 16, 48, 96):
        max_error = float(tails[target]) * (1 + 1e-9)
        low = randomized_budget_factors(W, max_error)
        if low is not None:
            assert low.rank == target and low.rel_error <= max_error, (target, low.rank)
            proven.append(target)
    assert bool(proven) or not proves


@pytest.mark.parametrize("shape", [(1024, 1024), (1024, 1536), (1536, 1024)])
@pytest.mark.parametrize("max_error_at", [128, 700])
def test_gram_path_gives_the_optimal_rank_where_the_randomised_one_cannot_prove_it(shape, max_error_at):
    """A flat spectrum (σ = linspace(1, 0.5), the audit's case): the randomised path hands over, and the Gram
    eigendecomposition proves the optimal rank in float64 instead of the ~5x dearer full SVD."""
    from randlora_io.convert.rank_budget import budget_factors, gram_budget_factors, randomized_budget_factors

    W = _spectral(*shape, torch.linspace(1, 0.5, min(shape), dtype=torch.float64), seed=sum(shape))
    tails = _tails64(W)
    max_error = float(tails[max_error_at]) * (1 + 1e-9)
    assert randomized_budget_factors(W, max_error) is None
    for low in (gram_budget_factors(W, max_error), budget_factors(W, max_error, "auto")):
        assert low is not None and low.method == "gram" and low.rank == max_error_at
        independent = _rel(low.up.double() @ low.down.double(), W)
        assert independent <= max_error and abs(independent - low.rel_error) <= 1e-9
        assert low.up.shape == (shape[0], max_error_at) and low.down.shape == (max_error_at, shape[1])
