"""VeRA (Kopiczko et al., ICLR 2024) as PEFT 0.21.2's ``VeraModel`` computes it: the shared bases and ΔW.

Shapes and orientation: the shared bases are ``A`` (r, max_in) and ``B`` (max_out, r), float32, where
(max_out, max_in) is the elementwise maximum of (out, in) over the targeted layers (PEFT's ``_find_dim``). A layer
of (out, in) has the trained vectors λ_b (out,) and λ_d (r,) and uses the prefix slices ``B[:out, :]`` and
``A[:, :in]``::

    ΔW(out, in) = diag(λ_b) · B[:out, :] · diag(λ_d) · A[:, :in]          no scaling factor
    stored      = ΔW(out, in)ᵀ  when fan_in_fan_out (GPT-2 Conv1D stores (in, out)), else ΔW(out, in)

All arithmetic is float32 (PEFT on the CPU casts half bases and vectors to float32 before the product).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import HeaderError
from .basis import Bases, check_budget, philox_block_torch
from .philox import MATRIX_A, MATRIX_B
from .spec import GeneratorSpec

SEED_MIN, SEED_END = -(2**63), 2**64  # what torch.Generator.manual_seed accepts; a negative key is 2^64 + key
_HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def vera_seed(key: int) -> int:
    """PEFT's ``projection_prng_key`` as the seed torch uses: a key in [−2^63, 0) is taken as 2^64 + key, as
    ``torch.Generator.manual_seed`` does; the result is in [0, 2^64). Other keys raise ``ValueError``."""
    if isinstance(key, bool) or not isinstance(key, int) or not SEED_MIN <= key < SEED_END:
        raise ValueError(f"projection_prng_key {key!r} is not an integer in [-2^63, 2^64)")
    return key + 2**64 if key < 0 else key


def vera_bases_nbytes(rank: int, max_out: int, max_in: int) -> int:
    """Bytes of the float32 bases A (r, max_in) and B (max_out, r)."""
    return 4 * rank * (max_in + max_out)


def check_vera_budget(rank: int, max_out: int, max_in: int, max_bytes: int | None = None,
                      source: str = "bases") -> None:
    """Refuse ill-sized bases (:class:`HeaderError`) or bases over the budget (:class:`BasesTooLargeError`, SPEC
    §4.6) before anything is allocated. VeRA's r may exceed a layer's dims: only r ≥ 1 and sizes ≥ 1 are required."""
    if rank < 1 or max_out < 1 or max_in < 1:
        raise HeaderError(f"{source}: VeRA bases need rank, max_out and max_in >= 1, got rank {rank}, "
                          f"max_out {max_out}, max_in {max_in}")
    check_budget(vera_bases_nbytes(rank, max_out, max_in),
                 f"shared VeRA bases (rank {rank}, max_out {max_out}, max_in {max_in})", max_bytes, source)


def kaiming_bound(fan_in: int) -> float:
    """PEFT 0.21.2's VeRA bound √3 · (√2 / √fan_in), evaluated in that order in binary64 (√(6 / fan_in) up to its
    last bit): A's fan_in is max_in, B's is r."""
    return math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))


def _peft_kaiming(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """PEFT 0.21.2's ``vera.model._kaiming_init`` on a shape: ``torch.empty`` in the float32 default dtype, then
    ``uniform_(−bound, bound)`` with bound = :func:`kaiming_bound` (shape[1])."""
    tensor = torch.empty(shape, dtype=torch.float32)
    bound = kaiming_bound(shape[1])
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=gen)


def peft_vera_bases(seed: int, rank: int, max_out: int, max_in: int, cast_dtype: str | None = None,
                    max_bytes: int | None = None, source: str = "bases") -> Bases:
    """PEFT 0.21.2's ``vera_A`` (r, max_in) and ``vera_B`` (max_out, r), float32, as ``_init_vera_A_vera_B``
    draws them with ``torch.get_default_dtype()`` float32: one CPU ``torch.Generator`` seeded with ``seed`` (in
    [0, 2^64); see :func:`vera_seed`), A first, then B. ``cast_dtype`` (``bfloat16`` / ``float16``): PEFT's cast of
    the shared bases to a half base's dtype (then back to float32 by ``autocast_adapter_dtype``)."""
    check_vera_budget(rank, max_out, max_in, max_bytes, source)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    A = _peft_kaiming((rank, max_in), gen)
    B = _peft_kaiming((max_out, rank), gen)
    if cast_dtype in _HALF:  # "float32" (or None): no cast
        A, B = A.to(_HALF[cast_dtype]).float(), B.to(_HALF[cast_dtype]).float()
    return Bases(A=A, B=B)


