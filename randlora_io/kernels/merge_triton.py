"""Triton in-place merge W += s·ΔW for one layer, with its torch reference beside it (the test oracle).

In the layer's (M, D) orientation ΔW_MD = U_B · S with U_B = B[:M, :K] (M, K = r·n) and S = λ ⊗ A ⊗ γ (K, D)
(see ``randlora_io.format.delta``). One program owns a (BLOCK_M, BLOCK_D) tile of W: it loops over K in BLOCK_K steps,
builds the S tile in registers from λ (r, n), A (r, D) and γ (n, D), gets the U_B tile either by loading the shared
bases (``peft`` generator, or bases generated once) or by running Philox4x32-10 in registers (native ``philox``
generator: counter (col // 4, row, 1, 0), key (seed lo, seed hi), word col % 4, SPEC §4.2), accumulates in fp32 with
``tl.dot``, then reads the W tile once, adds, rounds once to W's dtype and writes it back. Nothing else is allocated.

W's orientation (out ≥ in or out < in, ``fan_in_fan_out``) is folded into the two strides of its (M, D) view, so
one kernel serves every layout.

Precision of the U·S product (``precision``): the default ``split`` runs on bf16 tensor cores with float32-class
accuracy — S (and U unless its values are exact in bf16) is split into three bf16 limbs whose products are exact, 3
or 6 MMAs per step (bound and torch twin in ``randlora_io.kernels.limbs``). ``bf16`` is one MMA (≈ 2^-8 relative),
``ieee`` float32 FMAs without tensor cores, ``tf32``/``tf32x3`` Triton's own. On a GPU the tile shape is autotuned
per (M, D, K) over :func:`configs_for` (W is restored between trials). Under ``TRITON_INTERPRET=1`` the kernel runs
on CPU tensors (tests) with one config; there the bf16 limbs are widened to float32 before ``tl.dot`` (the
interpreter's bf16 dot is broken), which computes the same exact products, so CPU tests exercise the limb split.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format.delta import reference_delta
from ..format.philox import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1, split_seed
from ..format.spec import GeneratorSpec, LayerSpec

_KIND_CODE = {"dense": 0, "sparse": 1, "very_sparse": 1}
_M0, _M1 = tl.constexpr(PHILOX_M0), tl.constexpr(PHILOX_M1)
_W0, _W1 = tl.constexpr(PHILOX_W0), tl.constexpr(PHILOX_W1)


@triton.jit
def _philox_word(c0, c1, c2, k0, k1, word):
    """Word ``word`` (0..3, elementwise) of Philox4x32-10 on counter (c0, c1, c2, 0), key (k0, k1); uint32."""
    c3 = tl.zeros_like(c0)
    m0 = tl.full(c0.shape, _M0, tl.uint32)
    m1 = tl.full(c0.shape, _M1, tl.uint32)
    k0 = tl.full(c0.shape, 0, tl.uint32) + k0
    k1 = tl.full(c0.shape, 0, tl.uint32) + k1
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + tl.full(c0.shape, _W0, tl.uint32)
        k1 = k1 + tl.full(c0.shape, _W1, tl.uint32)
    return tl.where(word == 0, c0, tl.where(word == 1, c1, tl.where(word == 2, c2, c3)))


@triton.jit
def _basis_values(bits, KIND: tl.constexpr, lo_cut, hi_cut):
    """uint32 words → float32 basis values (SPEC §4.2). dense: (2·(x >> 9) + 1 − 2^23) · 2^−23, exact in fp32;
    ternary: −1 below T, +1 at or above 2^32 − T, else 0."""
    if KIND == 0:
        odd = (bits >> 9).to(tl.int32) * 2 + 1 - 8388608
        return odd.to(tl.float32) * 1.1920928955078125e-07
    hi = (bits >= hi_cut.to(tl.uint32)).to(tl.float32)
    lo = (bits < lo_cut.to(tl.uint32)).to(tl.float32)
    return hi - lo


@triton.jit
def _philox_block_kernel(out_ptr, rows, cols, row0, col0, seed_lo, seed_hi, lo_cut, hi_cut, MATRIX: tl.constexpr,
                         KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col = col0 + cc[None, :] + tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
    row = row0 + rr[:, None] + tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
    bits = _philox_word((col // 4).to(tl.uint32), row.to(tl.uint32), tl.full((BLOCK_R, BLOCK_C), MATRIX, tl.uint32),
                        seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), col % 4)
    mask = (rr[:, None] < rows) & (cc[None, :] < cols)
    tl.store(out_ptr + rr[:, None] * cols + cc[None, :], _basis_values(bits, KIND, lo_cut, hi_cut), mask=mask)


@triton.jit
def _mma(a, b, acc, EMULATE: tl.constexpr):
    """acc + a·b for bf16 tiles a, b: one tensor-core MMA on a GPU. Under the interpreter (``EMULATE``; its bf16
    ``tl.dot`` is broken, upstream issue 11584) the exact bf16 values are widened to float32 first, which is the
    same product: 8-bit × 8-bit significands multiply exactly in float32."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _split3(x):
    """float32 tile → bf16 limbs (hi, mid, lo) with hi + mid + lo == x exactly (``limbs.split3`` is its twin)."""
    hi = x.to(tl.bfloat16)
    r1 = x - hi.to(tl.float32)
    mid = r1.to(tl.bfloat16)
    lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _dot(u, s, acc, PRECISION: tl.constexpr, U_LIMBS: tl.constexpr, EMULATE: tl.constexpr):
    """acc + U·S for float32 tiles. ``split``: bf16 limb MMAs (see ``limbs``), smallest terms first: U exact in bf16
    (U_LIMBS 1) 3 MMAs, else the 6 pairs i + j ≤ 2. ``bf16``: one MMA of rounded operands. Otherwise ``tl.dot``'s
    own ``input_precision`` (ieee, tf32, tf32x3)."""
    if PRECISION == "split":
        s0, s1, s2 = _split3(s)
        if U_LIMBS == 1:
            u0 = u.to(tl.bfloat16)
            acc = _mma(u0, s2, acc, EMULATE)
            acc = _mma(u0, s1, acc, EMULATE)
            acc = _mma(u0, s0, acc, EMULATE)
        else:
            u0, u1, u2 = _split3(u)
            acc = _mma(u2, s0, acc, EMULATE)
            acc = _mma(u1, s1, acc, EMULATE)
            acc = _mma(u0, s2, acc, EMULATE)
            acc = _mma(u1, s0, acc, EMULATE)
            acc = _mma(u0, s1, acc, EMULATE)
            acc = _mma(u0, s0, acc, EMULATE)
    elif PRECISION == "bf16":
        acc = _mma(u.to(tl.bfloat16), s.to(tl.bfloat16), acc, EMULATE)
    else:
        acc = tl.dot(u, s, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _merge_kernel(
    w_ptr, stride_wm, stride_wd,          # W viewed as (M, D)
    ub_ptr, stride_um, stride_uk,         # U_B (M, K) float32, unused when GENERATE
    lam_ptr, gam_ptr, a_ptr, stride_a,    # λ (r, n) contiguous, γ (n, D) contiguous, A (r, ≥D) float32
    M, D, K, n, scaling,
    seed_lo, seed_hi, lo_cut, hi_cut,
    GENERATE: tl.constexpr, KIND: tl.constexpr, PRECISION: tl.constexpr, U_LIMBS: tl.constexpr,
    EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        # S tile: S[k, j] = λ[i, b] · A[i, j] · γ[b, j], k = i·n + b
        i = rk // n
        b = rk % n
        lam = tl.load(lam_ptr + rk, mask=k_ok, other=0.0)                 # λ flat index i·n + b == k
        a = tl.load(a_ptr + i[:, None] * stride_a + rd[None, :], mask=k_ok[:, None] & (rd[None, :] < D), other=0.0)
        g = tl.load(gam_ptr + b[:, None] * D + rd[None, :], mask=k_ok[:, None] & (rd[None, :] < D), other=0.0)
        s_tile = lam[:, None] * a * g                                      # (BLOCK_K, BLOCK_D)
        # U_B tile (BLOCK_M, BLOCK_K)
        um_mask = (rm[:, None] < M) & k_ok[None, :]
        if GENERATE:
            col = rk[None, :] + tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int32)
            row = rm[:, None] + tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int32)
            bits = _philox_word((col // 4).to(tl.uint32), row.to(tl.uint32),
                                tl.full((BLOCK_M, BLOCK_K), 1, tl.uint32), seed_lo.to(tl.uint32),
                                seed_hi.to(tl.uint32), col % 4)
            u = tl.where(um_mask, _basis_values(bits, KIND, lo_cut, hi_cut), 0.0)
        else:
            u = tl.load(ub_ptr + rm[:, None] * stride_um + rk[None, :] * stride_uk, mask=um_mask, other=0.0)
        acc = _dot(u, s_tile, acc, PRECISION, U_LIMBS, EMULATE)
    w_mask = (rm[:, None] < M) & (rd[None, :] < D)
    w_ptrs = w_ptr + rm[:, None] * stride_wm + rd[None, :] * stride_wd
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    out = w.to(tl.float32) + acc * scaling
    tl.store(w_ptrs, out.to(w_ptr.dtype.element_ty), mask=w_mask)


def _cuts(generator: GeneratorSpec) -> tuple[int, int]:
    lo_cut = generator.threshold or 0
    return lo_cut, (2**32 - lo_cut if lo_cut else 0)


def philox_block_triton(generator: GeneratorSpec, matrix_id: int, rows: slice, cols: slice,
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """The in-kernel generator's float32 block ``[rows, cols]`` of basis ``matrix_id``: the same Philox code path the
    merge kernel runs, exposed so tests can compare it bit for bit with ``randlora_io.basis.philox_block_numpy``."""
    out = torch.empty((rows.stop - rows.start, cols.stop - cols.start), dtype=torch.float32, device=device)
    seed_lo, seed_hi = split_seed(generator.seed)
    lo_cut, hi_cut = _cuts(generator)
    grid = (triton.cdiv(out.shape[0], 16), triton.cdiv(out.shape[1], 16))
    _philox_block_kernel[grid](out, out.shape[0], out.shape[1], rows.start, cols.start, seed_lo, seed_hi, lo_cut,
                               hi_cut, MATRIX=matrix_id, KIND=_KIND_CODE[generator.kind], BLOCK_R=16, BLOCK_C=16)
    return out


def _md_view(weight: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    """W (stored shape) as its (M, D) view; the kernel writes through it."""
    outin = weight.T if layer.fan_in_fan_out else weight
    return outin if layer.in_features == layer.min_dim else outin.T


PRECISIONS = ("split", "bf16", "ieee", "tf32", "tf32x3")
DEFAULT_PRECISION = "split"
TENSOR_CORE_PRECISIONS = ("split", "bf16", "tf32", "tf32x3")


def gpu_configs(capability: int) -> list[triton.Config]:
    """The autotune configs for a GPU of compute capability ``capability`` (80 = A100, 90 = H100/H200) with a
    tensor-core precision, for the layer shapes that matter (M, D from 2048 to 28672, K = r·n ≈ D). Each one is
    compiled for its target in CI (tests/test_kernel_compile.py: it compiles, uses mma/wgmma, does not spill, fits
    in shared memory); on sm_80 the 128-wide tiles of the 6-MMA ``split`` path spill, so Ampere gets 64-row tiles,
    and on sm_90 so do 128×256 and 256×128 ones."""
    cfg = triton.Config
    if capability >= 90:
        return [
            cfg({"BLOCK_M": 128, "BLOCK_D": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
            cfg({"BLOCK_M": 128, "BLOCK_D": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
            cfg({"BLOCK_M": 64, "BLOCK_D": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        ]
    return [
        cfg({"BLOCK_M": 64, "BLOCK_D": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        cfg({"BLOCK_M": 64, "BLOCK_D": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    ]


# ``ieee`` runs tl.dot as float32 FMAs on CUDA cores: register-hungry, so it gets a small tile of its own.
FMA_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_K": 16}, num_warps=4, num_stages=2)
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_D": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _all_configs() -> list[triton.Config]:
    if _interpreting():
        return [INTERPRETER_CONFIG]
    return gpu_configs(90) + gpu_configs(80) + [FMA_CONFIG]


def configs_for(capability: int, precision: str) -> list[triton.Config]:
    """The configs the autotuner tries on a GPU of ``capability`` for ``precision``."""
    if precision == "ieee":
        return [FMA_CONFIG]
    if precision == "tf32x3" and capability < 90:  # three tf32 MMAs spill on 64×128 tiles on sm_80
        return [triton.Config({"BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3)]
    return gpu_configs(capability)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the configs of this device's architecture and of the precision (autotune's ``early_config_prune``)."""
    if _interpreting():
        return configs
    major, minor = torch.cuda.get_device_capability(named_args["w_ptr"].device)
    wanted = configs_for(90 if major >= 9 else 80, kwargs["PRECISION"])
    return [c for c in configs if any(c.kwargs == w.kwargs and c.num_warps == w.num_warps and
                                      c.num_stages == w.num_stages for w in wanted)]


# Autotuning runs the kernel several times per config: W is saved before and restored after each trial
# (``restore_value``), so the merge that follows starts from the original weight.
_merge_kernel_tuned = triton.autotune(
    configs=_all_configs(),
    key=["M", "D", "K", "GENERATE", "KIND", "PRECISION", "U_LIMBS"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["w_ptr"],
)(_merge_kernel)


def _bf16_exact(B: torch.Tensor) -> bool:
    """Whether the whole shared-bases tensor B holds bf16 values only (then every layer's prefix slice does),
    cached on the tensor and invalidated by any in-place change of it (its version counter)."""
    from .limbs import is_bf16_exact

    cached = getattr(B, "_randlora_io_bf16_exact", None)
    if cached is not None and cached[0] == B._version:
        return cached[1]
    exact = is_bf16_exact(B.reshape(B.shape[0], -1))
    B._randlora_io_bf16_exact = (B._version, exact)
    return exact


def merge_layer_triton_(weight: torch.Tensor, layer: LayerSpec, lam: torch.Tensor, gam: torch.Tensor,
                        A: torch.Tensor, B: torch.Tensor | None, scaling: float,
                        generator: GeneratorSpec | None = None, *, precision: str = DEFAULT_PRECISION,
                        blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """W += scaling·ΔW in place, on W's device; returns ``weight``.

    weight: the stored weight (bf16, fp16 or fp32), shape ``layer.shape``. λ (r, n), γ (n, D), A (r, ≥D): float32.
    B: the shared (≥M, ≥K) float32 bases, or None with a ``philox`` ``generator`` to draw B inside the kernel.
    precision: ``split`` (default; bf16 tensor-core limbs, float32-class accuracy, see ``limbs``), ``bf16`` (one
    bf16 MMA, ≈ 2^-8 relative per product), ``ieee`` (float32 FMA, no tensor cores), ``tf32``, ``tf32x3``.
    blocks: (BLOCK_M, BLOCK_D, BLOCK_K) to force one tile shape; None autotunes over :func:`configs_for`.
    """
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{layer.key}: the kernel merges fp32/bf16/fp16 weights, not {weight.dtype}")
    if tuple(weight.shape) != layer.shape:
        raise ValueError(f"{layer.key}: weight {list(weight.shape)} but the adapter records {list(layer.shape)}")
    if precision not in PRECISIONS:
        raise ValueError(f"{layer.key}: unknown kernel precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    w_md = _md_view(weight, layer)
    M, D = layer.max_dim, layer.min_dim
    r, n = lam.shape
    K = r * n
    dev = weight.device
    lam = lam.to(dev, torch.float32).contiguous()
    gam = gam.to(dev, torch.float32).contiguous()
    A = A.to(dev, torch.float32)
    generate = B is None
    if generate:
        if generator is None or generator.name != "philox":
            raise ValueError("in-kernel generation needs the philox generator; pass B for peft bases")
        seed_lo, seed_hi = split_seed(generator.seed)
        lo_cut, hi_cut = _cuts(generator)
        ub = lam  # placeholder pointer, never read
        su = sk = 0
        kind = _KIND_CODE[generator.kind]
        u_limbs = 1 if kind == 1 else 3     # ternary values are exact in bf16; dense philox values have 24 bits
    else:
        ub = B[:M, :K].to(dev, torch.float32)
        su, sk = ub.stride()
        seed_lo = seed_hi = lo_cut = hi_cut = 0
        kind = 0
        u_limbs = 1 if precision == "split" and _bf16_exact(B) else 3  # 3 bf16 MMAs instead of 6 when exact
    args = (w_md, w_md.stride(0), w_md.stride(1), ub, su, sk, lam, gam, A, A.stride(0),
            M, D, K, n, float(scaling), seed_lo, seed_hi, lo_cut, hi_cut)
    consts = dict(GENERATE=generate, KIND=kind, PRECISION=precision, U_LIMBS=u_limbs, EMULATE=dev.type == "cpu")
    if blocks is None:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_D"]))
        _merge_kernel_tuned[grid](*args, **consts)
    else:
        bm, bd, bk = blocks
        _merge_kernel[(triton.cdiv(M, bm), triton.cdiv(D, bd))](*args, **consts, BLOCK_M=bm, BLOCK_D=bd, BLOCK_K=bk)
    return weight


def merge_layer_reference_(weight: torch.Tensor, layer: LayerSpec, lam: torch.Tensor, gam: torch.Tensor,
                           A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Torch oracle with the same contract: W ← round(W + scaling·ΔW) computed in fp32, in place."""
    delta = reference_delta(layer, lam.to(weight.device), gam.to(weight.device), A.to(weight.device),
                            B.to(weight.device), scaling)
    weight.copy_((weight.float() + delta).to(weight.dtype))
    return weight


__all__ = ["DEFAULT_PRECISION", "PRECISIONS", "TENSOR_CORE_PRECISIONS", "configs_for", "gpu_configs",
           "merge_layer_reference_", "merge_layer_triton_", "philox_block_triton"]
