"""An L1 norm whose bits do not depend on the thread count, the device or how the tensor is split: DARE's rescale
(‖τ‖₁ / ‖m⊙τ‖₁) must give the same bytes on any machine and under torchrun (SPEC.md Appendix A).

``torch.sum`` splits a large reduction across threads and adds the partial sums in an order that depends on how many
there are, so its float32 result moves by an ulp between runs with other thread counts. Here the order is fixed:
|x| in binary64, zero-padded to a power of two, summed by a pairwise tree of adjacent pairs
(``x ← x[0::2] + x[1::2]`` until one value is left). Every step is an element-wise add, which no thread split
changes.

:func:`pairwise_l1_reference` is that definition, spelled out on the whole tensor; :func:`pairwise_l1` is the same
tree computed in fixed blocks of ``BLOCK`` elements (a power of two, so each block is a subtree), at most ``CHUNK``
of them widened to binary64 at a time, so the extra memory stays a few MiB whatever the tensor's size.
"""

from __future__ import annotations

import torch

BLOCK = 1 << 16  # elements per subtree (a power of two)
CHUNK = 32  # subtrees widened to float64 at once (32 × 64 Ki × 8 B = 16 MiB)


def _tree(x: torch.Tensor) -> torch.Tensor:
    """Pairwise sum along the last dim of float64 ``x`` (..., n), n a power of two → (...,)."""
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def _padded_pow2(x: torch.Tensor) -> torch.Tensor:
    """1-D ``x`` zero-padded at the end to the next power of two (at least 1)."""
    n = x.numel()
    size = 1 << max(0, (n - 1).bit_length())
    return torch.cat([x, x.new_zeros(size - n)]) if size != n else x


def pairwise_l1_reference(t: torch.Tensor) -> float:
    """Σ|t| of any float tensor, binary64, by the pairwise tree over its row-major elements (the definition)."""
    return float(_tree(_padded_pow2(t.detach().reshape(-1).abs().double())))


def pairwise_l1(t: torch.Tensor) -> float:
    """:func:`pairwise_l1_reference`, bit for bit, in bounded memory: whole ``BLOCK``s of ``t`` (any float dtype,
    any device, any shape, row-major) reduced ``CHUNK`` at a time, the last partial block zero-padded, then the
    block sums reduced by the same tree."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n <= BLOCK:
        return pairwise_l1_reference(flat)
    full = n // BLOCK
    sums = []
    blocks = flat[: full * BLOCK].view(full, BLOCK)
    for start in range(0, full, CHUNK):
        sums.append(_tree(blocks[start:start + CHUNK].abs().double()))
    if full * BLOCK < n:
        tail = flat[full * BLOCK:].abs().double()
        sums.append(_tree(torch.cat([tail, tail.new_zeros(BLOCK - tail.numel())])[None]))
    return float(_tree(_padded_pow2(torch.cat(sums))))
