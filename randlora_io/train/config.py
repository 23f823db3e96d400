"""What to attach: rank, alpha, targets, generator. Validated once, here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import HeaderError
from ..format.spec import SPARSE_THRESHOLD, GeneratorSpec, very_sparse_threshold

GENERATORS = ("philox", "peft")
METHODS = ("randlora", "vera")
KINDS = ("dense", "sparse", "very_sparse")
ALL_LINEAR = "all-linear"


@dataclass
class RandloraConfig:
    """RandLoRA (or VeRA) training configuration.

    method: ``randlora`` (default) or ``vera`` (Kopiczko et al., 2024: shared A (r, max_in), B (max_out, r), trained
        λ_b (out,) and λ_d (r,) per layer, no scaling; SPEC §2.1), both written in the randlora format.
    r: rank of each random basis (RandLoRA: N = ⌈min(out, in) / r⌉ bases per layer; VeRA: the shared rank, which may
        exceed a layer's dims, as in PEFT).
    alpha: RandLoRA's update is scaled by alpha / r (times the generator's normalisation, SPEC §3); default 20·r,
        PEFT's default ratio (randlora_alpha=640 at r=32). VeRA has no scaling: leave it unset.
    d_initial: VeRA's initial λ_d (PEFT's default 0.1); λ_b starts at 0, so ΔW starts at 0.
    target_modules: module-name suffixes (``["q_proj", "v_proj"]``: a name equal to one or ending in ``.q_proj``), one
        regular expression matched against the full name, or ``"all-linear"`` (every Linear / Conv1D except the
        output layer). Matching no module is an error.
    generator / kind / seed: how the shared bases are drawn: ``philox`` (native, reproducible everywhere) or ``peft``
        (PEFT's torch CPU RNG, for adapters PEFT must regenerate from its key); dense, sparse or very_sparse.
    dropout: dropout on the adapter path's input.
    """

    r: int = 8
    alpha: float | None = None
    target_modules: list[str] | str = ALL_LINEAR
    generator: str = "philox"
    kind: str = "dense"
    seed: int = 0
    dropout: float = 0.0
    exclude_modules: list[str] = field(default_factory=list)
    method: str = "randlora"
    d_initial: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise HeaderError(f"r must be a positive integer, got {self.r!r}")
        if self.method not in METHODS:
            raise HeaderError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "vera":
            self._check_vera()
        else:
            if self.alpha is None:
                self.alpha = 20.0 * self.r
            if not (self.alpha > 0):
                raise HeaderError(f"alpha must be positive, got {self.alpha!r}")
        if self.generator not in GENERATORS:
            raise HeaderError(f"generator must be one of {', '.join(GENERATORS)}, got {self.generator!r}")
        if self.kind not in KINDS:
            raise HeaderError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        peft_end = 2**64 if self.method == "vera" else 2**63  # VeRA's projection_prng_key: torch's whole seed range
        if not 0 <= self.seed < 2**64 or (self.generator == "peft" and self.seed >= peft_end):
            raise HeaderError(f"seed {self.seed} is out of range for the {self.generator} generator")
        if not 0.0 <= self.dropout < 1.0:
            raise HeaderError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise HeaderError(f"target_modules {self.target_modules!r} is not a valid regex: {exc}") from exc
        elif not isinstance(self.target_modules, str) and not self.target_modules:
            raise HeaderError("target_modules is empty; name at least one module or use 'all-linear'")

    def _check_vera(self) -> None:
        if self.alpha is not None:
            raise HeaderError(f"alpha={self.alpha!r}: VeRA has no scaling factor; leave alpha unset for method='vera'")
        if self.kind != "dense":
            raise HeaderError(f"kind={self.kind!r}: VeRA's bases are dense (SPEC §2.1); leave kind unset")
        if not (isinstance(self.d_initial, (int, float)) and abs(float(self.d_initial)) < float("inf")):
            raise HeaderError(f"d_initial must be a finite number, got {self.d_initial!r}")

    def generator_spec(self, min_dim: int) -> GeneratorSpec:
        """The format's generator record for bases of model-wide ``min_dim``, drawn in float32 and not cast
        (VeRA: PEFT's float32 torch draw or the native philox one, SPEC §2.1)."""
        if self.method == "vera":
            draw = "float32" if self.generator == "peft" else None
            return GeneratorSpec(name=self.generator, kind="dense", seed=self.seed, draw_dtype=draw, method="vera")
        if self.generator == "peft":
            draw = "bfloat16" if self.kind == "dense" else "float32"
            return GeneratorSpec(name="peft", kind=self.kind, seed=self.seed, draw_dtype=draw)
        threshold = {"dense": None, "sparse": SPARSE_THRESHOLD}.get(self.kind, very_sparse_threshold(min_dim))
        return GeneratorSpec(name="philox", kind=self.kind, seed=self.seed, threshold=threshold)

    def matches(self, name: str) -> bool:
        """Whether module ``name`` is targeted (``all-linear`` is resolved by the caller)."""
        if any(name == e or name.endswith("." + e) for e in self.exclude_modules):
            return False
        if isinstance(self.target_modules, str):
            return self.target_modules == ALL_LINEAR or re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)
