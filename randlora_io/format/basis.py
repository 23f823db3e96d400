"""The shared random bases A and B (SPEC §4), from either generator.

Conventions (SPEC §3): ``A`` is (r, min_dim) and ``B`` is (max_dim, N_total·r), both float32, where
``N_total = ceil(min_dim / r)`` for the model-wide ``min_dim``. Column ``k`` of ``B`` is PEFT's basis ``k // r``,
rank index ``k % r`` (PEFT's ``randlora_B.flatten(1)``). A layer of shape D = min, M = max uses ``A[:, :D]`` and
``B[:M, :n·r]`` with n = ceil(D / r).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BasesTooLargeError, HeaderError
from .philox import MATRIX_A, MATRIX_B, basis_bits_numpy, basis_bits_torch
from .spec import AdapterHeader, GeneratorSpec, num_bases

BASES_BUDGET_ENV = "RANDLORA_IO_MAX_BASES_BYTES"
DEFAULT_MAX_BASES_BYTES = 4 * 2**30  # SPEC §4.6: 4 GiB of float32 bases (a 70B model without lm_head needs ~1 GB)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ROW_CHUNK = 512  # rows of B generated at a time by the torch philox path, to bound int64 temporaries


@dataclass
class Bases:
    """Shared bases: ``A`` (r, min_dim) float32 and ``B`` (max_dim, N_total·r) float32, CPU or CUDA."""

    A: torch.Tensor
    B: torch.Tensor

    def sha256(self) -> str:
        """SPEC §4.4: sha256 of A's then B's float32 little-endian bytes, row-major."""
        digest = hashlib.sha256()
        for t in (self.A, self.B):
            digest.update(memoryview(t.detach().to("cpu", torch.float32).contiguous().numpy()).cast("B"))
        return digest.hexdigest()

    def for_layer(self, min_dim: int, max_dim: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``A[:, :min_dim]`` (r, D) and ``B[:max_dim, :n·r]`` (M, n·r) for one layer."""
        r = self.A.shape[0]
        return self.A[:, :min_dim], self.B[:max_dim, : n * r]


# --------------------------------------------------------------------------------------------------------------------
# size and budget (SPEC §4.6)
# --------------------------------------------------------------------------------------------------------------------


def bases_nbytes(rank: int, min_dim: int, max_dim: int) -> int:
    """Bytes of the float32 bases A (r, min_dim) and B (max_dim, ceil(min_dim / r)·r)."""
    return 4 * (rank * min_dim + max_dim * num_bases(min_dim, rank) * rank)


def bases_budget(max_bytes: int | None = None) -> int:
    """The budget in bytes: ``max_bytes`` when given, else ``$RANDLORA_IO_MAX_BASES_BYTES``, else 4 GiB."""
    if max_bytes is not None:
        return int(max_bytes)
    text = os.environ.get(BASES_BUDGET_ENV)
    if text is None or not text.strip():
        return DEFAULT_MAX_BASES_BYTES
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise HeaderError(f"{BASES_BUDGET_ENV}={text!r} must be a number of bytes (a non-negative integer)")
    return value


def check_bases_budget(rank: int, min_dim: int, max_dim: int, max_bytes: int | None = None,
                       source: str = "bases") -> None:
    """Refuse, before anything is allocated, bases that are ill-sized or larger than the budget (SPEC §4.6).

    Raises :class:`HeaderError` unless 1 ≤ rank ≤ min_dim ≤ max_dim, :class:`BasesTooLargeError` over budget."""
    if not (1 <= rank <= min_dim <= max_dim):
        raise HeaderError(f"{source}: bases need 1 <= rank <= min_dim <= max_dim, got rank {rank}, "
                          f"min_dim {min_dim}, max_dim {max_dim}")
    check_budget(bases_nbytes(rank, min_dim, max_dim), f"shared bases (rank {rank}, min_dim {min_dim}, max_dim "
                 f"{max_dim})", max_bytes, source)


