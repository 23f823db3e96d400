"""The merge's path for :func:`randlora_io.merge.compose.compose`: the same arithmetic, in place, without sorting.

``compose_`` overwrites the τ buffers it is given (the merge's reused workspace) instead of allocating a weighted
copy of each, and finds TIES / breadcrumbs cut values by selection (:func:`kth_smallest`: a bracket from a strided
sample, then ``kthvalue`` on the few elements inside it) instead of a sort or a top-k of half the tensor. Its
result is bit for bit the reference's (tests/test_compose.py): the same float32 operations in the same order.
Memory: the K τ buffers plus about four float32 copies of one tensor (|τ|, Σ wᵢτᵢ, the result, the divisor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import SourceFormatError
from .compose import DEFAULTS, ComposeStats, _density, _per_input, finish_, linear_sum_
from .fixed_sum import pairwise_l1

_SAMPLE = 1 << 16  # elements of the strided sample that brackets a cut value
_SMALL = 1 << 17  # below this many elements, kthvalue on the whole tensor is as fast


def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank``-th smallest (1-based) of the 1-D float tensor ``values``, exactly (``kthvalue``'s value).

    A strided sample of 65,536 elements gives two values a ≤ b around the wanted quantile (±5 σ of the sample's
    rank error); one pass counts the elements below a and gathers those in [a, b] (about 2 % of them), and
    ``kthvalue`` runs on that subset only. When the bracket misses (it cannot on continuous data, it may on heavy
    ties) the whole tensor is selected from instead."""
    n = values.numel()
    if not 1 <= rank <= n:
        raise SourceFormatError(f"kth_smallest: rank {rank} outside [1, {n}]")
    if n <= _SMALL:
        return values.kthvalue(rank).values
    sample = values[:: n // _SAMPLE]
    m = sample.numel()
    where = (rank - 1) / (n - 1) * (m - 1)
    spread = 5 * math.sqrt(m * max(where / m * (1 - where / m), 1 / m)) + 2
    lo_rank, hi_rank = max(1, int(where - spread)), min(m, int(where + spread) + 2)
    ordered = torch.sort(sample).values
    a, b = ordered[lo_rank - 1], ordered[hi_rank - 1]
    below = int((values < a).sum()) if lo_rank > 1 else 0
    if lo_rank == 1:
        a = values.min()
    if hi_rank == m:
        b = values.max()
    inside = values[(values >= a) & (values <= b)]
    if below < rank <= below + inside.numel():
        return inside.kthvalue(rank - below).values
    return values.kthvalue(rank).values


def rank_range_keep(mags: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """float32 0/1 tensor (shape of the 1-D float ``mags``): 1 for the elements whose rank in ascending order is in
    [start, stop), equal values ranked by flat index (a stable sort's order,
    :func:`randlora_io.merge.compose.stable_rank_mask`), found by two selections and the ties at each cut. float,
    not bool: multiplying τ by it is a plain float32 pass (a bool operand is several times slower in torch)."""
    n = mags.numel()
    start, stop = max(0, start), min(n, stop)
    keep = torch.zeros(n, dtype=torch.float32, device=mags.device)
    if stop <= start:
        return keep
    lo = kth_smallest(mags, start + 1)  # value of rank start
    torch.gt(mags, lo, out=keep)
    cuts = [lo]
    if stop < n:
        hi = kth_smallest(mags, stop)  # value of rank stop - 1
        keep.mul_(torch.lt(mags, hi, out=torch.empty_like(keep)))
        cuts = [lo] if bool(lo == hi) else [lo, hi]
    for value in cuts:  # the tied elements hold ranks below .. below + count - 1, in flat-index order
        tied = mags == value
        below, count = int(torch.count_nonzero(mags < value)), int(torch.count_nonzero(tied))
        first, last = max(start, below) - below, min(stop, below + count) - below
        if last > first:
            keep[tied.nonzero().squeeze(1)[first:last]] = 1.0
    return keep


def rank_range_mask(mags: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """:func:`rank_range_keep` as a bool mask."""
    return rank_range_keep(mags, start, stop).bool()


def _sparsify_(tau: torch.Tensor, sparsification: str, density: float, gamma: float,
               keep: torch.Tensor | None, rescale: bool) -> None:
    """``tau`` ← ``compose.sparsify(tau, ...)``, in place."""
    n = tau.numel()
    if sparsification == "random":
        if keep is None:
            raise SourceFormatError("compose_: DARE needs a keep mask for an input with density < 1")
        mask = keep.to(tau.dtype)
    else:
        mags = tau.abs().reshape(-1)
        if sparsification == "magnitude":
            k = max(1, int(density * n)) if n else 0
            mask = rank_range_keep(mags, n - k, n)
        else:
            target = int(density * n)
            n_bot = max(0, n - target - int(gamma * n))
            mask = rank_range_keep(mags, n_bot, n_bot + target)
        del mags
        mask = mask.reshape(tau.shape)
    before = pairwise_l1(tau) if rescale else 0.0
    tau.mul_(mask)
    if rescale:
        after = pairwise_l1(tau)
        if not (before < 1e-7 or after < 1e-7):
            tau.mul_(torch.tensor(before / after, dtype=tau.dtype))


def compose_(taus: Sequence[torch.Tensor | None], weights: Sequence[float], method: str, *,
             density: float | Sequence[float] = 1.0, lambda_: float = 1.0, normalize: bool | None = None,
             keep_masks: Sequence[torch.Tensor | None] | None = None, rescale: bool | None = None,
             gamma: float | Sequence[float] = 0.01, stats: ComposeStats | None = None) -> torch.Tensor:
    """:func:`randlora_io.merge.compose.compose` with the same arguments and the same float32 result, computed in
    the τ buffers (float32, one shape S, None for inputs not touching the weight): they are overwritten. Returns
    the merged delta (a new tensor of shape S, or one of the buffers)."""
    spec = DEFAULTS[method]
    n = len(taus)
    densities = [_density(d, f"compose input {i}") for i, d in enumerate(_per_input(density, n, "densities"))]
    gammas, masks = _per_input(gamma, n, "gammas"), _per_input(keep_masks, n, "keep_masks")
    normalize = spec.normalize if normalize is None else normalize
    rescale = spec.rescale if rescale is None else rescale
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    present = [i for i, t in enumerate(taus) if t is not None]
    if not present:
        raise SourceFormatError("compose_: every input is None; nothing to merge")
    for i in present:
        tau = taus[i]
        if spec.sparsification is not None and densities[i] < 1.0:
            _sparsify_(tau, spec.sparsification, densities[i], gammas[i], masks[i], rescale)
        if stats is not None:
            stats.grow(n)
            stats.touched[i] += tau.numel()
            stats.kept[i] += int(torch.count_nonzero(tau))
        tau.mul_(w[i])
    first = taus[present[0]]
    if stats is not None:
        stats.elements += first.numel()
    if spec.consensus is not None:
        if spec.consensus != "sum":
            raise SourceFormatError(f"compose_: consensus {spec.consensus!r} has no fast path")
        elected = first.clone()  # Σ wᵢτᵢ, then the elected sign s = ±1 (+1 where the sum is ≥ 0)
        for i in present[1:]:
            elected += taus[i]
        elected.ge_(0).mul_(2).sub_(1)
        mixed = divisor = lost = None
        ones = torch.empty_like(first) if normalize else None
        for i in present:  # in τᵢ's buffer: p = wᵢτᵢ·s (exact); max(p, 0)·s is wᵢτᵢ where it agrees with s, else 0
            tau = taus[i].mul_(elected)
            if stats is not None:
                lost = tau < 0 if lost is None else lost.logical_or_(tau < 0)
            tau.clamp_(min=0)
            if normalize:  # Σ wᵢ over the agreeing inputs: sign(max(p, 0)) is 1 there, else 0
                torch.sign(tau, out=ones)
                divisor = ones.mul(w[i]) if divisor is None else divisor.add_(ones, alpha=float(w[i]))
            tau.mul_(elected)
            mixed = tau if mixed is None else mixed.add_(tau)
        if stats is not None:
            stats.conflicts += int(torch.count_nonzero(lost))
        if normalize:
            divisor[divisor == 0] = 1
        return finish_(mixed, divisor, normalize, lambda_)
    return linear_sum_([taus[i] for i in present], w, normalize, lambda_)
