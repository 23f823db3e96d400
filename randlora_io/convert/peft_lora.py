"""Dense ΔW → a PEFT LoRA dir (``convert --to peft-lora``): a fixed rank k (truncated SVD,
:mod:`randlora_io.convert.lowrank`) or, with ``--max-error E``, per layer the smallest rank meeting E
(:mod:`randlora_io.convert.rank_budget`), optionally as one uniform rank a serving engine accepts
(:mod:`randlora_io.convert.serving`). Layers are streamed: one ΔW in memory at a time, only the factors kept.

PEFT LoRA stores ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r); the dir written
here has lora_alpha = r per layer (scaling 1): per-layer ranks go in ``rank_pattern`` / ``alpha_pattern`` under
``^<escaped module path>`` keys (PEFT and vLLM match ``(.*\\.)?(key)$``, so the ``^`` makes each key match its own
module only). A zero ΔW is left out of ``target_modules`` (PEFT refuses r = 0; an untargeted layer is exactly ΔW = 0
in PEFT and the engines). The read side is :mod:`randlora_io.sources.peft_lora`.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..errors import ConversionError, SourceFormatError, UnservableError
from ..progress import progress_bar
from ..sources.interface import DeltaSource
from ..sources.peft_dir import PEFT_PREFIX, PeftExtras
from ..sources.peft_lora import PEFT_TYPE
from .lowrank import LowRank, truncated_svd
from .peft_dir import write_peft_dir
from .rank_budget import budget_factors
from .serving import MAX_RANK, Engine


@dataclass
class LoraExport:
    """What ``--to peft-lora`` wrote: per weight key the factors' rank as chosen (``needed``) and as written
    (``ranks``, ≥ needed where an engine's uniform rank pads it), kept energy, measured relative error and method;
    ``r`` the config's rank; ``engine`` and its ``flags`` when written for one; ``overall_error`` over all layers."""

    needed: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    kept_energy: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    r: int = 0
    overall_error: float = 0.0
    params_out: int = 0
    engine: str | None = None
    flags: list[str] = field(default_factory=list)

    def table(self) -> list[str]:
        """One line per layer: rank (written, when padded), kept energy, error, method."""
        width = max(map(len, self.needed), default=0)
        lines = []
        for key, k in self.needed.items():
            written = self.ranks.get(key, 0)
            rank = f"{k}" if written == k else f"{k} (written {written})"
            lines.append(f"  {key:<{width}}  rank {rank:<14} kept energy {self.kept_energy[key]:.6f}  "
                         f"error {self.errors[key]:.3e}  {self.methods[key]}")
        return lines


def layer_factors(delta: torch.Tensor, rank: int | None, max_error: float | None, svd: str = "auto",
                  start: int = 32) -> LowRank:
    """Factors of one ΔW (out, in): at ``rank`` (truncated SVD), else the smallest rank meeting ``max_error``
    (``start``: the rank a like layer needed, the randomised path's first guess)."""
    if rank is not None:
        return truncated_svd(delta, rank)
    low = budget_factors(delta, max_error, svd, start=start)
    if low is None:
        raise ConversionError(f"--max-error {max_error:g} is below what float32 LoRA factors can hold even at full "
                              "rank; pass a larger bound (1e-6 or more)")
    return low


def export_peft_lora(source: DeltaSource, dst: str | os.PathLike, *, rank: int | None, max_error: float | None,
                     engine: Engine | None = None, svd: str = "auto", overwrite: bool = False,
                     progress: bool = False) -> LoraExport:
    """Write ``source`` as a PEFT LoRA dir at ``dst`` (nothing written on error). With ``rank``: every layer at that
    rank (``max_error``, if given, a bound checked afterwards); else per layer the smallest rank whose measured
    relative error is ≤ ``max_error``. ``engine``: one uniform rank from its allowed set, its config fields only."""
    if rank is None and max_error is None:
        raise ConversionError(f"{source.path}: --to peft-lora needs --rank K or --max-error E")
    if rank is None and max_error >= 1:
        raise ConversionError(f"--max-error {max_error:g} would drop whole layers (rank 0 has error 1); pass a "
                              "bound below 1, such as 0.05")
    out = LoraExport(engine=engine.name if engine else None)
    factors: dict[str, LowRank] = {}
    num = den = 0.0
    guesses: dict[tuple[int, int], int] = {}  # shape → rank the last such layer needed
    keys = source.keys()
    for key in progress_bar(progress, iterable=keys, desc="svd", unit="layer"):
        stored = source.delta(key)
        delta = stored.T if source.fan_in_fan_out(key) else stored  # (out, in)
        low = layer_factors(delta, rank, None if rank is not None else max_error, svd,
                            start=guesses.get(tuple(delta.shape), 32))
        guesses[tuple(delta.shape)] = low.rank
        norm2 = float(delta.double().pow(2).sum())
        del stored, delta
        if engine is not None and low.rank > MAX_RANK:
            raise UnservableError(f"{source.path}: {key!r} needs rank {low.rank} for --max-error {max_error:g}, above "
                                  f"{engine.name}'s largest --max-lora-rank {MAX_RANK}; raise the bound or merge")
        factors[key] = low
        out.needed[key], out.kept_energy[key] = low.rank, low.kept_energy
        out.errors[key], out.methods[key] = low.rel_error, low.method
        num, den = num + low.rel_error**2 * norm2, den + norm2
    out.overall_error = math.sqrt(num / den) if den > 0 else 0.0
    if rank is not None and max_error is not None and max(out.errors.values(), default=0.0) > max_error:
        raise ConversionError(f"{source.path}: SVD error {max(out.errors.values()):.4g} exceeds --max-error "
                              f"{max_error}; raise --rank or the bound (or drop --rank to choose ranks per layer)")
    kept = {k: low for k, low in factors.items() if rank is not None or low.rank > 0}
    if not kept:
        raise ConversionError(f"{source.path}: every layer's ΔW is zero; there is nothing to export")
    if engine is not None:
        uniform = engine.uniform_rank(rank if rank is not None else max(low.rank for low in kept.values()))
        out.ranks = {k: uniform for k in kept}
    else:
        out.ranks = {k: rank if rank is not None else low.rank for k, low in kept.items()}
    # PEFT sets fan_in_fan_out per layer type on load and saves the last layer's: write that one
    out.r = write_peft_lora(kept, out.ranks, source.fan_in_fan_out(list(kept)[-1]), dst, overwrite=overwrite,
                            extras=None if engine else source.peft_extras, engine=engine)
    out.params_out = sum(r * (factors[k].up.shape[0] + factors[k].down.shape[1]) for k, r in out.ranks.items())
    if engine is not None:
        out.flags = engine.flags(out.r, [k.removesuffix(".weight") for k in kept])
    return out


def _padded(low: LowRank, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``low``'s down (r, in) and up (out, r), zero rows / columns added past its own rank."""
    extra = r - low.rank
    down = torch.cat([low.down, low.down.new_zeros(extra, low.down.shape[1])]) if extra else low.down
    up = torch.cat([low.up, low.up.new_zeros(low.up.shape[0], extra)], dim=1) if extra else low.up
    return down.contiguous(), up.contiguous()


def rank_patterns(ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """The config's ``r`` (the most common rank; the larger on a tie) and a ``rank_pattern`` for the other modules,
    keyed ``^<re.escape(module)>`` so each key matches its own module only. ``ranks``: {weight key: rank}."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda v: (counts[v], v))
    return r, {f"^{re.escape(k.removesuffix('.weight'))}": v for k, v in ranks.items() if v != r}


def write_peft_lora(
    factors: dict[str, LowRank],
    ranks: dict[str, int],
    fan_in_fan_out: bool,
    dst: str | os.PathLike,
    *,
    base_model: dict | None = None,
    overwrite: bool = False,
    extras: PeftExtras | None = None,
    engine: Engine | None = None,
) -> int:
    """Write LoRA factors as a PEFT LoRA dir, layer ``k`` at rank ``ranks[k]`` (zero-padded past its factors) with
    alpha = rank (scaling 1), plus a source PEFT dir's ``extras`` (trained head / biases, ``peft_dir.PeftExtras``);
    ``engine``: only the config fields it reads (one r, no patterns). Returns the config's ``r``."""
    if any(not k.endswith(".weight") for k in factors):
        raise SourceFormatError("delta keys must end in '.weight' to map onto PEFT modules")
    tensors = {}
    for key, low in factors.items():
        module = key.removesuffix(".weight")
        down, up = _padded(low, ranks[key])
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = down
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = up
    r, pattern = rank_patterns(ranks)
    base = base_model or {}
    config = {
        "peft_type": PEFT_TYPE, "task_type": None, "r": r, "lora_alpha": r, "lora_dropout": 0.0,
        "target_modules": sorted(k.removesuffix(".weight") for k in factors), "fan_in_fan_out": fan_in_fan_out,
        "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": pattern, "alpha_pattern": dict(pattern), "modules_to_save": None,
        "base_model_name_or_path": base.get("id"), "revision": base.get("revision"),
    }
    if engine is not None:
        assert not pattern, "an engine's dir has one rank"
        config = engine.config(config)
    write_peft_dir(dst, config, tensors, overwrite=overwrite, extras=extras)
    return r