def check_budget(need: int, what: str, max_bytes: int | None, source: str) -> None:
    """Refuse (:class:`BasesTooLargeError`) ``need`` bytes of ``what`` over the budget (SPEC §4.6)."""
    budget = bases_budget(max_bytes)
    if need > budget:
        raise BasesTooLargeError(
            f"{source}: the {what} need {need / 2**30:.2f} GiB, above the {budget / 2**30:.2f} GiB budget; if the "
            f"adapter is genuine, raise it with {BASES_BUDGET_ENV}=<bytes> (or max_bases_bytes=)")


# --------------------------------------------------------------------------------------------------------------------
# philox (native): integer → float rules of SPEC §4.2
# --------------------------------------------------------------------------------------------------------------------


def bits_to_values_numpy(bits: np.ndarray, kind: str, threshold: int | None) -> np.ndarray:
    """uint32 words → float32 basis values. dense: (2·(x >> 9) + 1 − 2^23) · 2^−23, exactly; ternary otherwise."""
    if kind == "dense":
        odd = (bits >> np.uint32(9)).astype(np.int64) * 2 + 1 - 2**23
        return (odd.astype(np.float32) * np.float32(2.0**-23)).astype(np.float32)
    assert threshold is not None
    low = bits < np.uint32(threshold)
    high = bits >= np.uint32(2**32 - threshold)
    return high.astype(np.float32) - low.astype(np.float32)


def bits_to_values_torch(bits: torch.Tensor, kind: str, threshold: int | None) -> torch.Tensor:
    """Torch twin of :func:`bits_to_values_numpy`; ``bits`` is int64 holding uint32 values."""
    if kind == "dense":
        odd = (bits >> 9) * 2 + 1 - 2**23
        return odd.to(torch.float32) * (2.0**-23)
    assert threshold is not None
    return (bits >= 2**32 - threshold).to(torch.float32) - (bits < threshold).to(torch.float32)


def philox_block_numpy(generator: GeneratorSpec, matrix_id: int, rows: slice, cols: slice) -> np.ndarray:
    """float32 block ``[rows, cols]`` of basis ``matrix_id`` (0 = A, 1 = B), computed on its own."""
    bits = basis_bits_numpy(generator.seed, matrix_id, rows, cols)
    return bits_to_values_numpy(bits, generator.kind, generator.threshold)