def philox_vera_bases(seed: int, rank: int, max_out: int, max_in: int, max_bytes: int | None = None,
                      source: str = "bases") -> Bases:
    """The native VeRA bases (SPEC §2.1): element (row, col) of A (m = 0) and B (m = 1) is SPEC §4.2's philox dense
    value u ∈ (−1, 1) of (seed, m, row, col), times :func:`kaiming_bound` (max_in for A, r for B), the product of
    the float32 u and the binary64 bound rounded once to float32: PEFT's distribution, exact on every machine."""
    check_vera_budget(rank, max_out, max_in, max_bytes, source)
    gen = GeneratorSpec(name="philox", kind="dense", seed=seed)
    A = philox_block_torch(gen, MATRIX_A, slice(0, rank), slice(0, max_in)).double() * kaiming_bound(max_in)
    B = philox_block_torch(gen, MATRIX_B, slice(0, max_out), slice(0, rank)).double() * kaiming_bound(rank)
    return Bases(A=A.float(), B=B.float())


def vera_bases(generator: GeneratorSpec, rank: int, max_out: int, max_in: int, max_bytes: int | None = None,
               source: str = "bases") -> Bases:
    """The bases a VeRA generator (``method`` vera) describes: :func:`peft_vera_bases` (then its ``cast_dtype``)
    or :func:`philox_vera_bases`; A (r, max_in), B (max_out, r), float32."""
    if generator.name == "philox":
        return philox_vera_bases(generator.seed, rank, max_out, max_in, max_bytes, source)
    return peft_vera_bases(generator.seed, rank, max_out, max_in, generator.cast_dtype, max_bytes, source)


@dataclass(frozen=True)
class VeraLayer:
    """One VeRA layer: the weight's stored ``shape`` ((out, in), or (in, out) when ``fan_in_fan_out``), the dtype
    of its vectors λ_b / λ_d in a file, and a file's unknown layer keys (kept on rewrite, SPEC §2)."""

    shape: tuple[int, int]
    fan_in_fan_out: bool = False
    dtype: str = "float32"
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "fan_in_fan_out": self.fan_in_fan_out, "dtype": self.dtype, **self.extra}

    @property
    def out_in(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        return (self.shape[1], self.shape[0]) if self.fan_in_fan_out else (self.shape[0], self.shape[1])


def vera_delta(layer: VeraLayer, lambda_b: torch.Tensor, lambda_d: torch.Tensor, A_full: torch.Tensor,
               B_full: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """ΔW of one layer in its stored shape, float32, from λ_b (out,), λ_d (r,) and the model-wide bases A (r, ≥in)
    and B (≥out, r): (λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in]), transposed when ``fan_in_fan_out`` (PEFT's
    ``get_delta_weight``, whose float32 product this is)."""
    out_f, in_f = layer.out_in
    B = B_full[:out_f].to(device, torch.float32) * lambda_b.to(device, torch.float32)[:, None]
    A = A_full[:, :in_f].to(device, torch.float32) * lambda_d.to(device, torch.float32)[:, None]
    update = B @ A
    return (update.T if layer.fan_in_fan_out else update).contiguous()

