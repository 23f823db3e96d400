"""Mixed precision: the layer trains under ``torch.autocast`` (bf16 and fp16), λ/γ stay float32, and the gradients
equal the float32 reference's within autocast's own tolerance."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama

from randlora_io.train import RandloraConfig, randlora_linear, randlora_linear_reference
from randlora_io.train import attach

# autocast rounds the layer input and the base weight to 8 (bf16) or 11 (fp16) mantissa bits before the base GEMM;
# the gradients that come back through it are off from float32 by a few of those roundings, relative to their norm
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def rel_err(a: torch.Tensor, e: torch.Tensor) -> float:
    return float((a.detach().float() - e.detach().float()).norm() / e.detach().float().norm())


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["auto", "factored", "merged"])
@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_layer_under_autocast_matches_the_float32_reference(amp, mode, shape):
    out_f, in_f = shape
    D, M, r = min(shape), max(shape), 4
    n = -(-D // r)
    g = torch.Generator().manual_seed(out_f)
    x = torch.randn(3, 40, in_f, generator=g, requires_grad=True)    # 120 tokens: auto picks the merged path
    W, b = torch.randn(out_f, in_f, generator=g) * 0.2, torch.randn(out_f, generator=g)
    lam = (torch.randn(r, n, generator=g) * 0.3).requires_grad_()
    gam = (torch.randn(n, D, generator=g) * 0.3).requires_grad_()
    A, U_B = torch.randn(r, D, generator=g), torch.randn(M, r * n, generator=g)
    upstream = torch.randn(3, 40, out_f, generator=g)
    with torch.autocast("cpu", dtype=amp):
        y = randlora_linear(x, x, W, b, lam, gam, A, U_B, 0.5, mode)
    assert y.dtype == amp
    ours = torch.autograd.grad(y, (x, lam, gam), upstream.to(amp))
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == torch.float32
    ref_y = randlora_linear_reference(x, x, W, b, lam, gam, A, U_B, 0.5)
    expected = torch.autograd.grad(ref_y, (x, lam, gam), upstream)
    assert rel_err(y, ref_y) < TOLERANCE[amp]
    for a, e in zip(ours, expected):
        assert rel_err(a, e) < TOLERANCE[amp], (rel_err(a, e), a.dtype)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_a_model_trains_under_autocast_with_float32_scales(amp):
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = {}
    for use_amp in (False, True):
        model = tiny_llama()
        handle = attach(model, RandloraConfig(r=4, seed=1))
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in handle.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        model.train()
        with torch.autocast("cpu", dtype=amp, enabled=use_amp):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads[use_amp] = [p.grad.clone() for p in handle.parameters()]
        optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-3)
        optimizer.step()
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in handle.parameters())
    # the whole model runs in half precision here (attention, norms' outputs, lm_head), so the model-level bound is
    # looser than the layer's above; a wrong adapter dtype path is off by far more than this
    assert all(a.dtype == torch.float32 for a in grads[True])
    assert rel_err(torch.cat([a.flatten() for a in grads[True]]), torch.cat([e.flatten() for e in grads[False]])) < 5e-2
