"""The training layer's fast paths (randlora_io/train/function.py): every forward / backward plan gives the naive
reference's outputs and gradients, and ``auto`` runs the plan with the fewest FLOPs as torch's own FLOP counter
measures them (not as the code under test estimates them)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from randlora_io.train import RandloraConfig, randlora_linear, randlora_linear_reference
from randlora_io.train import attach
from randlora_io.train.function import Plan, randlora_update

PLANS = [Plan(f, x, d) for f, x, d in itertools.product(["merged", "factored"], ["merged", "factored"],
                                                        ["gram", "projected"])]
# (out, in): in < out, in > out, square; r = 3 does not divide D = 7 or 10 (a partial last basis)
SHAPES = [(12, 7), (7, 12), (10, 10), (16, 40), (40, 16)]


def make(shape, r=3, dtype=torch.float64, tokens=(2, 5), seed=0, bias=True):
    out_f, in_f = shape
    D, M = min(shape), max(shape)
    n = -(-D // r)
    g = torch.Generator().manual_seed(seed + out_f * 100 + in_f)
    x = torch.randn(*tokens, in_f, dtype=dtype, generator=g, requires_grad=True)
    W = torch.randn(out_f, in_f, dtype=dtype, generator=g) * 0.3
    b = torch.randn(out_f, dtype=dtype, generator=g) if bias else None
    lam = (torch.randn(r, n, dtype=dtype, generator=g) * 0.5).requires_grad_()
    gam = (torch.randn(n, D, dtype=dtype, generator=g) * 0.5).requires_grad_()
    A, U_B = torch.randn(r, D, generator=g), torch.randn(M, r * n, generator=g)
    upstream = torch.randn(*tokens, out_f, dtype=dtype, generator=g)
    return x, W, b, lam, gam, A, U_B, upstream


def grads(y, inputs, upstream):
    wanted = [t for t in inputs if t.requires_grad]
    got = iter(torch.autograd.grad(y, wanted, upstream, retain_graph=True))
    return [next(got) if t.requires_grad else None for t in inputs]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropout", [False, True])
def test_every_plan_gives_the_reference_outputs_and_gradients_float64(shape, plan, dropout):
    x, W, b, lam, gam, A, U_B, upstream = make(shape)
    xd = x * (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > 0.3) if dropout else x
    y = randlora_linear(x, xd, W, b, lam, gam, A, U_B, 0.7, plan)
    ref = randlora_linear_reference(x, xd, W, b, lam, gam, A, U_B, 0.7)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads(y, (x, lam, gam), upstream), grads(ref, (x, lam, gam), upstream)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("plan", [Plan("merged", "merged", "gram"), Plan("merged", "factored", "projected"),
                                  Plan("factored", "merged", "projected"), Plan("factored", "factored", "gram")],
                         ids=lambda p: "-".join(p))
@pytest.mark.parametrize("shape", [(7, 5), (5, 7)])
def test_gradcheck_each_backward_combination(shape, plan):
    x, W, b, lam, gam, A, U_B, _ = make(shape, r=2, tokens=(2, 3))
    assert torch.autograd.gradcheck(lambda x, lam, gam: randlora_linear(x, x, W, b, lam, gam, A, U_B, 0.7, plan),
                                    (x, lam, gam))


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
@pytest.mark.parametrize("frozen", ["x", "scales", "gamma"])
def test_only_the_wanted_gradients_are_computed_and_they_are_right(shape, frozen):
    """The first layer's input needs no gradient; frozen λ/γ need none: the backward skips that work and the
    gradients it does return still equal the reference's."""
    x, W, b, lam, gam, A, U_B, upstream = make(shape, tokens=(4, 6))
    if frozen == "x":
        x.requires_grad_(False)
    elif frozen == "scales":
        lam.requires_grad_(False)
        gam.requires_grad_(False)
    else:
        gam.requires_grad_(False)
    for mode in ("auto", "merged", "factored"):
        ours = grads(randlora_linear(x, x, W, b, lam, gam, A, U_B, 0.7, mode), (x, lam, gam), upstream)
        ref = grads(randlora_linear_reference(x, x, W, b, lam, gam, A, U_B, 0.7), (x, lam, gam), upstream)
        for a, e in zip(ours, ref):
            assert (a is None) == (e is None)
            if a is not None:
                torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
@pytest.mark.parametrize("dropout", [False, True])
def test_the_adapter_path_alone_equals_the_reference_with_a_zero_weight(shape, dropout):
    """``randlora_update`` (a base called as a module, e.g. FSDP-wrapped): the adapter term alone, float32."""
    x, W, _, lam, gam, A, U_B, upstream = make(shape, dtype=torch.float32)
    xd = x * 0.5 if dropout else x
    y = randlora_update(xd, lam, gam, A, U_B, 0.7, shape)
    ref = randlora_linear_reference(x, xd, torch.zeros_like(W), None, lam, gam, A, U_B, 0.7)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    for a, e in zip(grads(y, (x, lam, gam), upstream), grads(ref, (x, lam, gam), upstream)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plan", [Plan("factored", "factored", "gram"), Plan("factored", "factored", "projected")],
                         ids=lambda p: "-".join(p))
