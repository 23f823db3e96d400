"""checkpoint/fp8_blocks.py: the block quantizer and dequantizer against their float64 reference (bit for bit), and
the reference against the tests' own frexp-based quantizer (fp8_models.py); partial blocks, zero blocks, saturation,
subnormal codes, leading (expert) dims."""

from __future__ import annotations

import pytest
import torch
from fp8_models import dequant64, quantize64

from randlora_io.checkpoint.fp8_blocks import (dequantize, dequantize_into, e4m3_values, quantize, reference_dequantize,
                                               reference_quantize, scale_grid)


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Values over many binades (so codes land on subnormals too), a zero block and an outlier."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.exp2(torch.randint(-12, 4, (rows, cols), generator=gen))
    w[:16, :16] = 0
    w[-1, -1] = 300.0
    return w


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.view(torch.int32)


@pytest.mark.parametrize("shape,block", [((40, 56), (16, 16)), ((33, 17), (16, 8)), ((160, 200), (128, 128)),
                                         ((8, 8), (128, 128))])
def test_quantize_equals_its_float64_reference_and_the_tests_quantizer(shape, block):
    w = _weight(*shape)
    q, s = quantize(w.clone(), block)
    rq, rs = reference_quantize(w, block)
    tq, ts = quantize64(w, block)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and tuple(s.shape) == scale_grid(shape, block)
    assert torch.equal(_bits(q), _bits(rq)) and torch.equal(_bits(s), _bits(rs))
    assert torch.equal(_bits(q), _bits(tq)) and torch.equal(_bits(s), _bits(ts))


def test_an_all_zero_block_gets_scale_one_and_zero_codes():
    w = _weight(40, 40)
    q, s = quantize(w.clone(), (16, 16))
    assert float(s[0, 0]) == 1.0 and not bool(q[:16, :16].float().any())
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())


def test_codes_saturate_and_never_become_nan():
    w = torch.zeros(4, 4)
    w[0, 0] = 1.0
    w[0, 1] = -1.0 + 2.0 ** -20  # |x|·448/amax just under 448: rounds to the top code
    q, s = quantize(w.clone(), (4, 4))
    assert float(q.float().abs().max()) == 448.0 and not bool(torch.isnan(q.float()).any())


def test_dequantize_equals_the_reference_rounded_to_float32():
    block = (16, 16)
    q, s = quantize(_weight(40, 56), block)
    out = torch.empty(q.shape)
    dequantize_into(out, q, s, block)
    want = reference_dequantize(q, s, block)
    assert torch.equal(out, want.float()) and torch.equal(want, dequant64(q, s, block))
    assert torch.equal(dequantize(q, s, block, torch.bfloat16), want.float().to(torch.bfloat16))


def test_leading_dims_are_independent_matrices():
    w = torch.stack([_weight(24, 40, seed=i) for i in range(3)])
    q, s = quantize(w.clone(), (16, 16))
    for e in range(3):
        rq, rs = reference_quantize(w[e], (16, 16))
        assert torch.equal(_bits(q[e]), _bits(rq)) and torch.equal(s[e], rs)


def test_code_table_is_e4m3fn():
    table = e4m3_values()
    assert len(table) == 127 and float(table[-1]) == 448.0 and float(table[1]) == 2.0 ** -9
    assert torch.equal(table, torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).double())
