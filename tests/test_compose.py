"""randlora_io.merge.compose against a second implementation transcribed from mergekit 0.1.5.

The reference below (``_ref_*``) is transcribed, independently of compose.py, from the mergekit 0.1.5 wheel on
PyPI (mergekit-0.1.5-py3-none-any.whl, sha256 776a1a1dd0673fad16a8ccfee6880c511c54c94ca30038a8adf29c3ae7af2fc2):
``mergekit/sparsify.py`` (magnitude, magnitude_outliers, bernoulli, rescaled_masked_tensor),
``mergekit/merge_methods/generalized_task_arithmetic.py`` (GeneralizedTaskArithmeticMerge.merge_group, get_mask),
``mergekit/merge_methods/registry.py`` (per-method defaults). It keeps mergekit's own formulation (full argsort /
sort, stacked tensors) so that it is a real second implementation. torch.bernoulli is replaced by the given mask.
"""

import itertools
import math

import pytest
import torch

from randlora_io.errors import SourceFormatError
from randlora_io.merge.compose import (DEFAULTS, METHODS, compose, consensus, dare_keep_mask, dare_uniforms,
                                       sparsify)

# --- reference, transcribed from mergekit 0.1.5 -----------------------------------------------------------------

_REF_REGISTRY = {  # registry.py: (consensus_method, sparsification_method, default_normalize, default_rescale)
    "task_arithmetic": (None, None, False, False),
    "ties": ("sum", "magnitude", True, False),
    "dare_ties": ("sum", "random", False, True),
    "dare_linear": (None, "random", False, True),
    "breadcrumbs": (None, "magnitude_outliers", False, False),
    "breadcrumbs_ties": ("sum", "magnitude_outliers", False, False),
}


def _ref_rescaled(tensor, mask, l1, eps=1e-7):
    masked = tensor * mask
    if not l1:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _ref_sparsify(tensor, density, method, l1, gamma, keep):
    if density >= 1:
        return tensor
    n = tensor.numel()
    mask = torch.zeros(n, dtype=tensor.dtype)
    w = tensor.abs().reshape(-1).float()
    if method == "magnitude":
        k = max(1, int(density * n))
        mask[torch.argsort(w, descending=True)[:k]] = 1
    elif method == "magnitude_outliers":
        target_n = int(density * n)
        n_top = int(gamma * n)
        n_bot = max(0, n - target_n - n_top)
        mask[torch.sort(w, descending=False).indices[n_bot:n_bot + target_n]] = 1
    else:  # bernoulli, with the caller's mask instead of torch.bernoulli
        mask = keep.reshape(-1).float()
    return _ref_rescaled(tensor, mask.reshape_as(tensor), l1)


def _ref_get_mask(delta, method):
    sign = delta.sign()
    if method == "sum":
        majority = (delta.sum(dim=0) >= 0).to(delta.dtype) * 2 - 1
    else:
        majority = (sign.sum(dim=0) >= 0).to(delta.dtype) * 2 - 1
    return sign == majority


def _ref_merge(taus, weights, method, densities, lam, keeps, gamma=0.01, normalize=None, rescale=None):
    cons, spars, dnorm, dresc = _REF_REGISTRY[method]
    normalize = dnorm if normalize is None else normalize
    rescale = dresc if rescale is None else rescale
    shape = next(t for t in taus if t is not None).shape
    deltas = []
    for tau, d, keep in zip(taus, densities, keeps):
        delta = torch.zeros(shape) if tau is None else tau.clone()
        if spars:
            delta = _ref_sparsify(delta, d, spars, rescale, gamma, keep)
        deltas.append(delta)
    deltas = torch.stack(deltas, dim=0)
    w = torch.tensor(weights, dtype=deltas.dtype)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas = deltas * w
    if cons:
        mask = _ref_get_mask(deltas, cons)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return mixed


# --- helpers -----------------------------------------------------------------------------------------------------

