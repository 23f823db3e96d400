"""Safetensors files written tensor by tensor with bounded memory: the engine under ``merge`` and dense output.

``stream_rewrite`` rewrites one file: only the tensors a caller may change are read into memory, one at a time, into
two alternating buffers; every other tensor is copied byte for byte (by the kernel, or through the writer's staging
buffer). ``stream_write`` writes a new file from tensors produced one at a time. In both, output bytes go straight
from the tensor's memory to a ``SequentialWriter`` (O_DIRECT where possible) on a background thread, so reading,
computing and writing overlap. Headers are computed before any data is written. Peak memory: about four copies of
the largest changed tensor (two inputs, two results in flight), independent of the file's size.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import NonFiniteError, SafetensorsFormatError
from .atomic import atomic_file
from .safetensors_io import DTYPE_SIZES, SafetensorsHeader
from .shard_writer import SequentialWriter, read_exact

TORCH_DTYPE_OF = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                  "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAME_OF_DTYPE = {v: k for k, v in TORCH_DTYPE_OF.items()}

Transform = Callable[[str, torch.Tensor], torch.Tensor]


def stream_rewrite(src: str | os.PathLike, header: SafetensorsHeader, dst: str | os.PathLike, transform: Transform,
                   out_dtype: torch.dtype | None = None, keys: Collection[str] | None = None,
                   progress: Callable[[int], None] | None = None, drop: Collection[str] = (),
                   late: Collection[str] = ()) -> None:
    """Write ``dst`` with the tensors of ``src`` (whose validated header is ``header``) in the same order.

    ``keys``: the tensors ``transform(key, tensor) -> tensor`` may change (same shape; ``None`` = all); the others
    are copied byte for byte. ``out_dtype`` casts floating tensors. ``dst`` should be a temp path: on error it is
    left half written for the caller to remove. ``progress(n)`` is called as each part of ``src`` (its header, then
    each tensor) has been handled, with that part's size in bytes: the calls add up to the size of ``src``.

    I/O overlaps compute: one background thread reads the next changed tensor ahead and writes results and copies
    behind, in file order, while ``transform`` runs. Contract for ``transform``: the tensor it receives lives in a
    buffer reused two calls later, and its result is written before the call after next returns, so it may return
    a view of a buffer it alternates between (see ``merge.layer.Workspace``).

    ``drop``: tensors left out of ``dst``. ``late``: tensors whose result depends on tensors after them (an FP8
    weight's scales, computed with the weight): their bytes are reserved in file order, and ``transform`` is called
    for them after every other tensor, its results written in place before ``dst`` is made durable; their dtype is
    never cast.
    """
    order = [k for k in sorted(header.tensors, key=lambda k: header.tensors[k].begin) if k not in drop]
    entries = _output_entries(src, header, order, out_dtype)
    raw = header_bytes(entries, {**header.metadata, "format": "pt"})
    changed = [k for k in order if k not in late and (keys is None or k in keys
                                                      or entries[k]["dtype"] != header.tensors[k].dtype)]
    scratch = [bytearray(), bytearray()]  # read buffers, alternating between consecutive changed tensors

    with open(src, "rb", buffering=0) as fin, SequentialWriter(dst) as out, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="randlora-io-io") as io:
        fd_in = fin.fileno()

        def read(j: int) -> torch.Tensor:
            key = changed[j]
            info = header.tensors[key]
            size = info.end - info.begin
            if len(scratch[j % 2]) < size:
                scratch[j % 2] = bytearray(size)
            view = memoryview(scratch[j % 2])[:size]
            read_exact(fd_in, view, header.data_offset + info.begin, f"{src}: truncated while reading {key!r}")
            dtype = TORCH_DTYPE_OF[info.dtype]
            return torch.frombuffer(view, dtype=dtype).reshape(info.shape) if size else torch.empty(info.shape, dtype=dtype)

        advance = progress or (lambda nbytes: None)
        pending: list[Future] = [io.submit(out.write, raw)]
        reads = {0: io.submit(read, 0)} if changed else {}
        try:
            advance(header.data_offset + sum(header.tensors[k].end - header.tensors[k].begin for k in drop))
            j = 0
            for key in order:
                info = header.tensors[key]
                if key in late:
                    pending.append(io.submit(out.write, bytes(info.end - info.begin)))
                    advance(info.end - info.begin)
                    continue
                if j >= len(changed) or changed[j] != key:
                    pending.append(io.submit(out.copy_from, fd_in, header.data_offset + info.begin,
                                             info.end - info.begin, f"{src}: truncated while reading {key!r}"))
                    advance(info.end - info.begin)
                    continue
                tensor = reads.pop(j).result()
                if j + 1 < len(changed):  # queued after the write that last used its buffer
                    reads[j + 1] = io.submit(read, j + 1)
                result = transform(key, tensor)
                if out_dtype is not None and result.is_floating_point() and result.dtype != out_dtype:
                    cast = result.to(out_dtype)
                    if _overflowed(result, cast):
                        raise NonFiniteError(
                            f"{src}: tensor {key!r} has values beyond {out_dtype} (max |x| "
                            f"{float(result.abs().max()):.4g}) that would become Inf; choose another --dtype "
                            "(bfloat16 or float32); nothing was written")
                    result = cast
                if list(result.shape) != entries[key]["shape"] or NAME_OF_DTYPE[result.dtype] != entries[key]["dtype"]:
                    raise SafetensorsFormatError(f"{dst}: internal error: {key!r} changed shape or dtype while merging")
                pending.append(io.submit(write_tensor, out, result))
                del tensor, result
                pending = _raise_finished(pending)
                advance(info.end - info.begin)
                j += 1
            for f in pending:
                f.result()
        except BaseException:
            for f in [*pending, *reads.values()]:
                f.cancel()
            raise
    if late:
        _write_late(src, header, dst, [k for k in order if k in late], entries, len(raw), transform)


def _write_late(src: str | os.PathLike, header: SafetensorsHeader, dst: str | os.PathLike, late: list[str],
                entries: dict[str, dict], data_offset: int, transform: Transform) -> None:
    """``transform(key, tensor)`` of each ``late`` tensor of ``src``, written over its reserved bytes in ``dst``
    (same dtype and shape), then ``dst`` fsynced."""
    with open(src, "rb", buffering=0) as fin, open(dst, "r+b") as fout:
        for key in late:
            info = header.tensors[key]
            buf = bytearray(info.end - info.begin)
            read_exact(fin.fileno(), memoryview(buf), header.data_offset + info.begin,
                       f"{src}: truncated while reading {key!r}")
            dtype = TORCH_DTYPE_OF[info.dtype]
            tensor = torch.frombuffer(buf, dtype=dtype).reshape(info.shape) if buf else torch.empty(info.shape,
                                                                                                   dtype=dtype)
            result = transform(key, tensor).detach().cpu().contiguous()
            if list(result.shape) != entries[key]["shape"] or NAME_OF_DTYPE[result.dtype] != entries[key]["dtype"]:
                raise SafetensorsFormatError(f"{dst}: internal error: {key!r} changed shape or dtype while merging")
            fout.seek(data_offset + entries[key]["data_offsets"][0])
            fout.write(memoryview(result.reshape(-1).view(torch.uint8).numpy()))
        fout.flush()
        os.fsync(fout.fileno())


def _overflowed(before: torch.Tensor, after: torch.Tensor) -> bool:
    """True when the cast ``before`` → ``after`` turned a finite value into ±Inf (a sum first: one pass when none)."""
    if bool(torch.isfinite(after.float().sum())):
        return False
    return bool((torch.isinf(after) & torch.isfinite(before)).any())


def _raise_finished(futures: list[Future]) -> list[Future]:
    """Re-raise the error of any finished I/O task now rather than at the end; return the unfinished ones."""
    unfinished = []
    for f in futures:
        if f.done():
            f.result()
        else:
            unfinished.append(f)
    return unfinished


def _output_entries(src: str | os.PathLike, header: SafetensorsHeader, order: list[str],
                    out_dtype: torch.dtype | None) -> dict[str, dict]:
    shapes, dtypes = {}, {}
    for key in order:
        info = header.tensors[key]
        if info.dtype not in TORCH_DTYPE_OF:
            raise SafetensorsFormatError(f"{src}: tensor {key!r} has dtype {info.dtype}, which cannot be streamed")
        dtype = TORCH_DTYPE_OF[info.dtype]
        dtypes[key] = out_dtype if out_dtype is not None and dtype.is_floating_point else dtype
        shapes[key] = info.shape
    return header_entries(order, shapes, dtypes)


def header_entries(order: list[str], shapes: Mapping[str, tuple[int, ...]],
                   dtypes: Mapping[str, torch.dtype]) -> dict[str, dict]:
    """Safetensors header entries for tensors laid out back to back in ``order``."""
    entries, offset = {}, 0
    for key in order:
        nbytes = DTYPE_SIZES[NAME_OF_DTYPE[dtypes[key]]] * math.prod(shapes[key])
        entries[key] = {"dtype": NAME_OF_DTYPE[dtypes[key]], "shape": list(shapes[key]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return entries


def header_bytes(entries: dict[str, dict], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length prefix and the JSON header (space-padded to a multiple of 8 bytes)."""
    raw = json.dumps({"__metadata__": dict(metadata), **entries}, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def stream_write(dst: str | os.PathLike, order: list[str], shapes: Mapping[str, tuple[int, ...]],
                 produce: Callable[[str], torch.Tensor], metadata: Mapping[str, str],
                 dtype: torch.dtype = torch.float32, overwrite: bool = True) -> None:
    """Write a new safetensors file at ``dst`` (atomically) holding ``produce(key)`` for each key of ``order``, cast
    to ``dtype``, one tensor at a time: at most two produced tensors are held while the background thread writes."""
    entries = header_entries(order, shapes, {k: dtype for k in order})
    with atomic_file(dst, overwrite=overwrite) as tmp, SequentialWriter(tmp) as out, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="randlora-io-io") as io:
        pending: list[Future] = [io.submit(out.write, header_bytes(entries, metadata))]
        try:
            for key in order:
                tensor = produce(key).detach().to("cpu", dtype)
                if list(tensor.shape) != entries[key]["shape"]:
                    raise SafetensorsFormatError(f"{dst}: internal error: {key!r} has shape {list(tensor.shape)}, "
                                                 f"expected {entries[key]['shape']}")
                pending.append(io.submit(write_tensor, out, tensor))
                del tensor
                if len(pending) > 2:
                    pending.pop(0).result()
            for f in pending:
                f.result()
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def write_tensor(out: SequentialWriter, tensor: torch.Tensor) -> None:
    """Append a CPU tensor's bytes (row-major, native little-endian) from its own memory."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel():
        out.write(memoryview(flat.view(torch.uint8).numpy()))
