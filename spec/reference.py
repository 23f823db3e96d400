"""A scalar reference of SPEC.md, used to produce spec/vectors/ — independent of the randlora_io package.

§3–§4.2, §4.4 and §7 (philox bases, ΔW, checksum, base fingerprint) are pure Python: no numpy, no torch, one element
at a time, slow by design. §4.3 (the `peft` generator) is *defined* by torch calls, so :func:`peft_bases` imports
torch, and nothing else, and follows the text of §4.3 step by step.
"""

from __future__ import annotations

import hashlib
import math
import struct

M0, M1, W0, W1, MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF
SPARSE_THRESHOLD = 715827882  # floor(2^32 / 6)
FINGERPRINT_PREFIX = "sha256-weights:"


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c3 ^ k1) & MASK, p0 & MASK
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return c0, c1, c2, c3


def element_bits(seed: int, matrix_id: int, row: int, col: int) -> int:
    key = (seed & MASK, seed >> 32)
    return philox4x32_10((col // 4, row, matrix_id, 0), key)[col % 4]


def bits_value(x: int, kind: str, threshold: int | None = None) -> float:
    """SPEC §4.2: a 32-bit word → its basis value (exact in binary32 and binary64)."""
    if kind == "dense":
        return ((x >> 9) * 2 + 1 - 2**23) / 2**23
    if x < threshold:
        return -1.0
    return 1.0 if x >= 2**32 - threshold else 0.0


def element_value(seed: int, matrix_id: int, row: int, col: int, kind: str, threshold: int | None = None) -> float:
    return bits_value(element_bits(seed, matrix_id, row, col), kind, threshold)


def very_sparse_threshold(min_dim: int) -> int:
    """SHOULD-value of T for `very_sparse` (SPEC §4.2)."""
    return max(1, min(2**31, math.floor(2**31 / math.sqrt(min_dim))))


def normalisation(kind: str, threshold: int | None, generator: str = "philox") -> float:
    if generator == "peft":
        return 1.0
    return 3.0 if kind == "dense" else 2.0**31 / threshold


def scaling(alpha: float, rank: int, kind: str, threshold: int | None, generator: str = "philox") -> float:
    """SPEC §3: s = alpha / r · g, evaluated in binary64 left to right."""
    return alpha / rank * normalisation(kind, threshold, generator)


def _layer_dims(shape, fan_in_fan_out):
    out_f, in_f = (shape[1], shape[0]) if fan_in_fan_out else (shape[0], shape[1])
    return out_f, in_f


def delta_element_bound(seed, kind, threshold, rank, alpha, shape, fan_in_fan_out, lam, gam, row, col):
    """(value, abs_sum) of one element of ΔW in stored orientation, in binary64, by the defining sum (SPEC §3).

    abs_sum = |s| · Σ_k |B·λ·A·γ| is what the conformance tolerance of §3 is relative to."""
    out_f, in_f = _layer_dims(shape, fan_in_fan_out)
    D, n = min(out_f, in_f), -(-min(out_f, in_f) // rank)
    o, i = (col, row) if fan_in_fan_out else (row, col)  # (out, in) index of the stored element
    m, j = (o, i) if in_f == D else (i, o)  # (M, D) index
    total = absolute = 0.0
    for k in range(rank * n):
        a, b = k // n, k % n
        term = (element_value(seed, 1, m, k, kind, threshold) * lam[a][b]
                * element_value(seed, 0, a, j, kind, threshold) * gam[b][j])
        total += term
        absolute += abs(term)
    s = scaling(alpha, rank, kind, threshold)
    return s * total, abs(s) * absolute


def delta_element(seed, kind, threshold, rank, alpha, shape, fan_in_fan_out, lam, gam, row, col) -> float:
    """One element of ΔW in stored orientation, in float64, by the defining double sum (SPEC §3)."""
    return delta_element_bound(seed, kind, threshold, rank, alpha, shape, fan_in_fan_out, lam, gam, row, col)[0]


def sample_scales(rank: int, n: int, D: int) -> tuple[list[list[float]], list[list[float]]]:
    """Deterministic, exactly representable scales for the ΔW vectors: multiples of 1/64 and 1/1024."""
    lam = [[((3 * a + 5 * b) % 17 - 8) / 64 for b in range(n)] for a in range(rank)]
    gam = [[((7 * b + 11 * j) % 23 - 11) / 1024 for j in range(D)] for b in range(n)]
    return lam, gam


# --------------------------------------------------------------------------------------------------------------------
# §2 shared dims, §4.4 checksum, §7 fingerprint
# --------------------------------------------------------------------------------------------------------------------


def shared_dims(layers) -> tuple[int, int]:
    """SPEC §2/§4.3 (PEFT's _find_dim): elementwise max of (out, in) over the layers, then (min, max).
    ``layers`` iterates (stored shape, fan_in_fan_out)."""
    max_out = max_in = 0
    for shape, fan in layers:
        out_f, in_f = _layer_dims(shape, fan)
        max_out, max_in = max(max_out, out_f), max(max_in, in_f)
    return min(max_out, max_in), max(max_out, max_in)


def f32_bytes(values) -> bytes:
    return b"".join(struct.pack("<f", v) for v in values)


def philox_bases(seed: int, kind: str, threshold: int | None, rank: int, min_dim: int, max_dim: int):
    """A (r × min_dim) and B (max_dim × N_total·r) as nested lists of floats (SPEC §4.1–4.2)."""
    width = -(-min_dim // rank) * rank
    A = [[element_value(seed, 0, i, j, kind, threshold) for j in range(min_dim)] for i in range(rank)]
    B = [[element_value(seed, 1, m, k, kind, threshold) for k in range(width)] for m in range(max_dim)]
    return A, B


def bases_sha256(A, B) -> str:
    """SPEC §4.4: SHA-256 of A's float32 little-endian bytes, row-major, then B's."""
    digest = hashlib.sha256()
    for matrix in (A, B):
        for row in matrix:
            digest.update(f32_bytes(row))
    return digest.hexdigest()


def base_fingerprint(weights) -> str:
    """SPEC §7: ``weights`` iterates (key, shape list, torch dtype name such as "torch.float32", raw bytes)."""
    digest = hashlib.sha256()
    for key, shape, dtype, raw in sorted(weights, key=lambda w: w[0]):
        digest.update(f"{key}|[{', '.join(str(d) for d in shape)}]|{dtype}\n".encode())
        digest.update(raw)
    return FINGERPRINT_PREFIX + digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# §4.3 the `peft` generator (defined by torch calls; torch is imported only here)
# --------------------------------------------------------------------------------------------------------------------


def peft_bases(seed: int, kind: str, draw_dtype: str, cast_dtype: str | None, rank: int, min_dim: int, max_dim: int):
    """SPEC §4.3 step by step: float32 torch tensors A (r, min_dim) and B (max_dim, N_total·r)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_total = -(-min_dim // rank)
    if kind == "dense":
        dtype = getattr(torch, draw_dtype)

        def kaiming(shape):
            return torch.nn.init.kaiming_uniform_(torch.empty(shape, dtype=dtype), a=math.sqrt(5), generator=gen)

        A = kaiming((rank, 1, min_dim))
        B = torch.cat([kaiming((max_dim, 1, rank)) for _ in range(n_total)], dim=1)
        A, B = A / A.std(), B / B.std()
    else:
        s = 3 if kind == "sparse" else math.sqrt(min_dim)
        uniform = (torch.rand((rank, 1, min_dim), generator=gen), torch.rand((max_dim, n_total, rank), generator=gen))
        ternary = []
        for u in uniform:
            t = torch.zeros(u.shape)
            t[u < 1 / (2 * s)] = -1
            t[u > 1 - 1 / (2 * s)] = 1
            ternary.append(t / t.std())
        A, B = ternary
    if cast_dtype is not None:
        A, B = A.to(getattr(torch, cast_dtype)), B.to(getattr(torch, cast_dtype))
    return A.reshape(rank, min_dim).float(), B.reshape(max_dim, n_total * rank).float()


# --------------------------------------------------------------------------------------------------------------------
# §2.1 VeRA (method "vera"): its bases and ΔW
# --------------------------------------------------------------------------------------------------------------------


def vera_bound(fan_in: int) -> float:
    """SPEC §2.1: √3 · (√2 / √fan_in), in binary64, in that order (PEFT 0.21.2's _kaiming_init)."""
    return math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))


def _to_f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def vera_philox_bases(seed: int, rank: int, max_out: int, max_in: int):
    """SPEC §2.1 philox: A (r × max_in), B (max_out × r); element = f32(u · bound), u the §4.2 dense value."""
    A = [[_to_f32(element_value(seed, 0, i, j, "dense") * vera_bound(max_in)) for j in range(max_in)]
         for i in range(rank)]
    B = [[_to_f32(element_value(seed, 1, m, k, "dense") * vera_bound(rank)) for k in range(rank)]
         for m in range(max_out)]
    return A, B


def vera_peft_bases(seed: int, cast_dtype: str | None, rank: int, max_out: int, max_in: int):
    """SPEC §2.1 peft, step by step: one CPU generator, A = empty(r, max_in).uniform_(±bound(max_in)), then
    B = empty(max_out, r).uniform_(±bound(r)), float32; then the cast, then float32."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.empty((rank, max_in), dtype=torch.float32).uniform_(-vera_bound(max_in), vera_bound(max_in), generator=gen)
    B = torch.empty((max_out, rank), dtype=torch.float32).uniform_(-vera_bound(rank), vera_bound(rank), generator=gen)
    if cast_dtype not in (None, "float32"):
        A, B = A.to(getattr(torch, cast_dtype)), B.to(getattr(torch, cast_dtype))
    return A.float(), B.float()


def vera_delta_element(A, B, lambda_b, lambda_d, shape, fan_in_fan_out, row, col) -> tuple[float, float]:
    """(value, abs_sum) of one element of a VeRA ΔW in stored orientation, binary64, by the defining sum:
    ΔW[o, i] = λ_b[o] · Σ_k B[o][k] · λ_d[k] · A[k][i]."""
    o, i = (col, row) if fan_in_fan_out else (row, col)
    terms = [lambda_b[o] * B[o][k] * lambda_d[k] * A[k][i] for k in range(len(lambda_d))]
    return sum(terms), sum(abs(t) for t in terms)


__all__ = ["base_fingerprint", "bases_sha256", "bits_value", "delta_element", "delta_element_bound", "element_bits",
           "element_value", "peft_bases", "philox4x32_10", "philox_bases", "sample_scales", "scaling", "shared_dims",
           "vera_bound", "vera_delta_element", "vera_peft_bases", "vera_philox_bases"]