SHAPES = [(1,), (7,), (13, 5), (3, 4, 9), (64, 33), (2, 3, 5, 7)]
DENSITIES = [0.1, 0.35, 0.9]
WEIGHTS = [0.7, -0.4, 1.3]


def _taus(shape, seed, none_at=1):
    """3 float32 τ with continuous random values and pairwise distinct |τ| (no ties at a trimming threshold):
    |τ| = 3 * (a random permutation of 0..n-1 + a uniform in [0.1, 0.9]) / n, random signs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    n = torch.Size(shape).numel()
    for _ in range(3):
        mag = (torch.randperm(n, generator=g) + 0.1 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)) * 3 / n
        sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        t = (mag * sign).float().reshape(shape)
        assert torch.unique(t.abs()).numel() == t.numel()
        out.append(t)
    if none_at is not None:
        out[none_at] = None
    return out


def _masks(shape, densities, seed=7):
    return [dare_keep_mask(seed, i, "blk.weight", shape, d) for i, d in enumerate(densities)]


# --- compose vs reference ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(method, shape):
    for k, dens in enumerate(DENSITIES):
        taus = _taus(shape, seed=100 * len(shape) + k)
        ds = [dens, 0.5, min(1.0, dens + 0.05)]
        keeps = _masks(shape, ds)
        for lam, kw in [(1.0, {}), (0.8, {}), (1.5, {"normalize": True}), (0.8, {"normalize": False})]:
            ours = compose(taus, WEIGHTS, method, density=ds, lambda_=lam, keep_masks=keeps, **kw)
            ref = _ref_merge(taus, WEIGHTS, method, ds, lam, keeps, **kw)
            assert ours.dtype == torch.float32 and ours.shape == torch.Size(shape)
            torch.testing.assert_close(ours, ref, rtol=1.3e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.3, 0.95])
def test_breadcrumbs_gamma_matches_reference(method, gamma):
    for shape, dens in itertools.product([(7,), (64, 33), (101,)], [0.1, 0.5, 0.9]):
        taus = _taus(shape, seed=3)
        ours = compose(taus, WEIGHTS, method, density=dens, gamma=gamma)
        ref = _ref_merge(taus, WEIGHTS, method, [dens] * 3, 1.0, [None] * 3, gamma=gamma)
        torch.testing.assert_close(ours, ref, rtol=1.3e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare_linear"])
@pytest.mark.parametrize("rescale", [True, False])
def test_rescale_override_matches_reference(method, rescale):
    shape = (40, 9)
    taus = _taus(shape, seed=11, none_at=None)
    keeps = _masks(shape, [0.3] * 3)
    ours = compose(taus, WEIGHTS, method, density=0.3, keep_masks=keeps, rescale=rescale)
    ref = _ref_merge(taus, WEIGHTS, method, [0.3] * 3, 1.0, keeps, rescale=rescale)
    torch.testing.assert_close(ours, ref, rtol=1.3e-6, atol=1e-6)


def test_sparsify_counts_and_l1():
    t = _taus((50, 20), seed=5, none_at=None)[0]
    assert int((sparsify(t, "magnitude", 0.25) != 0).sum()) == 250
    assert int((sparsify(t, "magnitude", 1e-6) != 0).sum()) == 1  # k = max(1, int(d * n))
    kept = sparsify(t, "magnitude_outliers", 0.25, gamma=0.1)
    order = torch.argsort(t.abs().reshape(-1))
    assert torch.equal(kept.reshape(-1) != 0, torch.isin(torch.arange(1000), order[650:900]))
    assert not sparsify(torch.tensor([3.0]), "magnitude_outliers", 0.5).any()  # target int(0.5) = 0: mergekit too
    keep = dare_keep_mask(1, 0, "x", t.shape, 0.3)
    d = sparsify(t, "random", 0.3, keep_mask=keep)
    torch.testing.assert_close(d.abs().sum(), t.abs().sum())  # ‖τ‖₁ kept (0.1.5), not 1/density
    assert torch.equal(d != 0, keep)


def test_consensus_matches_get_mask():
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(6, 11, generator=g) for _ in range(4)]
    ws[2][0, :3] = 0.0
    for method in ("sum", "count"):
        assert torch.equal(consensus(ws, method), _ref_get_mask(torch.stack(ws), method))
    a, b = torch.tensor([1.0, -1.0, 0.0]), torch.tensor([-1.0, 1.0, 0.0])  # ties elect +1; zeros never kept
    assert consensus([a, b], "count").tolist() == [[True, False, False], [False, True, False]]


def test_density_one_is_noop():
    t = _taus((13, 5), seed=9, none_at=None)[0]
    for m in ("magnitude", "magnitude_outliers", "random"):
        assert sparsify(t, m, 1.0, gamma=0.3, keep_mask=torch.zeros(13, 5, dtype=torch.bool)) is t
    taus = _taus((13, 5), seed=9)
    for method in METHODS:  # no keep masks needed at density 1; sparsifying methods reduce to their unsparsified kin
        got = compose(taus, WEIGHTS, method, density=1.0, normalize=False)
        same = "ties" if DEFAULTS[method].consensus else "task_arithmetic"
        assert torch.equal(got, compose(taus, WEIGHTS, same, normalize=False))


@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic_is_weighted_sum_bitwise(shape):
    taus = _taus(shape, seed=21, none_at=None)
    expected = taus[0] * WEIGHTS[0] + taus[1] * WEIGHTS[1] + taus[2] * WEIGHTS[2]
    assert torch.equal(compose(taus, WEIGHTS, "task_arithmetic"), expected)
    taus[1] = None
    assert torch.equal(compose(taus, WEIGHTS, "task_arithmetic"), taus[0] * WEIGHTS[0] + taus[2] * WEIGHTS[2])


def test_none_input_is_zero_tau():
    taus = _taus((64, 33), seed=4)
    zeros = [t if t is not None else torch.zeros(64, 33) for t in taus]
    keeps = _masks((64, 33), [0.4] * 3)
    for method in METHODS:
        a = compose(taus, WEIGHTS, method, density=0.4, keep_masks=keeps, normalize=True)
        b = compose(zeros, WEIGHTS, method, density=0.4, keep_masks=keeps, normalize=True)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- DARE keep mask ----------------------------------------------------------------------------------------------

def test_dare_mask_reproducible_and_distinct():
    a = dare_keep_mask(3, 0, "layers.0.q.weight", (100, 100), 0.5)
    assert a.dtype == torch.bool and a.shape == (100, 100)
    assert torch.equal(a, dare_keep_mask(3, 0, "layers.0.q.weight", [100, 100], 0.5))
    for other in [(4, 0, "layers.0.q.weight"), (3, 1, "layers.0.q.weight"), (3, 0, "layers.0.k.weight")]:
        assert not torch.equal(a, dare_keep_mask(*other, (100, 100), 0.5))
    # bit i depends on the flat index only, across the 2**20 chunk boundary too; lower density keeps a subset
    n = (1 << 20) + 5
    big = dare_keep_mask(3, 0, "k", (n,), 0.5)
    assert torch.equal(big[:1000], dare_keep_mask(3, 0, "k", (10, 100), 0.5).reshape(-1))
    assert not (dare_keep_mask(3, 0, "k", (n,), 0.2) & ~big).any()
    assert dare_keep_mask(3, 0, "k", (), 1.0).shape == () and dare_keep_mask(3, 0, "k", (0, 4), 0.5).numel() == 0


@pytest.mark.parametrize("density", [0.05, 0.5, 0.9, 1.0])
def test_dare_keep_fraction(density):
    n = 1 << 20
    frac = dare_keep_mask(11, 2, "model.embed_tokens.weight", (1024, 1024), density).float().mean().item()
    assert abs(frac - density) < 5 * (density * (1 - density) / n) ** 0.5 + 1e-12


def _python_rule(seed, input_index, key, count):
    """The documented rule, re-implemented with Python ints (a check that the docstring is enough)."""
    import hashlib
    m = (1 << 64) - 1
    msg = b"randlora/dare-keep/v1\x00" + seed.to_bytes(8, "little") + input_index.to_bytes(8, "little")
    s = int.from_bytes(hashlib.blake2b(msg + key.encode("utf-8"), digest_size=8).digest(), "little")
    out = []
    for i in range(count):
        z = (s + (i + 1) * 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        out.append((z ^ (z >> 31)) >> 11)
    return [x * 2.0 ** -53 for x in out]


def test_dare_rule_matches_docstring():
    for args in [(0, 0, "a"), (2 ** 64 - 1, 3, "lm_head.weight"), (99, 2 ** 63, "ünïcode.κey")]:
        assert dare_uniforms(*args, 300).tolist() == _python_rule(*args, 300)


def test_dare_golden():
    # Pinned outputs of the rule in dare_keep_mask's docstring (computed once; must never change).
    assert dare_uniforms(0, 0, "model.layers.0.mlp.down_proj.weight", 4).tolist() == [
        0.14482367899355164, 0.7667649625203208, 0.6554757396226781, 0.003884597333474904]
    assert dare_uniforms(2 ** 64 - 1, 3, "lm_head.weight", 3).tolist() == [
        0.06725678975758786, 0.14916746260169622, 0.893278797903473]
    golden = [
        ((0, 0, "model.layers.0.mlp.down_proj.weight", (64,), 0.5),
         "1001010111111110101111111000111011011000110011000111111111100100"),
        ((1234, 2, "model.layers.7.self_attn.q_proj.weight", (4, 16), 0.1),
         "0000000000000010000000000010001000000000000000000000000000100001"),
        ((42, 1, "ünïcode.κey", (64,), 0.9),
         "1111111110111111111011110011011111111101111111111111111111110110"),
    ]
    for args, bits in golden:
        assert "".join("1" if b else "0" for b in dare_keep_mask(*args).reshape(-1).tolist()) == bits


# --- refusals ----------------------------------------------------------------------------------------------------

def _refused(match, fn, *a, **kw):
    with pytest.raises(SourceFormatError, match=match) as e:
        fn(*a, **kw)
    assert "\n" not in str(e.value)


def test_refusals():
    t = [torch.ones(3), torch.ones(3)]
    for bad in (0.0, -0.1, 1.5, float("nan"), True):
        _refused(r"density .* is outside \(0, 1\]", compose, t, [1, 1], "ties", density=bad)
        _refused(r"density .* is outside \(0, 1\]", sparsify, t[0], "magnitude", bad)
        _refused(r"density .* is outside \(0, 1\]", dare_keep_mask, 0, 0, "k", (3,), bad)
    _refused(r"density .* is outside \(0, 1\]", compose, t, [1, 1], "ties", density=[0.5, 0.0])
    _refused(r"unknown method 'slerp'", compose, t, [1, 1], "slerp")
    _refused(r"unknown method 'dare'", sparsify, t[0], "dare", 0.5)
    _refused(r"unknown method 'median'", consensus, t, "median")
    _refused(r"^compose: 3 weights for 2 inputs$", compose, t, [1, 1, 1], "task_arithmetic")
    _refused(r"^compose: 3 densities for 2 inputs$", compose, t, [1, 1], "ties", density=[0.5] * 3)
    _refused(r"^compose: 1 keep_masks for 2 inputs$", compose, t, [1, 1], "dare_ties", density=0.5,
             keep_masks=[None])
    _refused(r"needs keep_masks\[1\]", compose, t, [1, 1], "dare_linear", density=0.5,
             keep_masks=[torch.ones(3, dtype=torch.bool), None])
    _refused(r"needs keep_mask", sparsify, t[0], "random", 0.5)
    _refused(r"every input is None", compose, [None, None], [1, 1], "ties")
    _refused(r"input 1 is", compose, [torch.ones(3), torch.ones(4)], [1, 1], "ties")
    _refused(r"input 0 is torch.float64", compose, [torch.ones(3, dtype=torch.float64)], [1], "ties")
    _refused(r"seed -1", dare_keep_mask, -1, 0, "k", (3,), 0.5)


# --- optional: the real mergekit, when importable ---------------------------------------------------------------

def test_matches_real_mergekit(monkeypatch):
    ms = pytest.importorskip("mergekit.sparsify")
    api = pytest.importorskip("mergekit.merge_methods.api")
    queue = []

    def bernoulli(tensor, density, rescale_norm=None):  # mergekit's bernoulli with our mask for torch.bernoulli
        return tensor if density >= 1 else ms.rescaled_masked_tensor(tensor, queue.pop(0).float(), rescale_norm)

    monkeypatch.setattr(ms, "bernoulli", bernoulli)
    for method, shape, dens in itertools.product(METHODS, [(1,), (13, 5), (64, 33)], DENSITIES):
        taus = _taus(shape, seed=8)
        ds = [dens, 0.5, 0.9]
        keeps = _masks(shape, ds)
        queue[:] = list(keeps) if "dare" in method else []
        inputs = [torch.zeros(shape)] + [t if t is not None else torch.zeros(shape) for t in taus]
        theirs = api.merge_tensors(inputs, method, base_index=0,
                                   parameters={"weight": WEIGHTS, "density": ds, "lambda": 0.8})
        assert not queue  # every DARE mask went through the patched bernoulli
        ours = compose(taus, WEIGHTS, method, density=ds, lambda_=0.8, keep_masks=keeps)
        torch.testing.assert_close(ours, theirs, rtol=1.3e-6, atol=1e-6)


# --- ties at a trimming cut: a stable rank order, the same for any thread count ----------------------------------

def _stable_rank_mask(mags, start, stop):
    order = torch.sort(mags, stable=True).indices  # ascending, equal values by flat index
    mask = torch.zeros(mags.numel(), dtype=torch.bool)
    mask[order[start:stop]] = True
    return mask


@pytest.mark.parametrize("seed", range(6))
def test_rank_range_mask_is_a_stable_sorts_ranks(seed):
    from randlora_io.merge.compose import stable_rank_mask
    from randlora_io.merge.compose_fast import rank_range_mask

    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 400, (1,), generator=g))
    mags = torch.randint(0, 5, (n,), generator=g).float() / 4  # many exact ties, zeros included
    for start, stop in [(0, n), (n // 3, n), (n // 4, 3 * n // 4), (n - 1, n), (2, 3), (5, 5), (-3, n + 9)]:
        expected = _stable_rank_mask(mags, max(0, start), min(n, stop))
        assert torch.equal(rank_range_mask(mags, start, stop), expected), (n, start, stop)
        assert torch.equal(stable_rank_mask(mags, start, stop), expected), (n, start, stop)


def test_ties_with_ties_at_the_cut_keep_exactly_k_for_any_thread_count():
    tau = (torch.arange(1000) % 7 - 3).float().reshape(40, 25)  # |τ| in {0, 1, 2, 3}: ties at every cut
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(sparsify(tau, "magnitude", 0.37))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    assert int(torch.count_nonzero(outs[0])) == int(0.37 * 1000)


# --- the merge's in-place path (compose_fast) gives the reference's bits -----------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_in_place_path_equals_the_reference_bit_for_bit(method, shape):
    from randlora_io.merge.compose import ComposeStats
    from randlora_io.merge.compose_fast import compose_

    for k, dens in enumerate(DENSITIES):
        taus = _taus(shape, seed=300 + k)
        ds = [dens, 0.5, 0.9]
        keeps = _masks(shape, ds)
        for normalize, lam in ((None, 1.0), (True, 0.8), (False, -1.5)):
            ref_stats, fast_stats = ComposeStats(), ComposeStats()
            ref = compose(taus, WEIGHTS, method, density=ds, lambda_=lam, normalize=normalize, keep_masks=keeps,
                          stats=ref_stats)
            buffers = [t.clone() if t is not None else None for t in taus]
            fast = compose_(buffers, WEIGHTS, method, density=ds, lambda_=lam, normalize=normalize,
                            keep_masks=keeps, stats=fast_stats)
            assert torch.equal(fast, ref), (method, shape, dens, normalize)
            assert fast_stats == ref_stats


@pytest.mark.parametrize("seed", range(4))
def test_kth_smallest_by_selection_is_kthvalue(seed):
    from randlora_io.merge.compose_fast import kth_smallest

    g = torch.Generator().manual_seed(seed)
    n = 300_000 + seed * 7919
    cases = [torch.randn(n, generator=g).abs(),  # continuous
             (torch.randint(0, 3, (n,), generator=g).float()),  # three values: heavy ties, bracket misses
             torch.cat([torch.zeros(n // 2), torch.rand(n - n // 2, generator=g)]),  # half zeros
             torch.arange(n, dtype=torch.float32).flip(0)]  # sorted descending: a strided sample is regular
    for values in cases:
        ordered = torch.sort(values).values  # the oracle (kthvalue itself is quadratic-slow on sorted input)
        for rank in (1, 2, n // 100, n // 3, n // 2, n - n // 100, n - 1, n):
            assert torch.equal(kth_smallest(values, rank), ordered[rank - 1]), (seed, rank)


def test_rank_range_mask_on_a_large_tied_tensor():
    from randlora_io.merge.compose_fast import rank_range_mask

    g = torch.Generator().manual_seed(5)
    mags = (torch.randint(0, 50, (400_000,), generator=g).float() / 7)
    for start, stop in [(200_000, 400_000), (123_456, 345_678), (0, 1), (399_999, 400_000)]:
        assert torch.equal(rank_range_mask(mags, start, stop), _stable_rank_mask(mags, start, stop)), (start, stop)


# --- DARE's rescale: an L1 norm whose bits do not depend on the thread count -------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 1000, 1 << 16, (1 << 16) + 1, 5 * (1 << 16) + 777, 40 * (1 << 16) + 3])
def test_blocked_pairwise_l1_is_the_tree_bit_for_bit(n):
    from randlora_io.merge.fixed_sum import pairwise_l1, pairwise_l1_reference

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-6, 6, n)  # a wide range: the order matters
    assert pairwise_l1(x) == pairwise_l1_reference(x)
    assert pairwise_l1(x.bfloat16()) == pairwise_l1_reference(x.bfloat16())
    exact = math.fsum(abs(v) for v in x.double().tolist())
    assert abs(pairwise_l1(x) - exact) <= 1e-12 * exact


def test_dare_rescale_gives_the_same_bits_for_any_thread_count():
    """torch's float32 sum of 2¹⁹ elements moves by an ulp between 1 and 4 threads; DARE's ‖τ‖₁ / ‖m⊙τ‖₁ must not
    (a DARE merge is promised byte-identical on any machine and under torchrun)."""
    from randlora_io.merge.compose_fast import compose_

    shape = (512, 1024)
    g = torch.Generator().manual_seed(7)
    taus = [torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 4 for _ in range(2)]
    masks = [dare_keep_mask(3, i, "w", shape, 0.5) for i in range(2)]
    before = torch.get_num_threads()
    outs = {}
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            ref = compose(taus, [1.0, 0.7], "dare_linear", density=0.5, keep_masks=masks)
            fast = compose_([t.clone() for t in taus], [1.0, 0.7], "dare_linear", density=0.5, keep_masks=masks)
            assert torch.equal(fast, ref)
            outs[threads] = fast
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[1], outs[4])
