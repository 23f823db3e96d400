"""Per-tensor arithmetic of mergekit 0.1.5's task-vector composition methods, in plain torch.

Learnt from the mergekit 0.1.5 wheel on PyPI (sha256 776a1a1d...af2fc2): ``mergekit/sparsify.py``
(``magnitude``, ``magnitude_outliers``, ``bernoulli``, ``rescaled_masked_tensor``),
``mergekit/merge_methods/generalized_task_arithmetic.py`` (``GeneralizedTaskArithmeticMerge.merge_group``,
``get_mask``) and ``mergekit/merge_methods/registry.py`` (the per-method defaults in :data:`DEFAULTS`).
Every τ here is a float32 task vector (adapter delta) of one weight; the result is the merged delta, also float32,
which the caller adds to the base weight. DARE's random mask is not drawn here: see :func:`dare_keep_mask`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch

from ..errors import SourceFormatError
from .fixed_sum import pairwise_l1_reference

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")
SPARSIFICATIONS = ("magnitude", "magnitude_outliers", "random")


class MethodDefaults(NamedTuple):
    """One row of mergekit 0.1.5's registry: sparsification, sign consensus, ``normalize``/``rescale`` defaults."""
    sparsification: str | None
    consensus: str | None
    normalize: bool
    rescale: bool


DEFAULTS = {
    "task_arithmetic": MethodDefaults(None, None, False, False),
    "ties": MethodDefaults("magnitude", "sum", True, False),
    "dare_linear": MethodDefaults("random", None, False, True),
    "dare_ties": MethodDefaults("random", "sum", False, True),
    "breadcrumbs": MethodDefaults("magnitude_outliers", None, False, False),
    "breadcrumbs_ties": MethodDefaults("magnitude_outliers", "sum", False, False),
}


@dataclass
class ComposeStats:
    """What :func:`compose` did, summed over the weights it composed: per input, the elements of the weights it
    touches and how many of them are non-zero after sparsification (``kept``); for the sign-consensus methods, the
    elements where some input's non-zero wᵢτᵢ disagreed with the elected sign and was dropped (``conflicts``) out of
    ``elements`` composed."""
    touched: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    conflicts: int = 0
    elements: int = 0

    def grow(self, n: int) -> None:
        """Room for n inputs."""
        while len(self.touched) < n:
            self.touched.append(0)
            self.kept.append(0)

    def add(self, other: ComposeStats) -> None:
        """Sum ``other`` into this (the reports of several processes)."""
        self.grow(len(other.touched))
        for i, (t, k) in enumerate(zip(other.touched, other.kept)):
            self.touched[i] += t
            self.kept[i] += k
        self.conflicts += other.conflicts
        self.elements += other.elements


def _density(d, what: str) -> float:
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0.0 < float(d) <= 1.0):
        raise SourceFormatError(f"{what}: density {d!r} is outside (0, 1]")
    return float(d)


