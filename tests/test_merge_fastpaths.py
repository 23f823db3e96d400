"""The CPU merge's fast paths for ternary bases (int8 limbs, CSR) against float64 and PEFT, and the bf16 path's
rounding measured against the correctly rounded result. The float32 ``addmm_`` path is the reference throughout."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file
from tiny_models import peft_randlora, tiny_gpt2, tiny_llama

from randlora_io.merge import ternary as ternary_merge
from randlora_io.format.adapter import build_adapter
from randlora_io.format.basis import peft_bases_raw
from randlora_io.format.delta import scaled_A, to_stored_orientation
from randlora_io.errors import UnsupportedPrecisionError
from randlora_io.merge.layer import PRECISIONS, Workspace, add_delta_
from randlora_io.sources.randlora_file import RandloraSource
from randlora_io.format.spec import SPARSE_THRESHOLD, GeneratorSpec, num_bases, very_sparse_threshold
from randlora_io.merge.ternary import LIMB_BASE, LIMBS, limb_bound, split_limbs, ternary_basis

U = 2.0**-24  # float32 unit roundoff

# (out, in, fan_in_fan_out): r ∤ D everywhere (r = 6); out < in and out > in; a GPT-2 Conv1D stored (in, out)
LAYERS = {"a.weight": ((37, 90), False), "b.weight": ((90, 37), False), "c.weight": ((29, 45), True),
          "d.weight": ((64, 64), False)}


def _generator(name: str, kind: str, min_dim: int) -> GeneratorSpec:
    if name == "peft":
        return GeneratorSpec(name="peft", kind=kind, seed=11, draw_dtype="bfloat16" if kind == "dense" else "float32",
                             cast_dtype="bfloat16" if kind == "sparse" else None)
    threshold = {"sparse": SPARSE_THRESHOLD, "very_sparse": very_sparse_threshold(min_dim)}.get(kind)
    return GeneratorSpec(name="philox", kind=kind, seed=11, threshold=threshold)


def _adapter(name: str, kind: str, layers=LAYERS, r: int = 6, spread: float = 3.0):
    """An adapter whose λ, γ span several binades per column (log-normal magnitudes, random signs): the limbs'
    per-column scale is what is being tested."""
    gen = torch.Generator().manual_seed(5)
    lambdas, gammas = {}, {}
    for key, (shape, _) in layers.items():
        n = num_bases(min(shape), r)
        lambdas[key] = torch.randn(r, n, generator=gen).sign() * torch.exp(spread * torch.randn(r, n, generator=gen))
        gammas[key] = torch.randn(n, min(shape), generator=gen) * torch.exp(spread * torch.randn(n, min(shape),
                                                                                                 generator=gen))
    model_min_dim = max(min(shape) for shape, _ in layers.values())  # the model-wide min_dim the bases use
    return build_adapter(generator=_generator(name, kind, model_min_dim), rank=r, alpha=12.0, layers=layers,
                         lambdas=lambdas, gammas=gammas)


def _exact(adapter, key):
    """ΔW in float64 from the float32 λ, γ and bases, stored orientation; and the float64 operands (B_layer, S)."""
    layer = adapter.layers[key]
    bases = adapter.bases()
    A, B = bases.for_layer(layer.min_dim, layer.max_dim, layer.num_bases)
    S = scaled_A(adapter.lambdas[key], A, adapter.gammas[key], dtype=torch.float64)
    md = adapter.header.scaling * (B.double() @ S)
    return to_stored_orientation(md, layer), B.double(), S


def _stored_shape(layer) -> tuple[int, int]:
    return (layer.in_features, layer.out_features) if layer.fan_in_fan_out else (layer.out_features, layer.in_features)


def _merged(adapter, key, precision):
    """0 + ΔW by ``add_delta_`` with ``precision`` (kernel auto, CPU), float32, stored orientation."""
    w = torch.zeros(_stored_shape(adapter.layers[key]))
    add_delta_(w, RandloraSource(adapter), key, 1.0, "auto", Workspace(), precision)
    return w


def test_precisions_listed():
    assert PRECISIONS == ("auto", "fp32", "int8", "bf16")


def test_split_limbs_reconstructs_each_column_within_its_bound():
    gen = torch.Generator().manual_seed(0)
    S = torch.randn(41, 7, generator=gen) * torch.exp(4 * torch.randn(41, 7, generator=gen))
    S[:, 1] = 0.0  # an all-zero column
    S[:, 2] *= 1e-30  # a tiny column (unit clamped, absolute bound)
    S[:, 3] *= 1e30
    S[5, 4], S[6, 4] = 127.75 * 2.0**-20, -(2.0**-21)  # max just under a power of two: rounds to 128 at E − 7
    limbs, unit = split_limbs(S)
    assert limbs.dtype == torch.int8 and limbs.shape == (41, LIMBS * 7)
    assert int(limbs.abs().max()) <= 127
    parts = limbs.double().reshape(41, LIMBS, 7)
    approx = sum(parts[:, limb] / LIMB_BASE**limb for limb in range(LIMBS)) * torch.exp2(unit.double())
    err = (approx - S.double()).abs().amax(dim=0)
    assert bool((err <= limb_bound(unit)).all()), (err / limb_bound(unit))
    # the bound is ~2^-23 of the column's largest value
    colmax = S.double().abs().amax(dim=0)
    rel = limb_bound(unit)[colmax > 1e-20] / colmax[colmax > 1e-20]
    assert float(rel.max()) <= 2.0**-22.5, rel
    assert float(err[1]) == 0.0


@pytest.mark.parametrize("name,kind", [("peft", "sparse"), ("peft", "very_sparse"), ("philox", "sparse"),
                                       ("philox", "very_sparse"), ("peft", "dense"), ("philox", "dense")])
def test_ternary_basis_detects_both_generators(name, kind):
    """PEFT's ternary bases are ±1/std (one constant per matrix, bf16-rounded when PEFT cast them), ours ±1;
    dense ones are not ternary."""
    adapter = _adapter(name, kind)
    B = adapter.bases().B
    basis = ternary_basis(B)
    if kind == "dense":
        assert basis is None
        return
    assert basis is not None and ternary_basis(B) is basis  # cached while B lives
    assert torch.equal(basis.b.to(torch.float32) * basis.c, B)
    assert set(basis.b.unique().tolist()) <= {-1, 0, 1}
    if name == "philox":
        assert basis.c == 1.0
    else:
        _, B_raw = peft_bases_raw(adapter.header.generator, 6, adapter.header.min_dim, adapter.header.max_dim)
        assert basis.c == float(B_raw.float().abs().max())
        if adapter.header.generator.cast_dtype == "bfloat16":  # still one value, the bf16 rounding of 1/std
            assert basis.c == float(torch.tensor(basis.c).to(torch.bfloat16).float())
    expected_density = 1 / 3 if kind == "sparse" else 1 / math.sqrt(adapter.header.min_dim)
    assert abs(basis.density - expected_density) < 0.35 * expected_density


def test_ternary_basis_refuses_two_magnitudes_and_non_finite():
    B = torch.tensor([[1.0, -1.0, 0.0], [0.5, 1.0, 0.0]])
    assert ternary_basis(B) is None
    assert ternary_basis(torch.tensor([[float("inf"), 0.0]])) is None
    assert ternary_basis(torch.zeros(3, 3)) is None
    ok = torch.tensor([[0.25, -0.25, 0.0]])
    assert ternary_basis(ok).c == 0.25


@pytest.mark.parametrize("name,kind", [("peft", "sparse"), ("philox", "sparse"), ("peft", "very_sparse"),
                                       ("philox", "very_sparse")])
def test_int8_limbs_within_the_stated_bound_of_float64(name, kind):
    """ΔW by the int8 path vs float64 of the same operands, per element: |s·c|·nnz_m·2^e_j·0.51/254² (the limbs)
    + 5·2⁻²⁴·|ΔW| (float32 roundings) + 2⁻²³·|s|·Σ|B||S| (S itself is float32). Every layer orientation."""
    adapter = _adapter(name, kind)
    basis = ternary_basis(adapter.bases().B)
    s = adapter.header.scaling
    for key, layer in adapter.layers.items():
        exact, B64, S64 = _exact(adapter, key)
        got = _merged(adapter, key, "int8").double()
        _, unit = split_limbs(S64.float())
        nnz = (B64 != 0).sum(dim=1, keepdim=True).double()
        limb = abs(s) * basis.c * nnz * limb_bound(unit)[None, :] * (1 + 2**-10)
        s_round = 2 * U * abs(s) * (B64.abs() @ S64.abs())
        bound = to_stored_orientation(limb + s_round, layer) + 5 * U * exact.abs()
        assert bool(((got - exact).abs() <= bound).all()), (key, float(((got - exact).abs() / bound).max()))
        # fp32 class: relative Frobenius error of the same order as the float32 GEMM's
        fp32 = _merged(adapter, key, "fp32").double()
        rel_int8 = float((got - exact).norm() / exact.norm())
        rel_fp32 = float((fp32 - exact).norm() / exact.norm())
        assert rel_int8 <= max(16 * rel_fp32, 2**-21), (key, rel_int8, rel_fp32)


def test_int8_blocks_over_rows_and_over_k_give_the_same_result(monkeypatch):
    """Row blocks (bounded scratch) and K blocks (int32 safety for K > 65 000) change nothing: integer sums are exact,
    so only the per-block float32 roundings differ (here: none beyond 2⁻²²·|ΔW|)."""
    adapter = _adapter("philox", "sparse")
    whole = {key: _merged(adapter, key, "int8") for key in adapter.layers}
    monkeypatch.setattr(ternary_merge, "ROW_BLOCK", 7)
    monkeypatch.setattr(ternary_merge, "K_BLOCK", 13)
    for key, want in whole.items():
        got = _merged(adapter, key, "int8")
        exact = _exact(adapter, key)[0]
        assert float((got.double() - want.double()).norm() / exact.norm()) <= 1e-6, key


def _fp32_gemm_bound(adapter, key):
    """The classical float32 dot-product bound, K·2⁻²⁴·|s|·Σ|B||S| (+ S's own rounding), stored orientation."""
    exact, B64, S64 = _exact(adapter, key)
    layer = adapter.layers[key]
    K = B64.shape[1]
    return exact, to_stored_orientation((K + 3) * U * abs(adapter.header.scaling) * (B64.abs() @ S64.abs()), layer)


@pytest.mark.parametrize("name", ["peft", "philox"])
def test_sparse_path_is_float32_class_and_auto_picks_it_when_very_sparse(name, monkeypatch):
    """very_sparse bases with a model-wide min_dim of 1030 (density 1/√min_dim ≈ 1/32 ≤ 1/28): ``auto`` runs the
    grouped sparse product (CSR groups of b times A's nonzero columns of S) in float32; a layer narrower than the
    widest (M < max_dim, D < min_dim) uses a prefix slice; both orientations and a Conv1D."""
    layers = {"big.weight": ((1100, 1030), False), "wide.weight": ((257, 310), False),
              "conv.weight": ((270, 256), True)}
    adapter = _adapter(name, "very_sparse", layers=layers, r=8, spread=1.0)
    basis = ternary_basis(adapter.bases().B)
    assert basis.density <= ternary_merge.SPARSE_MAX_DENSITY
    ran = []
    monkeypatch.setattr(ternary_merge, "add_ternary_int8_", lambda *a: ran.append("int8"))
    real_sparse = ternary_merge.add_ternary_sparse_
    monkeypatch.setattr(ternary_merge, "add_ternary_sparse_", lambda *a: (ran.append("sparse"), real_sparse(*a))[1])
    for key in layers:
        exact, bound = _fp32_gemm_bound(adapter, key)
        got = _merged(adapter, key, "auto").double()
        assert bool(((got - exact).abs() <= bound).all()), key
        assert float((got - exact).norm() / exact.norm()) <= 1e-6
    assert ran == ["sparse"] * len(layers)
    assert len(basis.groups) == len(layers)  # one set of CSR groups per layer shape, reused


@pytest.mark.parametrize("fast_int8", [True, False])
def test_auto_uses_int8_only_where_the_cpu_runs_it_fast(fast_int8, monkeypatch):
    """sparse bases (density 1/3): ``auto`` takes the int8 limbs on CPUs with fast int8, else the float32 addmm; dense bases
    always the float32 addmm. The result is float32-class either way."""
    monkeypatch.setattr(ternary_merge, "has_fast_int8", lambda: fast_int8)
    ran = []
    real_int8 = ternary_merge.add_ternary_int8_
    monkeypatch.setattr(ternary_merge, "add_ternary_int8_", lambda *a: (ran.append("int8"), real_int8(*a)))
    for kind in ("sparse", "dense"):
        adapter = _adapter("peft", kind, spread=1.0)
        for key in adapter.layers:
            exact, bound = _fp32_gemm_bound(adapter, key)
            got = _merged(adapter, key, "auto").double()
            assert float((got - exact).norm() / exact.norm()) <= 1e-5, (kind, key)
    assert ran == (["int8"] * len(LAYERS) if fast_int8 else [])


def test_int8_refuses_dense_bases():
    adapter = _adapter("peft", "dense")
    with pytest.raises(UnsupportedPrecisionError, match="ternary"):
        _merged(adapter, "a.weight", "int8")


def test_non_finite_scales_fall_back_to_the_float_path():
    """A NaN in γ must reach the merge's finite check as NaN, never as a garbage int8 limb."""
    adapter = _adapter("philox", "sparse")
    adapter.gammas["a.weight"][0, 3] = float("nan")
    got = _merged(adapter, "a.weight", "int8")
    assert not bool(torch.isfinite(got).all())


def _load(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch,kind", [("llama", "sparse"), ("gpt2", "very_sparse")])
def test_cli_merge_int8_equals_peft(tmp_path, arch, kind):
    """``merge --precision int8`` of a PEFT sparse dir equals PEFT's merge_and_unload (float32 model), and
    ``--precision int8`` on a dense adapter is one line, exit 1, nothing written."""
    gpt2 = arch == "gpt2"
    make = tiny_gpt2 if gpt2 else tiny_llama
    make().save_pretrained(tmp_path / "base")
    pm = peft_randlora(make(), r=6, seed=3, sparse=kind == "sparse", very_sparse=kind == "very_sparse",
                       targets=["c_attn", "c_fc", "c_proj"] if gpt2 else None, fan_in_fan_out=gpt2)
    pm.save_pretrained(tmp_path / "peft")
    expected = {k: v.detach() for k, v in pm.merge_and_unload().state_dict().items()}
    run_cli("merge", tmp_path / "base", tmp_path / "peft", "-o", tmp_path / "out", "--precision", "int8")
    got = _load(tmp_path / "out")
    for key, want in expected.items():
        if key in got:
            assert float((got[key] - want).norm() / want.norm().clamp_min(1e-12)) <= 1e-6, key
    if gpt2:
        return
    peft_randlora(make(), r=6, seed=3).save_pretrained(tmp_path / "dense")
    result = run_cli("merge", tmp_path / "base", tmp_path / "dense", "-o", tmp_path / "out2", "--precision", "int8",
                     check=False)
    assert_one_line_error(result, "ternary")
    assert not (tmp_path / "out2").exists()


def test_library_merge_auto_sparse_equals_peft(tmp_path, monkeypatch):
    """The grouped sparse path through the whole streaming merge (PEFT dir read directly, both orientations of a Llama's
    projections): equal to PEFT's merge_and_unload. The density line is lifted so a tiny model takes it."""
    from randlora_io.merge.plan import merge

    monkeypatch.setattr(ternary_merge, "SPARSE_MAX_DENSITY", 1.0)
    ran = []
    real_sparse = ternary_merge.add_ternary_sparse_
    monkeypatch.setattr(ternary_merge, "add_ternary_sparse_", lambda *a: (ran.append(1), real_sparse(*a))[1])
    tiny_llama().save_pretrained(tmp_path / "base")
    pm = peft_randlora(tiny_llama(), r=6, seed=3, very_sparse=True)
    pm.save_pretrained(tmp_path / "peft")
    expected = {k: v.detach() for k, v in pm.merge_and_unload().state_dict().items()}
    merge(tmp_path / "base", [tmp_path / "peft"], tmp_path / "out", precision="auto")
    got = _load(tmp_path / "out")
    assert len(ran) == 14
    for key, want in expected.items():
        if key in got:
            assert float((got[key] - want).norm() / want.norm().clamp_min(1e-12)) <= 1e-6, key


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at magnitude |x| (float64, exact powers of two)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 7)


def bf16_rounding_stats(adapter, base: dict[str, torch.Tensor], precision: str) -> tuple[float, float]:
    """``precision``'s bf16(W + ΔW) vs the correctly rounded one (ΔW in float64): the fraction of elements equal,
    and the largest error in bf16 ulps of the operands' magnitude max(|W|, |ΔW|, |W + ΔW|) (where W and ΔW cancel,
    an error relative to the tiny sum says nothing about the merge)."""
    equal = total = 0
    worst = 0.0
    for key in adapter.layers:
        delta = _exact(adapter, key)[0]
        exact64 = base[key].double() + delta
        exact = exact64.to(torch.bfloat16)  # float64 → bf16: one rounding
        w = base[key].float()
        add_delta_(w, RandloraSource(adapter), key, 1.0, "torch", Workspace(), precision)
        got = w.to(torch.bfloat16)
        magnitude = torch.maximum(torch.maximum(base[key].double().abs(), delta.abs()), exact64.abs())
        equal += int((got == exact).sum())
        total += got.numel()
        worst = max(worst, float(((got.double() - exact.double()).abs() / _bf16_ulp(magnitude)).max()))
    return equal / total, worst


def _bf16_base(adapter, ratio: float) -> dict[str, torch.Tensor]:
    """bf16 base weights with std(ΔW) / std(W) = ``ratio`` (1 is the hard case for a rounded ΔW)."""
    gen = torch.Generator().manual_seed(3)
    return {key: (torch.randn(_stored_shape(layer), generator=gen) * _exact(adapter, key)[0].std().float() / ratio
                  ).to(torch.bfloat16) for key, layer in adapter.layers.items()}


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_bf16_precision_measured_against_the_correctly_rounded_result(kind):
    """Why ``auto`` never picks the bf16 GEMM, even for bf16 outputs (numbers in bench/RESULTS.md): the float32-class
    paths give the correctly rounded bf16(W + ΔW) but for near-ties; the bf16 GEMM (B, S and ΔW rounded to bf16)
    leaves 2–40 % of the elements one or more bf16 steps off, up to several ulps of the operands."""
    adapter = _adapter("peft", kind, spread=0.5)
    base = _bf16_base(adapter, ratio=1.0)
    frac, worst = bf16_rounding_stats(adapter, base, "bf16")
    assert 0.5 <= frac < 0.95 and 1.0 <= worst <= 32, (frac, worst)
    for precision in ("fp32", "auto") + (("int8",) if kind == "sparse" else ()):
        frac, worst = bf16_rounding_stats(adapter, base, precision)
        assert frac >= 0.999 and worst <= 0.5, (precision, frac, worst)


def test_cpu_merge_bench_smoke(tmp_path):
    """bench/bench_merge_cpu.py at ``--size small`` (one layer, one ternary kind, our int8 side only: the PEFT side
    costs a transformers + peft import, ~3x this test's time): it builds the checkpoint and both adapters, runs the
    side in its own process and prints its line."""
    script = Path(__file__).resolve().parent.parent / "bench" / "bench_merge_cpu.py"
    proc = subprocess.run([sys.executable, str(script), "--size", "small", "--layers", "1", "--rank", "8",
                           "--kinds", "sparse", "--sides", "int8", "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "-- sparse adapter (auto runs: " in proc.stdout
    assert "ours --precision int8" in proc.stdout and "peak RSS" in proc.stdout, proc.stdout
    assert (tmp_path / "w" / "peft-sparse" / "adapter_config.json").is_file()
    assert not list((tmp_path / "w").glob("out-*"))  # each side's output removed after it is measured


@pytest.mark.parametrize("transposed", [False, True])
def test_sparse_product_against_float64_odd_shapes(transposed):
    """``add_ternary_sparse_`` on its own: r ∤ D, M > D, rows of A that are all zero (a group with no column), a
    nonzero W underneath, the target a transposed view or not; within the float32 GEMM bound of float64, and exactly
    the float32 products (no column of W outside A's nonzero columns changes)."""
    gen = torch.Generator().manual_seed(3)
    r, D, M = 5, 23, 41
    n = num_bases(D, r)
    b = torch.randint(-1, 2, (M, r * n + 3), generator=gen).to(torch.float32)
    b[torch.rand(b.shape, generator=gen) < 0.8] = 0.0
    c = 0.37
    A = torch.randint(-1, 2, (r, D), generator=gen).to(torch.float32)
    A[torch.rand(A.shape, generator=gen) < 0.7] = 0.0
    A[1] = 0.0
    A[:, 7] = 0.0
    lam = torch.randn(r, n, generator=gen) * torch.exp(2 * torch.randn(r, n, generator=gen))
    gam = torch.randn(n, D, generator=gen)
    W = torch.randn(M, D, generator=gen)
    basis = ternary_basis(b * c)
    assert basis is not None
    storage = W.T.contiguous().clone() if transposed else W.clone()
    target = storage.T if transposed else storage
    assert ternary_merge.add_ternary_sparse_(target, basis, lam, A, gam, 0.5)
    S = scaled_A(lam.double(), A.double(), gam.double(), dtype=torch.float64)
    B = (b * c).double()[:, : r * n]
    exact = W.double() + 0.5 * (B @ S)
    bound = (r * n + 3) * U * 0.5 * (B.abs() @ S.abs()) + 2 * r * U * exact.abs()
    assert bool(((target.double() - exact).abs() <= bound).all())
    assert torch.equal(target[:, 7], W[:, 7])  # a column no group touches is left bit-identical


def test_sparse_path_refuses_non_finite_scales_even_where_A_is_zero():
    """γ = inf in a column where A is zero: the reference S has inf·0 = NaN there, so the merge must see NaN (the
    float path), not a finite result from skipping the zeros; likewise λ·A·γ overflowing float32."""
    gen = torch.Generator().manual_seed(4)
    r, D, M = 4, 12, 20
    n = num_bases(D, r)
    b = torch.randint(-1, 2, (M, r * n), generator=gen).to(torch.float32)
    A = torch.randint(-1, 2, (r, D), generator=gen).to(torch.float32)
    A[:, 5] = 0.0
    basis = ternary_basis(b)
    lam, gam = torch.randn(r, n, generator=gen), torch.randn(n, D, generator=gen)
    gam[0, 5] = float("inf")
    target = torch.zeros(M, D)
    assert not ternary_merge.add_ternary_sparse_(target, basis, lam, A, gam, 1.0)
    assert torch.equal(target, torch.zeros(M, D))  # nothing added before refusing
    gam[:] = 1e30
    lam[:] = 1e30
    assert not ternary_merge.add_ternary_sparse_(target, basis, lam, A, gam, 1.0)


@pytest.mark.parametrize("case", range(12))
def test_sparse_path_on_random_layer_sets(case, monkeypatch):
    """Random layer sets (shapes, orientation, Conv1D, rank, generator, kind, λ/γ spread): every layer through the
    grouped sparse path (density line lifted) within the float32 GEMM bound of float64, element by element; and
    through ``auto`` with the model's real line (int8 limbs on a CPU with fast int8, else float32 here: tiny models
    are not very sparse) within float32 class of it (relative Frobenius error ≤ 16× the float32 GEMM's: the limbs'
    bound is relative to each column's largest term, test_int8_limbs_within_the_stated_bound_of_float64)."""
    gen = torch.Generator().manual_seed(100 + case)

    def randint(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    layers = {}
    for i in range(randint(1, 4)):
        out_f, in_f = randint(1, 70), randint(1, 70)
        layers[f"l{i}.weight"] = ((out_f, in_f), bool(randint(0, 1)))
    r = randint(1, min(min(shape) for shape, _ in layers.values()))
    name = ("peft", "philox")[case % 2]
    kind = ("very_sparse", "sparse")[(case // 2) % 2]
    adapter = _adapter(name, kind, layers=layers, r=r, spread=float(randint(0, 3)))
    if ternary_basis(adapter.bases().B) is None:
        pytest.skip("bases drew no nonzero")  # an all-zero tiny very_sparse basis
    auto = {key: _merged(adapter, key, "auto") for key in layers}
    monkeypatch.setattr(ternary_merge, "SPARSE_MAX_DENSITY", 1.0)
    for key in layers:
        exact, bound = _fp32_gemm_bound(adapter, key)
        got = _merged(adapter, key, "auto").double()
        assert bool(((got - exact).abs() <= bound).all()), key
        fp32 = _merged(adapter, key, "fp32").double()
        norm = float(exact.norm())
        if norm > 0:
            rel_auto = float((auto[key].double() - exact).norm()) / norm
            assert rel_auto <= max(16 * float((fp32 - exact).norm()) / norm, 2**-21), key
