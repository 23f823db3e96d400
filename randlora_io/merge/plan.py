"""Streaming merge of adapters into a (sharded) Hugging Face checkpoint, with bounded memory.

Plan first (which keys of which shard get which adapters; every check that can fail before writing), then
execute one shard at a time, one tensor at a time (``stream_rewrite``): untouched tensors are copied byte for byte;
a targeted weight is read, widened to float32 in a reused workspace, ΔW is added in place, the sum is checked to be
finite and rounded once to the output dtype; shards are written into a temp dir beside OUT, renamed last.

Numerics differ from PEFT's ``merge_and_unload`` in one documented way: PEFT rounds ΔW to the base dtype and
adds in that dtype (two roundings for bf16); we add in float32 and round once, so results agree within 1 ulp.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..format.adapter import RandloraAdapter
from ..checkpoint.atomic import atomic_directory, check_output_path
from ..checkpoint.base_model import base_info_from_checkpoint
from .distributed import Processes, share_out
from ..checkpoint.directory import INDEX_FILE, Checkpoint, absent_weight_hint, check_base_copies, open_checkpoint
from ..checkpoint.quantization import check_companions, check_output_dtype
from .fp8 import dropped_keys, shard_rewrite
from ..format.fingerprint import check_fingerprint
from ..errors import BaseModelMismatchError, OutputExistsError, SourceFormatError
from ..sources.keymap import for_checkpoint, open_loaded
from .compose import ComposeStats
from .composition import ComposedSource, Composition, composition_for
from .layer import PRECISIONS, LayerMerger
from ..progress import progress_bar
from ..sources.interface import DeltaSource
from ..sources.registry import detect, open_source
from ..checkpoint.stream import stream_rewrite

SUPPORTED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
OUT_DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeReport:
    """Merged layer count, shards written, and the keys whose weight did not change (a no-op merge)."""

    layers: int = 0
    shards: int = 0
    unchanged: list[str] = field(default_factory=list)
    bytes_out: int = 0
    processes: int = 1  # how many processes shared the shards (torchrun)
    rank: int = 0  # this process's rank among them
    composition: Composition | None = None  # the method and its checked options, when one composed the adapters
    compose_stats: ComposeStats | None = None  # what it kept and dropped, summed over every process


def _open_sources(ckpt: Checkpoint, adapters: list[str | os.PathLike | DeltaSource], peft_draw_dtype: str | None = None,
                  on_note: Callable[[str], None] | None = None) -> list[DeltaSource]:
    """Open each adapter (paths already resolved from ``hub:`` names) as PEFT loads it onto BASE (layer types from
    its config.json, shapes, dtypes: base_model.py)."""
    base_info = base_info_from_checkpoint(ckpt)
    seen: dict[str, int] = {}
    sources = []
    for i, item in enumerate(adapters):
        if isinstance(item, DeltaSource):
            sources.append(item)
            continue
        resolved = str(Path(item).resolve())
        if resolved in seen:
            raise SourceFormatError(f"{item}: adapter listed twice (positions {seen[resolved] + 1} and {i + 1}); "
                                    "give it once with --weight instead")
        seen[resolved] = i
        probe = detect(item)  # its header read once, whether open_loaded opens it once or twice
        sources.append(open_loaded(lambda base: open_source(probe, base=base, peft_draw_dtype=peft_draw_dtype,
                                                            on_note=on_note), base_info, ckpt.root))  # keymap.py
    return [for_checkpoint(source, ckpt.weight_map, ckpt.root, on_note) for source in sources]  # keymap.py


def check_weights(weights: list[float] | None, count: int) -> list[float]:
    """One finite weight per adapter (default 1.0), each within float32's range (the merge's arithmetic)."""
    weights = [1.0] * count if not weights else list(weights)
    if len(weights) != count:
        raise SourceFormatError(f"got {len(weights)} --weight values for {count} adapters")
    limit = torch.finfo(torch.float32).max
    for i, w in enumerate(weights):
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or abs(w) > limit:
            raise SourceFormatError(f"--weight {w!r} (adapter {i + 1}): a weight must be a finite number within "
                                    "float32's range, e.g. 1, 0.5 or -1")
    return [float(w) for w in weights]


def plan_merge(ckpt: Checkpoint, sources: list[DeltaSource]) -> dict[str, list[int]]:
    """``{weight key: [source indices]}``; raises before anything is written if any adapter does not fit BASE."""
    plan: dict[str, list[int]] = {}
    quant = ckpt.quantization  # GPTQ, AWQ, …: refused by name; fp8 weights checked in check_companions
    fp8 = {*quant.scales, *quant.unpaired} if quant else set()
    for i, source in enumerate(sources):
        for key in source.keys():
            if key not in ckpt.weight_map:
                raise BaseModelMismatchError(f"{source.path}: targets {key!r}, which the base at {ckpt.root} does "
                                             f"not have{absent_weight_hint(key, ckpt.weight_map)}")
            info = ckpt.info(key)
            if tuple(info.shape) != tuple(source.stored_shape(key)):
                raise BaseModelMismatchError(
                    f"{source.path}: {key!r} has shape {list(source.stored_shape(key))} but the base weight is "
                    f"{list(info.shape)} (transposed Conv1D or another model size?)"
                )
            if info.dtype not in SUPPORTED_DTYPES and key not in fp8:
                raise BaseModelMismatchError(f"{ckpt.root}: weight {key!r} is {info.dtype}; only F32, BF16 and F16 "
                                             "weights can be merged (dequantize first)")
            plan.setdefault(key, []).append(i)
        check_base_copies(ckpt, source.path, source.base_copies)
    check_companions(ckpt, plan, [str(s.path) for s in sources])
    replaced: dict[str, int] = {}
    for i, source in enumerate(sources):  # a tensor two adapters both replace (a head): no merge order is right
        for key in source.replacements:
            if key in replaced:
                raise SourceFormatError(f"{source.path}: replaces {key!r} with its trained copy, and so does "
                                        f"{sources[replaced[key]].path}; merge them one at a time into separate "
                                        "outputs, or drop that module from one adapter")
            replaced[key] = i
    return plan


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """``auto``: CUDA when available, else CPU. Under torchrun (``local_rank``) CUDA means that rank's own GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SourceFormatError("--device cuda: no CUDA device is available; use --device cpu")
    if device == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(device)