def sparsify(tau: torch.Tensor, method: str, density: float, *, gamma: float = 0.01,
             keep_mask: torch.Tensor | None = None, rescale: bool | None = None) -> torch.Tensor:
    """Sparsify one task vector as ``mergekit.sparsify.sparsify`` does.

    ``tau``: floating tensor of any shape (float32 in this project); returns a tensor of the same shape and dtype.
    ``density`` in (0, 1]; at 1 ``tau`` itself is returned untouched (no mask, no rescale), as in mergekit.

    * ``"magnitude"`` (TIES; ``sparsify.magnitude``): keep the k = max(1, int(density * numel)) largest |τ|.
      Ties at the threshold: mergekit's unstable argsort picks arbitrarily; here the lowest flat indices rank
      first among equal |τ| (:func:`stable_rank_mask`), the same on any machine and thread count.
    * ``"magnitude_outliers"`` (breadcrumbs; ``sparsify.magnitude_outliers``): target = int(density * numel),
      n_top = int(gamma * numel), n_bot = max(0, numel - target - n_top), keep the elements of ascending-|τ| rank
      in [n_bot, n_bot + target): the smallest and the n_top largest go (fewer largest when target needs them).
      target may be 0 (then all go: no max(1, ...) here in mergekit).
    * ``"random"`` (DARE; ``sparsify.bernoulli``): keep where ``keep_mask`` (bool, τ's shape) is True.

    ``rescale`` (default: True for "random", else False, as each method's mergekit default): multiply the kept
    values by ‖τ‖₁ / ‖m⊙τ‖₁ (``rescaled_masked_tensor`` with ``RescaleNorm.l1``), unless either norm is < 1e-7;
    each norm by :func:`~randlora_io.merge.fixed_sum.pairwise_l1_reference` (binary64, a fixed order: mergekit's
    float32 ``sum`` changes with the thread count), their ratio rounded to τ's dtype.
    """
    if method not in SPARSIFICATIONS:
        raise SourceFormatError(f"sparsify: unknown method {method!r}; expected one of {', '.join(SPARSIFICATIONS)}")
    density = _density(density, "sparsify")
    if density >= 1.0:
        return tau
    if rescale is None:
        rescale = method == "random"
    n = tau.numel()
    if method == "random":
        if keep_mask is None:
            raise SourceFormatError("sparsify: method 'random' needs keep_mask (see dare_keep_mask)")
        if keep_mask.dtype != torch.bool or tuple(keep_mask.shape) != tuple(tau.shape):
            raise SourceFormatError(f"sparsify: keep_mask must be bool of shape {tuple(tau.shape)}, "
                                    f"got {keep_mask.dtype} {tuple(keep_mask.shape)}")
        mask = keep_mask.to(tau.dtype)
    else:
        if not (0.0 <= gamma <= 1.0):
            raise SourceFormatError(f"sparsify: gamma {gamma!r} is outside [0, 1]")
        mags = tau.detach().abs().reshape(-1).float()
        if method == "magnitude":
            k = max(1, int(density * n)) if n else 0
            flat = stable_rank_mask(mags, n - k, n)
        else:
            target = int(density * n)
            n_bot = max(0, n - target - int(gamma * n))
            flat = stable_rank_mask(mags, n_bot, n_bot + target)
        mask = flat.reshape(tau.shape).to(tau.dtype)
    masked = tau * mask
    if not rescale:
        return masked
    before, after = pairwise_l1_reference(tau), pairwise_l1_reference(masked)
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * torch.tensor(before / after, dtype=tau.dtype)


