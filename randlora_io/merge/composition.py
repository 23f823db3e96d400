"""Several inputs composed per weight by one of mergekit 0.1.5's methods, seen as one ``DeltaSource``.

:func:`composition_for` checks a merge's method options once (at the boundary) and gives a :class:`Composition`,
or None for plain task arithmetic (Σ wᵢ·ΔWᵢ, λ = 1, no normalisation), which the merge runs as it always has.
:class:`ComposedSource` then yields, per weight key, the composed delta of :func:`randlora_io.merge.compose.compose`
from every input's task vector τᵢ = ΔWᵢ, each computed on the fly into a reused float32 buffer by the merge's own
fast paths (``add_delta_``: the GEMM against the shared bases, Triton, ternary) and never stored. Merging it with
weight 1 (``LayerMerger``), writing it as a dense delta (``--to-delta``) or into a state dict all see one source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import NonFiniteError, SourceFormatError
from ..sources.interface import DeltaSource
from ..sources.keymap import CheckpointView
from .compose import DEFAULTS, METHODS, ComposeStats, dare_keep_mask
from .compose_fast import compose_
from .layer import Workspace, add_delta_, all_finite


@dataclass(frozen=True)
class Composition:
    """A checked method and its parameters for n inputs (one weight and one density per input)."""

    method: str
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    lambda_: float
    normalize: bool
    rescale: bool
    seed: int
    gamma: float = 0.01

    @property
    def is_dare(self) -> bool:
        return DEFAULTS[self.method].sparsification == "random"


def _name(paths: Sequence[object], i: int) -> str:
    return f"input {i + 1} ({paths[i]})" if i < len(paths) else f"input {i + 1}"


def composition_for(method: str | None, weights: Sequence[float], paths: Sequence[object], *,
                    density: float | Sequence[float] | None = None, lambda_: float | None = None,
                    normalize: bool | None = None, seed: int | None = None,
                    rescale: bool | None = None, always: bool = False) -> Composition | None:
    """The checked :class:`Composition` of a merge of ``len(weights)`` inputs (``paths`` name them in errors), or
    None when it is today's task arithmetic (no method, or ``task_arithmetic`` with λ = 1 and no normalisation).

    ``density``: one value for all inputs or one per input, each in (0, 1] (default 1, as mergekit's); only for the
    sparsifying methods. ``lambda_`` (default 1) scales the composed delta; ``normalize`` / ``rescale`` default per
    method (mergekit 0.1.5: normalize for ties only, rescale for DARE); ``seed`` (default 0) picks DARE's masks
    (:func:`randlora_io.merge.compose.dare_keep_mask`), only for dare_linear / dare_ties. ``always``: a
    Composition even for plain task arithmetic (to write the composed update itself, ``--to-delta``)."""
    method = method or "task_arithmetic"
    if method not in METHODS:
        raise SourceFormatError(f"--method {method!r} is not a composition method; use one of {', '.join(METHODS)}")
    spec = DEFAULTS[method]
    n = len(weights)
    if density is not None and spec.sparsification is None:
        raise SourceFormatError(f"--density has no effect with --method {method} (it keeps every element); use "
                                "ties, dare_linear, dare_ties, breadcrumbs or breadcrumbs_ties, or drop --density")
    if seed is not None and spec.sparsification != "random":
        raise SourceFormatError(f"--seed picks DARE's random masks and has no effect with --method {method}; use "
                                "dare_linear or dare_ties, or drop --seed")
    densities = list(density) if isinstance(density, (list, tuple)) else [1.0 if density is None else density] * n
    if len(densities) != n:
        raise SourceFormatError(f"got {len(densities)} --density values for {n} inputs: give one for all, or one "
                                "per input in order")
    for i, d in enumerate(densities):
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < float(d) <= 1.0:
            raise SourceFormatError(f"--density {d!r} ({_name(paths, i)}): a density must be in (0, 1], the "
                                    "fraction of each task vector kept, e.g. 0.5")
    lam = 1.0 if lambda_ is None else lambda_
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or \
            abs(lam) > torch.finfo(torch.float32).max:
        raise SourceFormatError(f"--lambda {lambda_!r}: must be a finite number within float32's range, e.g. 1")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64):
        raise SourceFormatError(f"--seed {seed!r}: must be an integer in [0, 2**64)")
    norm = spec.normalize if normalize is None else bool(normalize)
    resc = spec.rescale if rescale is None else bool(rescale)
    if method == "task_arithmetic" and lam == 1.0 and not norm and not always:
        return None
    return Composition(method, tuple(float(w) for w in weights), tuple(float(d) for d in densities), float(lam),
                       norm, resc, 0 if seed is None else seed)


class ComposedSource(DeltaSource):
    """``{weight key: composed delta}`` of ``sources`` (all in the same checkpoint's key names) under
    ``composition``: float32, stored orientation. Input i contributes τᵢ = ΔWᵢ with weight 1 (the composition
    applies the weights); an input that does not touch a key contributes τ = 0 there, as in mergekit. Adapters whose
    update is not additive (a tensor replaced by a trained copy, DoRA) are refused: a task vector is ΔW.
    ``stats`` sums what each composed key kept and dropped (:class:`~randlora_io.merge.compose.ComposeStats`)."""

    kind = "composed"
    orientation_known = False  # every τ is in the stored layout; which layers are Conv1D the base's config says

    def __init__(self, sources: Sequence[DeltaSource], composition: Composition, *, kernel: str = "auto",
                 precision: str = "auto", keys: Sequence[str] | None = None):
        self.sources, self.composition = list(sources), composition
        self.path = " + ".join(str(s.path) for s in self.sources)
        self._kernel, self._precision = kernel, precision
        self._workspace = Workspace()  # the τ buffers (compose_ overwrites them) and add_delta_'s scratch
        self.stats = ComposeStats()
        self.stats.grow(len(self.sources))
        self._counted: set[str] = set()
        self._touching: dict[str, list[int]] = {}
        for i, source in enumerate(self.sources):
            refuse_non_additive(source, composition.method)
            for key in source.keys():
                self._touching.setdefault(key, []).append(i)
        if keys is not None:
            self._touching = {k: self._touching[k] for k in keys}

    def keys(self) -> list[str]:
        return list(self._touching)

    def stored_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.sources[self._touching[key][0]].stored_shape(key))

    def fan_in_fan_out(self, key: str) -> bool:
        return False  # every τ is already in the weight's stored orientation

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        comp, shape = self.composition, self.stored_shape(key)
        taus: list[torch.Tensor | None] = [None] * len(self.sources)
        masks: list[torch.Tensor | None] = [None] * len(self.sources)
        for i in self._touching[key]:
            source = self.sources[i]
            if tuple(source.stored_shape(key)) != shape:
                raise SourceFormatError(f"{source.path}: {key!r} has shape {list(source.stored_shape(key))} but "
                                        f"{self.sources[self._touching[key][0]].path} gives it {list(shape)}")
            tau = self._workspace.take(f"tau{i}", shape, torch.float32, torch.device(device)).zero_()
            inner, inner_key = (source.inner, source.inner_key(key)) if isinstance(source, CheckpointView) \
                else (source, key)
            add_delta_(tau, inner, inner_key, 1.0, self._kernel, self._workspace, self._precision)
            if not all_finite(tau):  # a NaN the trimming dropped would merge silently: refuse it here
                raise NonFiniteError(f"{source.path}: the task vector of {key!r} contains NaN or Inf; nothing was "
                                     "written")
            taus[i] = tau
            if comp.is_dare and comp.densities[i] < 1.0:
                masks[i] = dare_keep_mask(comp.seed, i, key, shape, comp.densities[i]).to(tau.device)
        # a key composed again (an fp8 weight whose scale sits in another shard is merged once per shard) is counted
        # once in the stats
        stats = None if key in self._counted else self.stats
        self._counted.add(key)
        mixed = compose_(taus, comp.weights, comp.method, density=list(comp.densities), lambda_=comp.lambda_,
                         normalize=comp.normalize, rescale=comp.rescale, keep_masks=masks, gamma=comp.gamma,
                         stats=stats)
        # compose_ may return one of the reused τ buffers: the caller may hold the result while the next key is
        # composed (stream_write writes behind), so it gets its own copy
        return mixed.clone()


def refuse_non_additive(source: DeltaSource, method: str) -> None:
    """A replaced tensor (modules_to_save, trained biases) or a DoRA layer has no task vector ΔW to compose."""
    if source.replacements:
        key = next(iter(source.replacements))
        raise SourceFormatError(f"{source.path}: replaces {key!r} with its trained copy (modules_to_save or a trained "
                                f"bias), which --method {method} cannot compose (it is not a ΔW); merge this "
                                "adapter alone, or with the default task arithmetic")
    inner = source.inner if isinstance(source, CheckpointView) else source
    for key in source.keys():
        inner_key = source.inner_key(key) if isinstance(source, CheckpointView) else key
        if inner.dora_magnitude(inner_key) is not None:
            raise SourceFormatError(f"{source.path}: {key!r} is a DoRA layer (W' = m·(W + ΔW)/‖W + ΔW‖), which "
                                    f"--method {method} cannot compose; merge it alone with the default method")


def summary_lines(stats: ComposeStats, composition: Composition, paths: Sequence[object]) -> list[str]:
    """What a composition did, one line per input and one for the sign election (the CLI prints them)."""
    lines = [f"composed by {composition.method} (λ {composition.lambda_:g}, normalize "
             f"{'on' if composition.normalize else 'off'}): {stats.elements} elements"]
    for i, (touched, kept) in enumerate(zip(stats.touched, stats.kept)):
        share = kept / touched if touched else 0.0
        lines.append(f"  {_name(paths, i)}: weight {composition.weights[i]:g}, density "
                     f"{composition.densities[i]:g}: kept {share:.1%} of {touched} elements non-zero")
    if DEFAULTS[composition.method].consensus is not None:
        share = stats.conflicts / stats.elements if stats.elements else 0.0
        lines.append(f"  sign election: {stats.conflicts} elements ({share:.1%}) dropped an input of the losing sign")
    return lines
