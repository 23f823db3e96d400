"""Philox4x32-10 (Salmon et al., SC'11; Random123), vectorised in numpy and in torch, bit-identical.

The counter layout used for RandLoRA bases is fixed by SPEC.md §4.2:
``key = (seed mod 2^32, seed >> 32)``, ``counter = (col // 4, row, matrix_id, 0)``, and the element is output word
``col % 4``. Because an element depends only on ``(seed, matrix_id, row, col)``, any tile can be generated alone.
"""

from __future__ import annotations

import numpy as np
import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
ROUNDS = 10

MATRIX_A = 0
MATRIX_B = 1


def split_seed(seed: int) -> tuple[int, int]:
    """Philox key words ``(k0, k1)`` of a seed in ``[0, 2^64)``."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed {seed} must be in [0, 2^64)")
    return seed & MASK32, seed >> 32


def philox4x32_numpy(
    counter: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], key: tuple[int, int], rounds: int = ROUNDS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x32 on broadcastable uint32 counter arrays; returns the four uint32 output words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    m0, m1, mask, shift = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(MASK32), np.uint64(32)
    for _ in range(rounds):
        p0 = c0 * m0
        p1 = c2 * m1
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & mask, (p0 >> shift) ^ c3 ^ k1, p0 & mask
        k0 = (k0 + np.uint64(PHILOX_W0)) & mask
        k1 = (k1 + np.uint64(PHILOX_W1)) & mask
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))  # type: ignore[return-value]


def philox4x32_torch(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], key: tuple[int, int], rounds: int = ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 on int64 tensors holding uint32 values; returns four int64 tensors of uint32 values.

    int64 products of two 32-bit values wrap modulo 2^64, which keeps the low 64 bits exact; masking recovers them.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = ((p1 >> 32) & MASK32) ^ c1 ^ k0, p1 & MASK32, ((p0 >> 32) & MASK32) ^ c3 ^ k1, p0 & MASK32
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def basis_bits_numpy(seed: int, matrix_id: int, rows: slice, cols: slice) -> np.ndarray:
    """uint32 random words of basis ``matrix_id`` for the block ``[rows, cols]`` (unit-step slices, explicit ends)."""
    key = split_seed(seed)
    row_idx = np.arange(rows.start, rows.stop, dtype=np.uint64)[:, None]
    g0, g1 = cols.start // 4, (cols.stop + 3) // 4
    groups = np.arange(g0, g1, dtype=np.uint64)[None, :]
    zeros = np.zeros((1, 1), dtype=np.uint64)
    words = philox4x32_numpy((groups, row_idx, zeros + matrix_id, zeros), key)
    full = np.stack(np.broadcast_arrays(*words), axis=-1).reshape(len(row_idx), -1)
    offset = cols.start - 4 * g0
    return full[:, offset : offset + (cols.stop - cols.start)]


def basis_bits_torch(seed: int, matrix_id: int, rows: slice, cols: slice, device: str | torch.device = "cpu") -> torch.Tensor:
    """Same as :func:`basis_bits_numpy` in torch; returns an int64 tensor of uint32 values, shape (rows, cols)."""
    key = split_seed(seed)
    row_idx = torch.arange(rows.start, rows.stop, dtype=torch.int64, device=device)[:, None]
    g0, g1 = cols.start // 4, (cols.stop + 3) // 4
    groups = torch.arange(g0, g1, dtype=torch.int64, device=device)[None, :]
    groups, row_idx = torch.broadcast_tensors(groups, row_idx)
    zeros = torch.zeros_like(groups)
    words = philox4x32_torch((groups, row_idx, zeros + matrix_id, zeros), key)
    full = torch.stack(words, dim=-1).reshape(row_idx.shape[0], -1)
    offset = cols.start - 4 * g0
    return full[:, offset : offset + (cols.stop - cols.start)]
