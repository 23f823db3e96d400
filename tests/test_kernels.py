"""The Triton merge kernel against its torch reference, and its in-kernel Philox against the numpy generator, bit for
bit: on CUDA when a GPU is present, else under TRITON_INTERPRET=1 on CPU tensors (set in conftest).

Tolerances: fp32 W — the kernel (default ``split`` precision: exact bf16 limb products, float32 accumulation, see
``randlora_io.kernels.limbs``) and the reference sum the same products in another order: ≤ 1e-5 relative to the
update's scale. bf16 W — both add in fp32 and round once, so they may differ only where the fp32 sums straddle a
rounding boundary: at most 1 ulp of the result.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from randlora_io.format.basis import generate_bases, philox_block_numpy
from randlora_io.kernels.merge_triton import merge_layer_reference_, merge_layer_triton_, philox_block_triton
from randlora_io.format.philox import MATRIX_A, MATRIX_B
from randlora_io.format.spec import SPARSE_THRESHOLD, GeneratorSpec, LayerSpec, very_sparse_threshold

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def philox(kind: str, seed: int = 2**40 + 7) -> GeneratorSpec:
    threshold = {"dense": None, "sparse": SPARSE_THRESHOLD, "very_sparse": very_sparse_threshold(40)}[kind]
    return GeneratorSpec(name="philox", kind=kind, seed=seed, threshold=threshold)


@pytest.mark.parametrize("kind", ["dense", "sparse", "very_sparse"])
@pytest.mark.parametrize("matrix", [MATRIX_A, MATRIX_B])
def test_in_kernel_philox_equals_the_numpy_generator_bitwise(kind, matrix):
    gen = philox(kind, seed=2**63 + 12345)
    rows, cols = slice(3, 40), slice(5, 62)   # an offset, odd-sized block: counters and word selection both move
    ours = philox_block_triton(gen, matrix, rows, cols, device=DEVICE).cpu().numpy()
    expected = philox_block_numpy(gen, matrix, rows, cols)
    assert ours.dtype == expected.dtype and np.array_equal(ours.view(np.uint32), expected.view(np.uint32))


def ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    exp = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, exp - 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,fan", [((37, 23), False), ((23, 37), False), ((37, 23), True), ((29, 29), False)])
@pytest.mark.parametrize("bases_from", ["philox-in-kernel", "philox-sparse-in-kernel", "peft-tensor", "peft-sparse"])
def test_kernel_equals_the_reference(shape, fan, dtype, bases_from):
    r = 5                                            # r ∤ D: a partial last basis
    D, M = min(shape), max(shape)
    n = -(-D // r)
    if bases_from.startswith("philox"):
        gen = philox("sparse" if "sparse" in bases_from else "dense")
    else:
        kind = "sparse" if "sparse" in bases_from else "dense"
        gen = GeneratorSpec(name="peft", kind=kind, seed=3, draw_dtype="bfloat16" if kind == "dense" else "float32")
    bases = generate_bases(gen, r, 40, 41)           # model-wide bases larger than this layer: prefix slices
    layer = LayerSpec(key="w", shape=shape, fan_in_fan_out=fan, num_bases=n, dtype="float32")
    g = torch.Generator().manual_seed(D * M)
    lam, gam = torch.randn(r, n, generator=g), torch.randn(n, D, generator=g)
    W = torch.randn(shape, generator=g).to(DEVICE, dtype)
    ours, ref = W.clone(), W.clone()
    in_kernel = bases_from.endswith("in-kernel")
    merge_layer_triton_(ours, layer, lam, gam, bases.A, None if in_kernel else bases.B, 0.3, gen,
                        blocks=(16, 16, 16))
    merge_layer_reference_(ref, layer, lam, gam, bases.A, bases.B, 0.3)
    assert not torch.equal(ref, W)
    if dtype == torch.float32:
        scale = float((ref - W).abs().max())
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * scale)
    else:
        diff = (ours.float() - ref.float()).abs()
        assert bool((diff <= ulp_bf16(ref.float())).all()), float(diff.max())


def test_kernel_refuses_what_it_cannot_merge():
    layer = LayerSpec(key="w", shape=(8, 8), fan_in_fan_out=False, num_bases=2, dtype="float32")
    lam, gam, A = torch.zeros(4, 2), torch.zeros(2, 8), torch.zeros(4, 8)
    with pytest.raises(TypeError, match="fp32/bf16/fp16"):
        merge_layer_triton_(torch.zeros(8, 8, dtype=torch.int8), layer, lam, gam, A, None, 1.0, philox("dense"))
    with pytest.raises(ValueError, match="records"):
        merge_layer_triton_(torch.zeros(8, 9), layer, lam, gam, A, None, 1.0, philox("dense"))
    peft = GeneratorSpec(name="peft", kind="dense", seed=0, draw_dtype="bfloat16")
    with pytest.raises(ValueError, match="philox"):
        merge_layer_triton_(torch.zeros(8, 8), layer, lam, gam, A, None, 1.0, peft)


def test_merge_with_the_kernel_equals_the_torch_path(llama_dir, tmp_path):
    """``merge --kernel triton`` (interpreted here, the CUDA path on a GPU) writes what the addmm path writes."""
    from conftest import run_cli
    from safetensors.torch import load_file
    from tiny_models import peft_randlora, tiny_llama

    peft_dir = tmp_path / "peft"
    peft_randlora(tiny_llama(), r=4, seed=1).save_pretrained(peft_dir)
    run_cli("merge", llama_dir, peft_dir, "-o", tmp_path / "torch", "--kernel", "torch", "--device", "cpu")
    run_cli("merge", llama_dir, peft_dir, "-o", tmp_path / "triton", "--kernel", "triton", "--device", DEVICE)
    a, b = load_file(tmp_path / "torch" / "model.safetensors"), load_file(tmp_path / "triton" / "model.safetensors")
    base = load_file(llama_dir / "model.safetensors")
    for key in a:
        scale = float((a[key] - base[key]).abs().max())
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5 * scale + 1e-12)


# ---- tensor-core numerics: the ``split`` precision (bf16 limbs) against float64 -----------------------------------

from randlora_io.kernels.limbs import PRODUCT_BOUND, is_bf16_exact, split3, split_matmul  # noqa: E402


def test_split3_limbs_sum_exactly_to_the_float32_value():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.pow(2.0, torch.randint(-60, 60, (4096,), generator=g).float())
    x = torch.cat([x, torch.tensor([1.0 - 2**-24, -(1 + 2**-23), 3.0, 0.0, 2.0**-126])])
    hi, mid, lo = split3(x)
    assert torch.equal(hi.double() + mid.double() + lo.double(), x.double())
    assert (mid.double().abs() <= hi.double().abs() * 2**-8).all()
    assert (lo.double().abs() <= x.double().abs() * 2**-16).all()


@pytest.mark.parametrize("u_kind", ["bf16-exact", "24-bit"])
def test_split_limb_arithmetic_error_is_within_its_stated_bound(u_kind):
    """The kernel's limb products, summed in float64, against U @ S in float64: zero error when U is exact in bf16
    (3 MMAs), ≤ (2^-23 + 2^-32)·Σ|u||s| otherwise (6 MMAs). With the kernel's float32 accumulation the error stays
    float32-class (≤ 1e-6 of the result's scale here), where one bf16 MMA is ≈ 1e-3."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(48, 96, generator=g)
    if u_kind == "bf16-exact":
        u = u.to(torch.bfloat16).float()
    s = torch.randn(96, 40, generator=g) * torch.rand(96, 40, generator=g)
    limbs = 1 if u_kind == "bf16-exact" else 3
    exact = u.double() @ s.double()
    magnitude = u.double().abs() @ s.double().abs()
    bound = (PRODUCT_BOUND[limbs] + 2**-48) * magnitude      # + float64's own summation rounding
    err64 = (split_matmul(u, s, limbs, accumulate=torch.float64) - exact).abs()
    assert bool((err64 <= bound).all()), float((err64 - bound).max())
    if limbs == 1:
        assert float(err64.max()) < 1e-12   # products exact; float64 rounding only
    scale = float(exact.abs().max())
    err32 = float((split_matmul(u, s, limbs) - exact).abs().max()) / scale
    err_bf16 = float(((u.bfloat16().double() @ s.bfloat16().double()) - exact).abs().max()) / scale
    assert err32 < 1e-6 and err_bf16 > 1e-4, (err32, err_bf16)


def _w0_merge(B: torch.Tensor, precision: str = "split", gen: GeneratorSpec | None = None):
    """ΔW = U·S through the kernel on a zero fp32 weight (scaling 1), its float64 value, and U, S."""
    from randlora_io.format.delta import scaled_A

    r, D, M = 4, 24, 40
    n = -(-D // r)
    layer = LayerSpec(key="w", shape=(M, D), fan_in_fan_out=False, num_bases=n, dtype="float32")
    g = torch.Generator().manual_seed(2)
    lam, gam, A = torch.randn(r, n, generator=g), torch.randn(n, D, generator=g), torch.randn(r, D, generator=g)
    out = merge_layer_triton_(torch.zeros(M, D, device=DEVICE), layer, lam, gam, A, B, 1.0, gen,
                              precision=precision, blocks=(16, 16, 16)).cpu()
    S = scaled_A(lam, A, gam)
    return out, B[:M, : r * n].double() @ S.double(), B[:M, : r * n], S


def test_kernel_split_precision_is_float32_class_and_bf16_is_not():
    """Under the interpreter the kernel runs the same limb split (bf16 roundings included): ``split`` within 1e-6 of
    float64, ``bf16`` visibly not, so the first is not passing by accident."""
    B = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))      # 24-bit values: 6-MMA path
    split, exact, u, s = _w0_merge(B)
    scale = float(exact.abs().max())
    assert float((split.double() - exact).abs().max()) / scale < 1e-6
    magnitude = u.double().abs() @ s.double().abs()
    limb_bound = (PRODUCT_BOUND[3] + u.shape[1] * 2**-24) * magnitude  # limbs + float32 accumulation (worst case)
    assert bool(((split.double() - exact).abs() <= limb_bound).all())
    bf16, _, _, _ = _w0_merge(B, "bf16")
    assert float((bf16.double() - exact).abs().max()) / scale > 1e-4
    with pytest.raises(ValueError, match="precision"):
        _w0_merge(B, "fp8")


def test_kernel_notices_bases_that_are_not_exact_in_bf16_even_after_an_in_place_change():
    """The 3-MMA path (U taken as bf16) is only for bases exact in bf16; the check is cached on the bases tensor and
    must be redone when the tensor changes in place, else the changed value would be rounded to bf16 silently."""
    B = torch.randn(40, 32, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).float()
    assert is_bf16_exact(B)
    out, exact, _, _ = _w0_merge(B)
    assert float((out.double() - exact).abs().max()) / float(exact.abs().max()) < 1e-6
    B[0, 0] += B[0, 0].abs() * 2**-10 + 2**-30       # below bf16's half-ulp: lost if U were rounded to bf16
    assert not is_bf16_exact(B)
    out, exact, _, _ = _w0_merge(B)
    assert float((out.double() - exact).abs().max()) / float(exact.abs().max()) < 1e-6
