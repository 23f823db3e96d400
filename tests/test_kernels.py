"""The Triton merge kernel against its torch reference, and its in-kernel Philox against the numpy generator, bit for
bit: on CUDA when a GPU is present, else under TRITON_INTERPRET=1 on CPU tensors (set in conftest).

Tolerances: fp32 W — the kernel and the reference sum the same fp32 products in another order: ≤ 1e-5 relative to
the update's scale. bf16 W — both add in fp32 and round once, so they may differ only where the fp32 sums straddle a
rounding boundary: at most 1 ulp of the result.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from randlora_io.basis import generate_bases, philox_block_numpy
from randlora_io.kernels.merge_triton import merge_layer_reference_, merge_layer_triton_, philox_block_triton
from randlora_io.philox import MATRIX_A, MATRIX_B
from randlora_io.spec import SPARSE_THRESHOLD, GeneratorSpec, LayerSpec, very_sparse_threshold

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