@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
@pytest.mark.parametrize("dropout", [False, True])
def test_autocast_bf16_each_plan_matches_the_float32_reference(shape, plan, dropout):
    """Under autocast the weight is bf16, so merging is impossible: the factored plans, both ways to dL/dS, with and
    without dropout, within autocast's own tolerance (tests/test_train_amp.py's)."""
    x, W, b, lam, gam, A, U_B, upstream = make(shape, r=4, dtype=torch.float32, tokens=(3, 40))
    xd = x * (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) > 0.2) if dropout else x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = randlora_linear(x, xd, W, b, lam, gam, A, U_B, 0.5, plan)
    assert y.dtype == torch.bfloat16
    ours = grads(y, (x, lam, gam), upstream.bfloat16())
    ref = randlora_linear_reference(x, xd, W, b, lam, gam, A, U_B, 0.5)
    expected = grads(ref, (x, lam, gam), upstream)
    assert ours[0].dtype == ours[1].dtype == ours[2].dtype == torch.float32

    def rel(a, e):
        return float((a.detach().float() - e.detach().float()).norm() / e.detach().float().norm())

    assert rel(y, ref) < 3e-2
    for a, e in zip(ours, expected):
        assert rel(a, e) < 3e-2




def _addmm_inplace_flops(self, a, b, *args, out_val=None, **kwargs) -> int:
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


_addmm_inplace_flops._get_raw = True
# torch's counter knows addmm but not its in-place form, which the layer uses to accumulate onto the base product
COUNT = {torch.ops.aten.addmm_: _addmm_inplace_flops}


def measured_flops(shape, tokens, mode, requires=(True, True, True)):
    """(forward, backward) FLOPs of one call as torch's FLOP counter counts them (matrix products)."""
    x, W, b, lam, gam, A, U_B, upstream = make(shape, r=4, dtype=torch.float32, tokens=(1, tokens))
    for t, want in zip((x, lam, gam), requires):
        t.requires_grad_(want)
    with FlopCounterMode(display=False, custom_mapping=COUNT) as fwd:
        y = randlora_linear(x, x, W, b, lam, gam, A, U_B, 0.7, mode)
    with FlopCounterMode(display=False, custom_mapping=COUNT) as bwd:
        grads(y, (x, lam, gam), upstream)
    return fwd.get_total_flops(), bwd.get_total_flops()


@pytest.mark.parametrize("shape,tokens", [((40, 16), 24), ((16, 40), 24), ((16, 16), 24), ((40, 16), 8),
                                          ((16, 40), 200), ((40, 16), 200), ((16, 16), 4)])
def test_auto_runs_the_plan_with_the_fewest_measured_flops(shape, tokens):
    """Forward and backward each pick their cheapest plan, so the forward may merge W + s·ΔW while the backward
    stays factored (in < out at a few tokens), or the input gradient goes through W + s·ΔW while dL/dS is
    projected (in > out)."""
    auto = measured_flops(shape, tokens, "auto")
    forced = {plan: measured_flops(shape, tokens, plan) for plan in PLANS}
    assert auto[0] == min(f for f, _ in forced.values())
    assert auto[1] == min(b for _, b in forced.values())
    assert sum(auto) <= min(sum(measured_flops(shape, tokens, m)) for m in ("merged", "factored"))


@pytest.mark.parametrize("shape", [(40, 16), (16, 40)])
def test_auto_is_cheaper_than_both_fixed_modes_where_they_mix(shape):
    """At 24 tokens (out·in < T·(out + in): the forward merges) the best backward is not the merged one; the old
    rule ran the merged plan in both passes."""
    auto = sum(measured_flops(shape, 24, "auto"))
    assert auto < min(sum(measured_flops(shape, 24, m)) for m in ("merged", "factored"))


@pytest.mark.parametrize("requires", [(False, True, True), (True, False, False)])
def test_auto_skips_the_gradients_nobody_wants(requires):
    """No input gradient (the first layer) or no scale gradient: the backward's FLOPs drop to the wanted part's."""
    full = measured_flops((40, 16), 24, "auto")[1]
    part = measured_flops((40, 16), 24, "auto", requires)[1]
    assert part < full


def test_an_attached_llama_step_equals_the_reference_layer(monkeypatch):
    """The whole model: a training step through the attached layers (auto plans: merged forward, mixed backward at
    these shapes) gives the same loss and λ/γ gradients as the same model run through the reference formula."""
    from test_train import randomise
    from tiny_models import tiny_llama

    import randlora_io.train.layer as layer_module

    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for reference in (False, True):
        model = tiny_llama()
        handle = attach(model, RandloraConfig(r=4, seed=1))
        randomise(handle, seed=3)
        if reference:  # the reference formula in every layer (the mode argument it does not take is dropped)
            monkeypatch.setattr(layer_module, "randlora_linear", lambda *a, **k: randlora_linear_reference(*a[:9]))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in handle.parameters()]))
    (loss, got), (ref_loss, expected) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, e in zip(got, expected):  # float32: the old single-plan code was off by 1.3e-5 here, this by 1.8e-5
        assert float((a - e).norm() / e.norm()) < 1e-4