def stable_rank_mask(mags: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bool mask (shape of the 1-D float ``mags``) of the elements whose rank in a stable ascending sort (equal
    values ordered by flat index) is in [start, stop). The reference; the merge uses
    :func:`randlora_io.merge.compose_fast.rank_range_mask`, which selects instead of sorting."""
    mask = torch.zeros(mags.numel(), dtype=torch.bool, device=mags.device)
    mask[torch.sort(mags, stable=True).indices[max(0, start):max(0, stop)]] = True
    return mask


def consensus(taus_weighted: Sequence[torch.Tensor], method: str = "sum") -> torch.Tensor:
    """TIES sign election, ``generalized_task_arithmetic.get_mask``.

    ``taus_weighted``: n tensors wᵢτᵢ (already sparsified and weighted), one shape S. Returns a bool tensor of
    shape (n, *S): True where sign(wᵢτᵢ) equals the elected sign; zeros never match. Elected sign, +1 on ties:
    "sum": sign of Σᵢ wᵢτᵢ (≥ 0 → +1); "count": sign of Σᵢ sign(wᵢτᵢ) (≥ 0 → +1).
    """
    if method not in ("sum", "count"):
        raise SourceFormatError(f"consensus: unknown method {method!r}; expected sum or count")
    if not taus_weighted:
        raise SourceFormatError("consensus: no inputs")
    signs = [t.sign() for t in taus_weighted]
    terms = taus_weighted if method == "sum" else signs
    total = sum(terms[1:], terms[0])  # ((t0 + t1) + t2)...
    elected = torch.where(total >= 0, 1.0, -1.0).to(signs[0].dtype)
    return torch.stack([s == elected for s in signs])


def _per_input(value, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise SourceFormatError(f"compose: {len(value)} {what} for {n} inputs")
        return list(value)
    return [value] * n


def compose(taus: Sequence[torch.Tensor | None], weights: Sequence[float], method: str, *,
            density: float | Sequence[float] = 1.0, lambda_: float = 1.0, normalize: bool | None = None,
            keep_masks: Sequence[torch.Tensor | None] | None = None, rescale: bool | None = None,
            gamma: float | Sequence[float] = 0.01, stats: ComposeStats | None = None) -> torch.Tensor:
    """Merge n task vectors of one weight as ``GeneralizedTaskArithmeticMerge.merge_group`` (mergekit 0.1.5).

    ``taus``: n float32 tensors of one shape S, or None where input i does not touch this weight (a zero τ, as in
    mergekit: it never passes the sign election, but its weight stays in the non-consensus divisor). Returns the
    merged float32 delta of shape S (the base is not added). Steps: τᵢ ← sparsify(τᵢ, density i, gamma i,
    keep_masks[i]) per :data:`DEFAULTS`; dᵢ = float32(wᵢ)·τᵢ; with consensus: m = consensus(d),
    Σ = Σᵢ mᵢdᵢ, divisor = Σᵢ mᵢwᵢ per element (0 → 1); without: Σ = Σᵢ dᵢ, divisor = Σᵢ wᵢ (|.| < 1e-8 → 1);
    Σ /= divisor if ``normalize`` (default per method); Σ *= ``lambda_`` if ≠ 1. Sums run over i in order, so
    ``task_arithmetic`` with λ = 1 is exactly ((w₀τ₀ + w₁τ₁) + w₂τ₂)... in float32.
    ``density``/``gamma``: one value or one per input; ``keep_masks``: bool masks of shape S, needed by the DARE
    methods for inputs with density < 1 (see :func:`dare_keep_mask`). ``rescale`` defaults per method.
    ``stats``: counts of what was kept and dropped are added to it (:class:`ComposeStats`).
    """
    if method not in DEFAULTS:
        raise SourceFormatError(f"compose: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    n = len(taus)
    if n == 0:
        raise SourceFormatError("compose: no inputs")
    if len(weights) != n:
        raise SourceFormatError(f"compose: {len(weights)} weights for {n} inputs")
    densities = [_density(d, f"compose input {i}") for i, d in enumerate(_per_input(density, n, "densities"))]
    gammas = _per_input(gamma, n, "gammas")
    if isinstance(keep_masks, torch.Tensor):
        raise SourceFormatError("compose: keep_masks must be a list with one entry per input")
    masks = _per_input(keep_masks, n, "keep_masks")
    present = [i for i, t in enumerate(taus) if t is not None]
    if not present:
        raise SourceFormatError("compose: every input is None; nothing to merge")
    shape = taus[present[0]].shape
    for i in present:
        if taus[i].dtype != torch.float32 or taus[i].shape != shape:
            raise SourceFormatError(f"compose: input {i} is {taus[i].dtype} {tuple(taus[i].shape)}, "
                                    f"expected torch.float32 {tuple(shape)}")
    spec = DEFAULTS[method]
    normalize = spec.normalize if normalize is None else normalize
    rescale = spec.rescale if rescale is None else rescale
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    if not torch.isfinite(w).all() or not math.isfinite(lambda_):
        raise SourceFormatError("compose: weights and lambda must be finite")
    weighted = []
    for i in present:
        tau = taus[i]
        if spec.sparsification is not None:
            if spec.sparsification == "random" and densities[i] < 1.0 and masks[i] is None:
                raise SourceFormatError(f"compose: {method} with density {densities[i]} needs keep_masks[{i}]")
            tau = sparsify(tau, spec.sparsification, densities[i], gamma=gammas[i], keep_mask=masks[i],
                           rescale=rescale)
        weighted.append(tau * w[i])
        if stats is not None:
            stats.grow(n)
            stats.touched[i] += tau.numel()
            stats.kept[i] += int(torch.count_nonzero(tau))
    if stats is not None:
        stats.elements += taus[present[0]].numel()
    if spec.consensus is not None:
        m = consensus(weighted, spec.consensus)
        if stats is not None:  # an element where a non-zero input lost the sign election
            stats.conflicts += int(torch.stack([(d != 0) & ~k for d, k in zip(weighted, m)]).any(0).sum())
        mixed = weighted[0] * m[0]
        divisor = w[present[0]] * m[0]
        for j in range(1, len(present)):
            mixed += weighted[j] * m[j]
            divisor += w[present[j]] * m[j]
        divisor[divisor == 0] = 1
        return finish_(mixed, divisor, normalize, lambda_)
    return linear_sum_(weighted, w, normalize, lambda_)  # weighted[0] is a fresh tensor (τ·w)


def linear_sum_(weighted: Sequence[torch.Tensor], w: torch.Tensor, normalize: bool, lambda_: float) -> torch.Tensor:
    """The methods without sign election: Σᵢ wᵢτᵢ accumulated into ``weighted[0]`` (overwritten), in order; divided
    by Σ wᵢ (all inputs' weights; 1 when |Σ wᵢ| < 1e-8) if ``normalize``; times ``lambda_``."""
    mixed = weighted[0]
    for d in weighted[1:]:
        mixed += d
    divisor = w.sum()
    if divisor.abs() < 1e-8:
        divisor = torch.ones((), dtype=torch.float32)
    return finish_(mixed, divisor, normalize, lambda_)


def finish_(mixed: torch.Tensor, divisor: torch.Tensor, normalize: bool, lambda_: float) -> torch.Tensor:
    """``mixed`` (float32) /= ``divisor`` if ``normalize``; *= ``lambda_`` if ≠ 1; in place, returned."""
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return mixed


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_CHUNK = 1 << 20


def _key(seed: int, input_index: int, key: str, shape) -> tuple[int, int]:
    """(SplitMix64 start state S, element count) of dare_keep_mask's rule, arguments checked."""
    for name, v in (("seed", seed), ("input_index", input_index)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 64:
            raise SourceFormatError(f"dare_keep_mask: {name} {v!r} is not an integer in [0, 2**64)")
    if not isinstance(key, str):
        raise SourceFormatError(f"dare_keep_mask: key {key!r} is not a string")
    dims = tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise SourceFormatError(f"dare_keep_mask: shape {dims!r} is not a tuple of non-negative integers")
    msg = b"randlora/dare-keep/v1\x00" + seed.to_bytes(8, "little") + input_index.to_bytes(8, "little")
    digest = hashlib.blake2b(msg + key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little"), math.prod(dims)


def _uniforms(state: int, count: int):
    """Yield (start, float64 u of elements start..) chunk by chunk (2**20 elements: bounded memory, vectorised)."""
    s = np.uint64(state)
    for start in range(0, count, _CHUNK):
        z = s + (np.arange(start, min(count, start + _CHUNK), dtype=np.uint64) + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z ^= z >> np.uint64(31)
        yield start, (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def dare_uniforms(seed: int, input_index: int, key: str, count: int) -> np.ndarray:
    """The u of elements 0..count-1 in :func:`dare_keep_mask`'s rule (float64 array of length count)."""
    out = np.empty(count, dtype=np.float64)
    for start, u in _uniforms(_key(seed, input_index, key, (count,))[0], count):
        out[start:start + len(u)] = u
    return out


def dare_keep_mask(seed: int, input_index: int, key: str, shape, density: float) -> torch.Tensor:
    """DARE keep mask: a bool tensor of ``shape``, the same on every machine for the same arguments.

    Rule (all integers unsigned 64-bit, arithmetic mod 2**64, "le64" = 8-byte little-endian):

    1. S = int.from_le_bytes(blake2b(b"randlora/dare-keep/v1\\x00" + le64(seed) + le64(input_index)
       + key.encode("utf-8"), digest_size=8)) — hashlib's unkeyed BLAKE2b, 8-byte digest, no salt/person;
       seed, input_index in [0, 2**64); key: the tensor name.
    2. For the element of row-major flat index i (0 ≤ i < prod(shape)), z = S + (i + 1) * 0x9E3779B97F4A7C15,
       then z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31
       (the (i+1)-th output of SplitMix64 seeded with S).
    3. u = (z >> 11) * 2**-53 (a float64 in [0, 1), exact); keep bit = u < density (density a float64 in (0, 1]).

    The bit of element i depends only on (seed, input_index, key, i, density), not on the shape beyond i's index.
    """
    density = _density(density, "dare_keep_mask")
    state, count = _key(seed, input_index, key, shape)
    out = np.empty(count, dtype=np.bool_)
    for start, u in _uniforms(state, count):
        out[start:start + len(u)] = u < density
    return torch.from_numpy(out).reshape(tuple(shape))