def philox_block_torch(
    generator: GeneratorSpec, matrix_id: int, rows: slice, cols: slice, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Torch twin of :func:`philox_block_numpy`: float32 tensor of shape (rows, cols) on ``device``."""
    bits = basis_bits_torch(generator.seed, matrix_id, rows, cols, device=device)
    return bits_to_values_torch(bits, generator.kind, generator.threshold)


def _philox_bases(generator: GeneratorSpec, rank: int, min_dim: int, max_dim: int, device: str | torch.device) -> Bases:
    width = num_bases(min_dim, rank) * rank
    A = philox_block_torch(generator, MATRIX_A, slice(0, rank), slice(0, min_dim), device)
    B = torch.empty((max_dim, width), dtype=torch.float32, device=device)
    for start in range(0, max_dim, _ROW_CHUNK):
        stop = min(max_dim, start + _ROW_CHUNK)
        B[start:stop] = philox_block_torch(generator, MATRIX_B, slice(start, stop), slice(0, width), device)
    return Bases(A=A, B=B)


# --------------------------------------------------------------------------------------------------------------------
# peft: PEFT 0.21.2's regeneration from projection_prng_key (SPEC §4.3)
# --------------------------------------------------------------------------------------------------------------------


def _peft_kaiming(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype)
    with torch.no_grad():
        return torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=gen)


def _peft_ternary(shape: tuple[int, ...], sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """PEFT's sparse draw ``u = torch.rand(shape)``; −1 where u < 1/(2·sparsity), 1 where u > 1 − 1/(2·sparsity),
    else 0 (float32), drawn in chunks of rows: CPU ``torch.rand`` consumes the generator serially, so the chunks are
    the one call's values (tested), without its shape-sized float32 and boolean temporaries (a 7B model's B is
    11008 × 11008: ~1.5 GB of them)."""
    out = torch.zeros(shape)
    for start in range(0, shape[0], _ROW_CHUNK):
        u = torch.rand((min(_ROW_CHUNK, shape[0] - start), *shape[1:]), generator=gen)
        rows = out[start: start + u.shape[0]]
        rows[u < 1 / (2 * sparsity)] = -1
        rows[u > 1 - 1 / (2 * sparsity)] = 1
    return out


def peft_bases_raw(generator: GeneratorSpec, rank: int, min_dim: int, max_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's buffers exactly as it builds them: A (r, 1, min_dim), B (max_dim, N_total, r), in the draw dtype,
    then cast to ``cast_dtype`` when set. The torch call sequence mirrors ``RandLoraModel._init_randlora_A_randlora_B``
    and ``_init_randlora_A_randlora_B_sparse`` of PEFT 0.21.2."""
    gen = torch.Generator(device="cpu").manual_seed(generator.seed)
    n_total = num_bases(min_dim, rank)
    if generator.kind == "dense":
        dtype = _TORCH_DTYPES[generator.draw_dtype or "bfloat16"]
        A = _peft_kaiming((rank, 1, min_dim), dtype, gen)
        B = torch.empty((max_dim, n_total, rank), dtype=dtype)
        for b in range(n_total):  # PEFT draws the chunks one by one and concatenates them: same draws, one buffer
            B[:, b: b + 1] = _peft_kaiming((max_dim, 1, rank), dtype, gen)
        A, B = A / A.std(), B.div_(B.std())
    else:
        sparsity = 3 if generator.kind == "sparse" else math.sqrt(min_dim)
        A = _peft_ternary((rank, 1, min_dim), sparsity, gen)
        B = _peft_ternary((max_dim, n_total, rank), sparsity, gen)
        A, B = A / A.std(), B.div_(B.std())
    if generator.cast_dtype is not None:
        A, B = A.to(_TORCH_DTYPES[generator.cast_dtype]), B.to(_TORCH_DTYPES[generator.cast_dtype])
    return A, B


def peft_bases_to_spec(A_raw: torch.Tensor, B_raw: torch.Tensor) -> Bases:
    """PEFT's (r, 1, min_dim) / (max_dim, N, r) buffers → spec layout (r, min_dim) / (max_dim, N·r), float32."""
    return Bases(A=A_raw.reshape(A_raw.shape[0], -1).float().contiguous(), B=B_raw.flatten(1).float().contiguous())


def spec_bases_to_peft(bases: Bases, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`peft_bases_to_spec`: (r, 1, min_dim) and (max_dim, N, r) tensors of ``dtype``."""
    return bases.A[:, None, :].to(dtype), bases.B.reshape(bases.B.shape[0], -1, rank).to(dtype)


# --------------------------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------------------------


def generate_bases(generator: GeneratorSpec, rank: int, min_dim: int, max_dim: int,
                   device: str | torch.device = "cpu", max_bytes: int | None = None, source: str = "bases") -> Bases:
    """The shared bases for ``generator`` sized (r, min_dim) and (max_dim, ceil(min_dim/r)·r), float32.

    Refuses sizes over the budget before allocating (:func:`check_bases_budget`; ``max_bytes`` overrides it);
    ``source`` (the file the bases are for) starts that error message."""
    check_bases_budget(rank, min_dim, max_dim, max_bytes, source=source)
    if generator.name == "philox":
        return _philox_bases(generator, rank, min_dim, max_dim, device)
    bases = peft_bases_to_spec(*peft_bases_raw(generator, rank, min_dim, max_dim))
    return Bases(A=bases.A.to(device), B=bases.B.to(device))


def bases_for_header(header: AdapterHeader, device: str | torch.device = "cpu", max_bytes: int | None = None) -> Bases:
    """Generate the bases a header describes (no checksum verification; see ``RandloraAdapter.bases``)."""
    return generate_bases(header.generator, header.rank, header.min_dim, header.max_dim, device, max_bytes)