def _prepare(base, adapters, out, weights, device, dtype, overwrite, precision, check_base_fingerprint,
             peft_draw_dtype, on_note, procs: Processes, kernel: str = "auto", compose_options: dict | None = None,
             subtract: bool = False):
    """Every check a merge makes before writing: OUT against the inputs, arguments, BASE, each adapter against BASE
    (keys, shapes, dtypes, fingerprints), and the shared bases generated (and checksum-verified) once. With a
    composition method (``compose_options``: :func:`~randlora_io.merge.composition.composition_for`'s options),
    the inputs come back as one :class:`ComposedSource` with weight 1 that touches every planned key."""
    from ..hub import resolve_adapter_arg

    base_p, out_p = Path(base), Path(out)
    adapters = [a if isinstance(a, DeltaSource) else resolve_adapter_arg(a) for a in adapters]
    check_output_path(out_p, [base_p, *(a.path if isinstance(a, DeltaSource) else a for a in adapters)])
    if (out_p.exists() or out_p.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{out}: output exists; pass --overwrite to replace it")
    weights = check_weights(weights, len(adapters))
    composition = composition_for(weights=weights, paths=adapters, **(compose_options or {}))
    if composition is not None and subtract:
        raise SourceFormatError(f"unmerge subtracts Σ wᵢ·ΔWᵢ; a {composition.method} composition cannot be "
                                "undone from the adapters: unmerge with the default task arithmetic")
    if precision not in PRECISIONS:
        raise SourceFormatError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if dtype not in OUT_DTYPES:
        raise SourceFormatError(f"--dtype must be one of {', '.join(OUT_DTYPES)}")
    dev = resolve_device(device, procs.local_rank if procs.shared else None)
    if precision == "int8" and dev.type != "cpu":
        raise SourceFormatError("--precision int8 is a CPU path; on CUDA use --precision auto (the Triton kernel)")
    ckpt = open_checkpoint(base_p)
    ckpt.quantization  # noqa: B018 - a base of another quantization method is refused first, by name
    sources = _open_sources(ckpt, adapters, peft_draw_dtype, on_note)
    plan = plan_merge(ckpt, sources)
    check_output_dtype(ckpt, OUT_DTYPES[dtype])  # --dtype on an fp8 base: only what it dequantizes exactly
    if check_base_fingerprint and procs.rank == 0:  # reads every targeted weight: once per job, not per rank
        for source in sources:
            check_fingerprint(ckpt, source)
    for source in sources:  # generate (and checksum-verify) each adapter's shared bases once, before writing
        adapter = getattr(source, "adapter", None)  # a randlora source, or a key-mapped view of one
        if isinstance(adapter, RandloraAdapter):
            adapter.layer_bases(dev)  # the prefix the layers read; the full bases are not held while merging
    if composition is not None:
        sources = [ComposedSource(sources, composition, kernel=kernel, precision=precision, keys=list(plan))]
        plan, weights = {key: [0] for key in plan}, [1.0]
    return base_p, out_p, weights, dev, ckpt, sources, plan


def compose_options(method: str | None = None, density: float | Sequence[float] | None = None,
                    lambda_: float | None = None, normalize: bool | None = None,
                    seed: int | None = None, rescale: bool | None = None, always: bool = False) -> dict:
    """The composition options of :func:`merge` as one dict (checked by ``composition_for``)."""
    return {"method": method, "density": density, "lambda_": lambda_, "normalize": normalize, "seed": seed,
            "rescale": rescale, "always": always}


def open_composed(base: str | os.PathLike, adapters: list[str | os.PathLike | DeltaSource],
                  out: str | os.PathLike, *, weights: list[float] | None = None, overwrite: bool = False,
                  device: str = "cpu", kernel: str = "auto", precision: str = "auto",
                  check_base_fingerprint: bool = True, peft_draw_dtype: str | None = None,
                  on_note: Callable[[str], None] | None = None, **options) -> ComposedSource:
    """The composed update of ``adapters`` on ``base`` as one source (every check :func:`merge` makes, ``out``
    included, before anything is written); ``options``: :func:`compose_options`' (any method, task arithmetic too).
    One process only: its caller writes ``out`` (``randlora-io merge --to-delta``)."""
    procs = Processes()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise SourceFormatError("--to-delta writes one file from one process; run it without torchrun")
    sources = _prepare(base, adapters, out, weights, device, "keep", overwrite, precision, check_base_fingerprint,
                       peft_draw_dtype, on_note, procs, kernel, compose_options(**options, always=True))[5]
    return sources[0]


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
    precision: str = "auto",
    check_base_fingerprint: bool = True,
    peft_draw_dtype: str | None = None,
    on_note: Callable[[str], None] | None = None,
    method: str | None = None,
    density: float | Sequence[float] | None = None,
    lambda_: float | None = None,
    normalize: bool | None = None,
    seed: int | None = None,
    rescale: bool | None = None,
) -> MergeReport:
    """Merge ``adapters`` (each scaled by its weight, default 1.0) into the checkpoint ``base``, writing ``out``.

    ``kernel``: ``auto`` uses the Triton kernel for RandLoRA layers on CUDA and ``addmm_`` on CPU; ``triton`` or
    ``torch`` forces one (``triton`` on CPU needs ``TRITON_INTERPRET=1`` and is for testing).

    ``precision`` (see :func:`add_delta_`): ``auto`` (default: the fastest float32-class path, a sparse × dense
    product for very sparse bases, exact int8 limbs for ternary bases on AMX CPUs, else fp32), ``fp32`` (the float32
    GEMM every other path is tested against), ``int8`` (ternary bases, CPU) or ``bf16`` (opt-in, ΔW rounded to bf16).

    ``subtract`` removes the same adapters (unmerge). BASE is only read; OUT appears only if everything succeeded.
    OUT may not be, contain or lie inside BASE or an adapter. ``check_base_fingerprint``: an adapter that records the
    fingerprint of the base it was trained on (``base_model.fingerprint``) is refused on any other base unless False.

    ``method`` composes the adapters' task vectors τᵢ = ΔWᵢ per weight as mergekit 0.1.5 does (``task_arithmetic``,
    ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``): ``weights`` then weigh the
    sparsified τᵢ, ``density`` (one, or one per adapter, in (0, 1]) is the fraction each keeps, ``lambda_`` scales
    the composed delta, ``normalize`` divides by the kept weights (default per method: on for ties only) and
    ``seed`` picks DARE's masks (SPEC.md, "DARE keep masks": the same bytes on any machine and process count);
    ``rescale`` (default: on for DARE) keeps each sparsified τᵢ's L1 norm.
    An adapter may also be a fine-tuned full checkpoint of BASE's architecture (τ = W_ft − W_base). Without a
    method (or task_arithmetic with λ = 1, no normalisation) the merge is Σ wᵢ·ΔWᵢ as always. The report's
    ``composition`` / ``compose_stats`` say what was composed (fraction kept, sign conflicts).
    """
    procs = Processes.from_env()  # one process, or this rank of a torchrun job: shards are shared out by bytes
    try:
        base_p, out_p, weights, dev, ckpt, sources, plan = procs.run_all(lambda: _prepare(
            base, adapters, out, weights, device, dtype, overwrite, precision, check_base_fingerprint,
            peft_draw_dtype, on_note, procs, kernel, compose_options(method, density, lambda_, normalize, seed, rescale),
            subtract))  # every check, on every process, before anything is written
        sign = -1.0 if subtract else 1.0
        out_dtype = OUT_DTYPES[dtype]
        mine = share_out({s: ckpt.shard_path(s).stat().st_size for s in ckpt.shards}, procs.world)[procs.rank]
        report = MergeReport(layers=len(plan), shards=len(ckpt.shards), processes=procs.world, rank=procs.rank)
        merge_one = LayerMerger(dev, kernel, precision, check_finite, out_dtype, unchanged=report.unchanged)

        def write_shards(tmp: Path, bar) -> None:
            for shard in mine:
                def transform(key: str, tensor: torch.Tensor, **fp8_hooks) -> torch.Tensor:
                    if key not in plan:  # only cast (--dtype): stream_rewrite does it
                        return tensor
                    return merge_one(tensor, key, [(sources[i], sign * weights[i]) for i in plan[key]], **fp8_hooks)

                step = shard_rewrite(ckpt, shard, plan, transform, out_dtype, report.unchanged)  # merge/fp8.py
                stream_rewrite(ckpt.shard_path(shard), ckpt.shards[shard], tmp / shard, step.transform, out_dtype,
                               keys=step.keys, progress=bar.update, drop=step.drop, late=step.late)

        total = sum(ckpt.shard_path(s).stat().st_size for s in mine)
        bar = progress_bar(progress and procs.rank == 0, total=total, unit="B", unit_scale=True, desc="merge")
        error = None
        try:
            with bar, contextlib.ExitStack() as stack:
                # rank 0 owns OUT's temp dir and its final rename; the others write their shards into it
                enter = lambda: stack.enter_context(atomic_directory(out_p, overwrite=overwrite))  # noqa: E731
                tmp = procs.run_all(enter if procs.rank == 0 else lambda: None)
                tmp = Path(procs.broadcast(str(tmp) if tmp is not None else None))
                mid_error = None
                try:
                    if procs.rank == 0:
                        _copy_side_files(ckpt, tmp, out_dtype)
                    write_shards(tmp, bar)
                except Exception as exc:  # noqa: BLE001 - every process hears of it below
                    mid_error = exc
                procs.raise_if_any(mid_error)  # all shards written everywhere, or every process fails
                unchanged = procs.all_gather(report.unchanged)
                report.unchanged[:] = [k for part in unchanged for k in part]
                if isinstance(sources[0], ComposedSource):
                    report.composition, report.compose_stats = sources[0].composition, ComposeStats()
                    for part in procs.all_gather(sources[0].stats):
                        report.compose_stats.add(part)
                if procs.rank == 0:
                    _write_index(ckpt, tmp, out_dtype)
                    report.bytes_out = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        except Exception as exc:  # noqa: BLE001 - the final rename on rank 0 may still fail: all agree on it
            error = exc
        procs.raise_if_any(error)
        return report
    finally:
        procs.close()


