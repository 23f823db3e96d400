"""One weight's merge: ``W + Σ αᵢ·ΔWᵢ`` in float32 in reused buffers, checked and rounded once.

``add_delta_`` adds one adapter's ΔW into a float32 weight (the torch GEMM against the prebuilt shared bases, the
Triton kernel on CUDA, or a dense delta); ``LayerMerger`` runs it for every adapter of a weight inside a
``Workspace`` and rounds the sum to the output dtype. ``merge.merge`` drives it shard by shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import NonFiniteError, UnsupportedPrecisionError
from ..checkpoint.lazy_tensors import peek
from ..sources.interface import DeltaSource
from ..sources.randlora_file import RandloraSource

PRECISIONS = ("auto", "fp32", "int8", "bf16")
_BF16_ROWS = 1024  # rows of ΔW per bf16 GEMM: bounds the ΔW buffer and oneDNN's per-shape scratch memory


def add_delta_(weight32: torch.Tensor, source: DeltaSource, key: str, alpha: float, kernel: str = "auto",
               workspace: Workspace | None = None, precision: str = "auto") -> None:
    """``weight32 += alpha · ΔW[key]`` in place (float32, stored orientation); ``workspace`` holds S between calls.

    RandLoRA sources take a fast path: on CUDA (``kernel`` auto or triton) the Triton kernel
    (``randlora_io.kernels.merge_triton``) adds the tile-wise product into W in place; otherwise one ``addmm_`` of
    the prebuilt shared bases B (M, r·n) with S = λ ⊗ A ⊗ γ (r·n, D), straight into the weight (or its transposed
    view). No ΔW is materialised. Their oracle is :func:`randlora_io.format.delta.reference_delta`.

    ``precision``:

    - ``"fp32"``: exactly the above (float32 ``addmm_``); the reference every other path is tested against.
    - ``"auto"`` (default): on the CPU, ternary bases (sparse / very_sparse kinds, ``B = c·b``) take the fastest path
      of float32 class (:mod:`randlora_io.merge.ternary`): the grouped sparse product for very sparse bases (density
      ≤ 1/28), the exact int8-limb GEMMs on CPUs with fast int8 (AMX or AVX-512 VNNI), else the float32 ``addmm_``;
      dense bases and CUDA as ``"fp32"``.
    - ``"int8"``: the int8-limb GEMMs (ternary bases only; CPU only): ΔW within
      ``|s·c|·nnz·2^e·0.51/254² + 5·2⁻²⁴·|ΔW|`` of the exact product (see ``merge.ternary``), any CPU.
    - ``"bf16"`` (opt-in, any device, torch path): B and S rounded to bf16, one bf16 GEMM with fp32
      accumulation, ΔW rounded to bf16 (as PEFT does for bf16 models), then added in float32. Error ≈ 2⁻⁸ of |ΔW|.
    """
    if isinstance(source, RandloraSource):
        adapter = source.adapter
        layer = adapter.layers[key]
        bases = adapter.layer_bases(weight32.device)
        scale = alpha * adapter.header.scaling
        if precision in ("fp32", "auto") and (kernel == "triton" or (kernel == "auto" and weight32.is_cuda)):
            from ..kernels.merge_triton import merge_layer_triton_

            merge_layer_triton_(weight32, layer, peek(adapter.lambdas, key), peek(adapter.gammas, key), bases.A,
                                bases.B, scale)
            return
        A, B = bases.for_layer(layer.min_dim, layer.max_dim, layer.num_bases)
        # one layer's scales at a time (a file's are read on demand, not held: lazy_tensors)
        lam, gam = peek(adapter.lambdas, key).to(weight32.device), peek(adapter.gammas, key).to(weight32.device)
        workspace = workspace or Workspace()
        stored_is_md = (layer.in_features == layer.min_dim) != layer.fan_in_fan_out
        target = weight32 if stored_is_md else weight32.T
        if precision == "bf16":
            _addmm_bf16_(target, B, _scaled(lam, A, gam, workspace), scale, workspace)
        elif precision == "fp32" or not _add_ternary_(target, bases.B, lam, A, gam, scale, workspace, precision,
                                                      source.path):
            target.addmm_(B, _scaled(lam, A, gam, workspace), alpha=scale)
    else:
        weight32.add_(source.delta(key, weight32.device), alpha=alpha)


def _scaled(lam: torch.Tensor, A: torch.Tensor, gam: torch.Tensor, workspace: Workspace) -> torch.Tensor:
    """S = λ ⊗ A ⊗ γ (r·n, D) float32 in the workspace (``delta.scaled_A``)."""
    from ..format.delta import scaled_A

    return scaled_A(lam, A, gam, out=workspace.take("S", (*lam.shape, A.shape[1]), torch.float32, A.device))


def _add_ternary_(target: torch.Tensor, B_full: torch.Tensor, lam: torch.Tensor, A: torch.Tensor,
                  gam: torch.Tensor, scale: float, workspace: Workspace, precision: str, source_path: object) -> bool:
    """The ``auto`` / ``int8`` choice for one layer (target (M, D) fp32; λ (r, n), A (r, D), γ (n, D); B_full the
    model-wide bases): adds ΔW and returns True when a ternary fast path ran; False leaves the float32 ``addmm_`` to
    the caller (dense bases under ``auto``, and non-finite scales, which the float path carries to the merge's
    finite check)."""
    from .ternary import add_ternary_int8_, add_ternary_sparse_, auto_path, ternary_basis

    if target.is_cuda:
        if precision == "int8":
            raise UnsupportedPrecisionError("--precision int8 is a CPU path; on CUDA the Triton kernel merges in "
                                            "float32: use --precision auto or fp32, or --device cpu")
        return False
    basis = ternary_basis(B_full)
    if basis is None:
        if precision == "int8":
            raise UnsupportedPrecisionError(f"{source_path}: --precision int8 needs ternary bases (a sparse or "
                                            "very_sparse adapter); these are dense: use --precision auto, fp32 or bf16")
        return False
    path = "int8" if precision == "int8" else auto_path(basis)
    if path == "sparse":
        return add_ternary_sparse_(target, basis, lam, A, gam, scale)
    if path == "fp32":
        return False
    S = _scaled(lam, A, gam, workspace)
    if not all_finite(S):
        return False
    add_ternary_int8_(target, basis, S, scale, workspace)
    return True


def _addmm_bf16_(target: torch.Tensor, B: torch.Tensor, S: torch.Tensor, scale: float, workspace: Workspace) -> None:
    """``target (M, D) fp32 += scale · bf16(bf16(B) @ bf16(S))``, in blocks of rows: one GEMM shape per layer
    and small bf16 copies of B and ΔW (bounded memory, including oneDNN's per-shape scratch)."""
    S16 = S.to(torch.bfloat16)
    for start in range(0, B.shape[0], _BF16_ROWS):
        rows = B[start: start + _BF16_ROWS]
        rows16 = workspace.take("B16", rows.shape, torch.bfloat16, B.device).copy_(rows)
        delta16 = workspace.take("delta16", (rows.shape[0], S.shape[1]), torch.bfloat16, B.device)
        target[start: start + _BF16_ROWS].add_(torch.mm(rows16, S16, out=delta16), alpha=scale)


class Workspace:
    """Buffers reused from one weight to the next, grown to the largest seen, so each layer's float32 copy, its
    scaled bases and its rounded result live in memory that is already mapped instead of fresh allocations faulted
    in per layer. A name taken with ``slots=2`` alternates between two buffers (results still being written)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._turn: dict[str, int] = {}

    def take(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device,
             slots: int = 1) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` on ``device``, valid until ``take(name)`` is called
        ``slots`` more times."""
        turn = self._turn[name] = (self._turn.get(name, -1) + 1) % slots
        slot = (name, turn, dtype, device)
        numel = math.prod(shape)
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(slot, None)
            buf = self._buffers[slot] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf. A sum reads the tensor once at memory speed and is non-finite whenever
    an element is; only then (or on overflow of the sum itself) is the elementwise check run."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


@dataclass
class LayerMerger:
    """How each targeted weight is merged (device, kernel, precision, checks, output dtype) and the buffers reused
    from one weight to the next."""

    device: torch.device
    kernel: str
    precision: str
    check_finite: bool
    out_dtype: torch.dtype | None
    unchanged: list[str] = field(default_factory=list)  # keys whose merged weight equals the input (a no-op)
    workspace: Workspace = field(default_factory=Workspace)

    def __call__(self, tensor: torch.Tensor, key: str, terms: list[tuple[DeltaSource, float]],
                 widen: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                 finish: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """W + Σ αᵢ·ΔWᵢ for one weight: float32 in the workspace, rounded once to ``out_dtype`` (default W's dtype).
        The result is a view of the workspace, valid until the call after next (``stream_rewrite``'s contract).
        A quantized weight (``merge/fp8.py``) brings ``widen(w32, tensor)`` (dequantize into the float32 buffer)
        and ``finish(w32) -> result`` (re-quantize instead of the rounding; called after the finite check)."""
        w32 = self.workspace.take("w32", tensor.shape, torch.float32, self.device)
        w32.copy_(tensor) if widen is None else widen(w32, tensor)
        from .terms import apply_term_  # here: LayerMerger.__call__ is this file's only DoRA / extras hook

        for source, alpha in terms:  # replace / DoRA-rescale / add ΔW (merge/terms.py); the add keeps its fast paths
            apply_term_(w32, source, key, alpha, lambda inner, inner_key: add_delta_(
                w32, inner, inner_key, alpha, self.kernel, self.workspace, self.precision))
        if self.check_finite and not all_finite(w32):
            raise NonFiniteError(f"merged weight {key!r} contains NaN or Inf (from {terms[0][0].path}); "
                                 "nothing was written")
        if finish is not None:
            return finish(w32)
        merged = self.workspace.take("out", tensor.shape, self.out_dtype or tensor.dtype, torch.device("cpu"), slots=2)
        merged.copy_(w32)
        if self.check_finite and merged.dtype == torch.float16 and not all_finite(merged):
            raise NonFiniteError(f"merged weight {key!r} overflows float16; merge to bfloat16 or float32 instead "
                                 "(--dtype); nothing was written")
        if torch.equal(merged, tensor if tensor.dtype == merged.dtype else tensor.to(merged.dtype)):
            self.unchanged.append(key)
        return merged
