"""Streaming merge of adapters into a (sharded) Hugging Face checkpoint, with bounded memory.

Plan first (which keys of which shard get which adapters; every check that can fail before writing), then
execute one shard at a time, one tensor at a time (``stream_rewrite``): untouched tensors are copied byte for byte;
a targeted weight is read, widened to float32 in a reused workspace, ΔW is added in place, the sum is checked to be
finite and rounded once to the output dtype; shards are written into a temp dir beside OUT, renamed last.

Numerics differ from PEFT's ``merge_and_unload`` in one documented way: PEFT rounds ΔW to the base dtype and
adds in that dtype (two roundings for bf16); we add in float32 and round once, so results agree within 1 ulp.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import RandloraAdapter
from .checkpoint import INDEX_FILE, Checkpoint, open_checkpoint
from .errors import BaseModelMismatchError, NonFiniteError, OutputExistsError, SourceFormatError
from .progress import progress_bar
from .safetensors_io import atomic_directory
from .sources import DeltaSource, RandloraSource, open_source
from .stream import stream_rewrite

SUPPORTED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
OUT_DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeReport:
    """Merged layer count, shards written, and the keys whose weight did not change (a no-op merge)."""

    layers: int = 0
    shards: int = 0
    unchanged: list[str] = field(default_factory=list)
    bytes_out: int = 0


PRECISIONS = ("fp32", "bf16")
_BF16_ROWS = 1024  # rows of ΔW per bf16 GEMM: bounds the ΔW buffer and oneDNN's per-shape scratch memory


def add_delta_(weight32: torch.Tensor, source: DeltaSource, key: str, alpha: float, kernel: str = "auto",
               workspace: Workspace | None = None, precision: str = "fp32") -> None:
    """``weight32 += alpha · ΔW[key]`` in place (float32, stored orientation); ``workspace`` holds S between calls.

    RandLoRA sources take a fast path: on CUDA (``kernel`` auto or triton) the Triton kernel
    (``randlora_io.kernels.merge_triton``) adds the tile-wise product into W in place; otherwise one ``addmm_`` of
    the prebuilt shared bases B (M, r·n) with S = λ ⊗ A ⊗ γ (r·n, D), straight into the weight (or its transposed
    view). No ΔW is materialised. Their oracle is :func:`randlora_io.delta.reference_delta`.

    ``precision="bf16"`` (opt-in, any device, torch path): B and S rounded to bf16, one bf16 GEMM with fp32
    accumulation, ΔW rounded to bf16 (as PEFT does for bf16 models), then added in float32. Error ≈ 2⁻⁸ of |ΔW|.
    """
    if isinstance(source, RandloraSource):
        from .delta import scaled_A

        adapter = source.adapter
        layer = adapter.layers[key]
        bases = adapter.bases(weight32.device)
        scale = alpha * adapter.header.scaling
        if precision == "fp32" and (kernel == "triton" or (kernel == "auto" and weight32.is_cuda)):
            from .kernels.merge_triton import merge_layer_triton_

            merge_layer_triton_(weight32, layer, adapter.lambdas[key], adapter.gammas[key], bases.A, bases.B, scale)
            return
        A, B = bases.for_layer(layer.min_dim, layer.max_dim, layer.num_bases)
        lam, gam = adapter.lambdas[key].to(weight32.device), adapter.gammas[key].to(weight32.device)
        workspace = workspace or Workspace()
        S = scaled_A(lam, A, gam, out=workspace.take("S", (*lam.shape, A.shape[1]), torch.float32, A.device))
        stored_is_md = (layer.in_features == layer.min_dim) != layer.fan_in_fan_out
        target = weight32 if stored_is_md else weight32.T
        if precision == "fp32":
            target.addmm_(B, S, alpha=scale)
            return
        _addmm_bf16_(target, B, S, scale, workspace)
    else:
        weight32.add_(source.delta(key, weight32.device), alpha=alpha)


def _addmm_bf16_(target: torch.Tensor, B: torch.Tensor, S: torch.Tensor, scale: float, workspace: Workspace) -> None:
    """``target (M, D) fp32 += scale · bf16(bf16(B) @ bf16(S))``, in blocks of rows: one GEMM shape per layer
    and small bf16 copies of B and ΔW (bounded memory, including oneDNN's per-shape scratch)."""
    S16 = S.to(torch.bfloat16)
    for start in range(0, B.shape[0], _BF16_ROWS):
        rows = B[start: start + _BF16_ROWS]
        rows16 = workspace.take("B16", rows.shape, torch.bfloat16, B.device).copy_(rows)
        delta16 = workspace.take("delta16", (rows.shape[0], S.shape[1]), torch.bfloat16, B.device)
        target[start: start + _BF16_ROWS].add_(torch.mm(rows16, S16, out=delta16), alpha=scale)


def _open_sources(ckpt: Checkpoint, adapters: list[str | os.PathLike | DeltaSource]) -> list[DeltaSource]:
    from .hub import resolve_adapter_arg

    shapes = {k: ckpt.shape(k) for k in ckpt.weight_map}
    dtypes = [ckpt.info(k).dtype for k in ckpt.weight_map if ckpt.info(k).dtype in SUPPORTED_DTYPES]
    base_dtype = SUPPORTED_DTYPES[max(set(dtypes), key=dtypes.count)] if dtypes else None
    seen: dict[str, int] = {}
    sources = []
    for i, item in enumerate(adapters):
        if isinstance(item, DeltaSource):
            sources.append(item)
            continue
        item = resolve_adapter_arg(item)
        resolved = str(Path(item).resolve())
        if resolved in seen:
            raise SourceFormatError(f"{item}: adapter listed twice (positions {seen[resolved] + 1} and {i + 1}); "
                                    "give it once with --weight instead")
        seen[resolved] = i
        sources.append(open_source(item, base_shapes=shapes, base_dtype=base_dtype))
    return sources


def plan_merge(ckpt: Checkpoint, sources: list[DeltaSource]) -> dict[str, list[int]]:
    """``{weight key: [source indices]}``; raises before anything is written if any adapter does not fit BASE."""
    plan: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        for key in source.keys():
            if key not in ckpt.weight_map:
                raise BaseModelMismatchError(f"{source.path}: targets {key!r}, which the base at {ckpt.root} does "
                                             "not have (another architecture?)")
            info = ckpt.info(key)
            if tuple(info.shape) != tuple(source.stored_shape(key)):
                raise BaseModelMismatchError(
                    f"{source.path}: {key!r} has shape {list(source.stored_shape(key))} but the base weight is "
                    f"{list(info.shape)} (transposed Conv1D or another model size?)"
                )
            if info.dtype not in SUPPORTED_DTYPES:
                raise BaseModelMismatchError(f"{ckpt.root}: weight {key!r} is {info.dtype}; only F32, BF16 and F16 "
                                             "weights can be merged (dequantize first)")
            plan.setdefault(key, []).append(i)
    return plan


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SourceFormatError("--device cuda: no CUDA device is available; use --device cpu")
    return torch.device(device)


def merge(
    base: str | os.PathLike,
    adapters: list[str | os.PathLike | DeltaSource],
    out: str | os.PathLike,
    *,
    weights: list[float] | None = None,
    device: str = "auto",
    dtype: str = "keep",
    overwrite: bool = False,
    subtract: bool = False,
    check_finite: bool = True,
    progress: bool = False,
    kernel: str = "auto",
    precision: str = "fp32",
) -> MergeReport:
    """Merge ``adapters`` (each scaled by its weight, default 1.0) into the checkpoint ``base``, writing ``out``.

    ``kernel``: ``auto`` uses the Triton kernel for RandLoRA layers on CUDA and ``addmm_`` on CPU; ``triton`` or
    ``torch`` forces one (``triton`` on CPU needs ``TRITON_INTERPRET=1`` and is for testing).

    ``precision``: ``fp32`` (default; the spec's numerics) or ``bf16`` (opt-in fast CPU path, see :func:`add_delta_`).

    ``subtract`` removes the same adapters (unmerge). BASE is only read; OUT appears only if everything succeeded.
    """
    base_p, out_p = Path(base), Path(out)
    if out_p.resolve() == base_p.resolve() or (base_p.is_file() and out_p.resolve() == base_p.parent.resolve()):
        raise OutputExistsError(f"{out}: output equals the base model; choose another directory")
    if out_p.exists() and not overwrite:
        raise OutputExistsError(f"{out}: output exists; pass --overwrite to replace it")
    weights = list(weights) if weights else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise SourceFormatError(f"got {len(weights)} --weight values for {len(adapters)} adapters")
    if precision not in PRECISIONS:
        raise SourceFormatError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if dtype not in OUT_DTYPES:
        raise SourceFormatError(f"--dtype must be one of {', '.join(OUT_DTYPES)}")
    dev = resolve_device(device)
    ckpt = open_checkpoint(base_p)
    sources = _open_sources(ckpt, adapters)
    plan = plan_merge(ckpt, sources)
    for source in sources:  # generate (and checksum-verify) each adapter's shared bases once, before writing
        if isinstance(source, RandloraSource):
            source.adapter.bases(dev)
    sign = -1.0 if subtract else 1.0
    report = MergeReport(layers=len(plan), shards=len(ckpt.shards))
    out_dtype = OUT_DTYPES[dtype]
    merge_one = _LayerMerger(dev, kernel, precision, check_finite, out_dtype, report)
    bar = progress_bar(progress, total=ckpt.total_bytes(), unit="B", unit_scale=True, desc="merge")
    with bar, atomic_directory(out_p, overwrite=overwrite) as tmp:
        _copy_side_files(ckpt, tmp, out_dtype)
        for shard in ckpt.shards:
            def transform(key: str, tensor: torch.Tensor) -> torch.Tensor:
                if key not in plan:  # only cast (--dtype): stream_rewrite does it
                    return tensor
                return merge_one(tensor, key, [(sources[i], sign * weights[i]) for i in plan[key]])

            stream_rewrite(ckpt.shard_path(shard), ckpt.shards[shard], tmp / shard, transform, out_dtype, keys=plan,
                           progress=bar.update)
        if ckpt.index is not None:
            index = dict(ckpt.index)
            if out_dtype is not None:
                index["metadata"] = {**index.get("metadata", {}),
                                     "total_size": sum((tmp / s).stat().st_size for s in ckpt.shards)}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        report.bytes_out = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
    return report


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
class _LayerMerger:
    """How each targeted weight is merged (device, kernel, precision, checks, output dtype) and the buffers reused
    from one weight to the next."""

    device: torch.device
    kernel: str
    precision: str
    check_finite: bool
    out_dtype: torch.dtype | None
    report: MergeReport
    workspace: Workspace = field(default_factory=Workspace)

    def __call__(self, tensor: torch.Tensor, key: str, terms: list[tuple[DeltaSource, float]]) -> torch.Tensor:
        """W + Σ αᵢ·ΔWᵢ for one weight: float32 in the workspace, rounded once to ``out_dtype`` (default W's dtype).
        The result is a view of the workspace, valid until the call after next (``stream_rewrite``'s contract)."""
        w32 = self.workspace.take("w32", tensor.shape, torch.float32, self.device)
        w32.copy_(tensor)
        for source, alpha in terms:
            add_delta_(w32, source, key, alpha, self.kernel, self.workspace, self.precision)
        if self.check_finite and not all_finite(w32):
            raise NonFiniteError(f"merged weight {key!r} contains NaN or Inf (from {terms[0][0].path}); "
                                 "nothing was written")
        merged = self.workspace.take("out", tensor.shape, self.out_dtype or tensor.dtype, torch.device("cpu"), slots=2)
        merged.copy_(w32)
        if self.check_finite and merged.dtype == torch.float16 and not all_finite(merged):
            raise NonFiniteError(f"merged weight {key!r} overflows float16; merge to bfloat16 or float32 instead "
                                 "(--dtype); nothing was written")
        if torch.equal(merged, tensor if tensor.dtype == merged.dtype else tensor.to(merged.dtype)):
            self.report.unchanged.append(key)
        return merged


def _copy_side_files(ckpt: Checkpoint, dst: Path, out_dtype: torch.dtype | None) -> None:
    """Copy BASE's non-weight files (config, generation config, tokenizer, …), updating config.json's dtype."""
    skip = set(ckpt.shards) | {INDEX_FILE}
    for item in ckpt.root.iterdir():
        if item.name in skip or item.name.startswith("."):
            continue
        if item.is_file():
            shutil.copy2(item, dst / item.name)
        elif item.is_dir():
            shutil.copytree(item, dst / item.name)
    config = dst / "config.json"
    if out_dtype is not None and config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        name = str(out_dtype).removeprefix("torch.")
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = name
        config.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def merge_into_state_dict(
    state_dict: Mapping[str, torch.Tensor] | dict[str, torch.Tensor],
    adapter: RandloraAdapter | DeltaSource | str | os.PathLike,
    weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """In-memory merge for training code: returns a new dict with ``W + weight·ΔW`` (float32 add, one rounding)
    for every adapter key; other tensors are passed through. Raises if a key is missing or a shape differs."""
    if isinstance(adapter, RandloraAdapter):
        source: DeltaSource = RandloraSource(adapter)
    elif isinstance(adapter, DeltaSource):
        source = adapter
    else:
        source = open_source(adapter, base_shapes={k: tuple(v.shape) for k, v in state_dict.items()})
    out = dict(state_dict)
    for key in source.keys():
        if key not in out:
            raise BaseModelMismatchError(f"{source.path}: targets {key!r}, which the state dict does not have")
        tensor = out[key]
        if tuple(tensor.shape) != tuple(source.stored_shape(key)):
            raise BaseModelMismatchError(f"{source.path}: {key!r} has shape {list(source.stored_shape(key))}, "
                                         f"the state dict has {list(tensor.shape)}")
        w32 = tensor.detach().to(torch.float32, copy=True)
        add_delta_(w32, source, key, weight)
        out[key] = w32.to(tensor.dtype)
    return out