def _write_index(ckpt: Checkpoint, tmp: Path, out_dtype: torch.dtype | None) -> None:
    """BASE's shard index for OUT (its total size updated when ``--dtype`` changed the shards' sizes)."""
    if ckpt.index is None:
        return
    index = dict(ckpt.index)
    if out_dtype is not None:
        index["metadata"] = {**index.get("metadata", {}),
                             "total_size": sum((tmp / s).stat().st_size for s in ckpt.shards)}
        dropped = dropped_keys(ckpt.quantization)  # an fp8 base's scales, absent from a plain output
        index["weight_map"] = {k: s for k, s in index["weight_map"].items() if k not in dropped}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _copy_side_files(ckpt: Checkpoint, dst: Path, out_dtype: torch.dtype | None) -> None:
    """Copy BASE's checkpoint files (config, generation config, tokenizer, …; ``Checkpoint.side_files``) into
    ``dst``, updating config.json's dtype. Unrelated files and folders beside BASE are never copied."""
    for item in ckpt.side_files():
        shutil.copy2(item, dst / item.name)
    config = dst / "config.json"
    if out_dtype is not None and config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:
            raise SourceFormatError(f"{ckpt.root / 'config.json'}: not valid JSON ({exc}); fix it or merge without "
                                    "--dtype (which rewrites its dtype)") from None
        if not isinstance(data, dict):
            raise SourceFormatError(f"{ckpt.root / 'config.json'}: must be a JSON object")
        name = str(out_dtype).removeprefix("torch.")
        if ckpt.quantization is not None:  # an fp8 base written as a plain checkpoint
            data.pop("quantization_config", None)
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = name
        config.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
