"""The shard streaming engine: the O_DIRECT-or-buffered writer and the overlapped read / transform / write loop."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from randlora_io.errors import SafetensorsFormatError
from randlora_io.checkpoint.safetensors_io import read_header
from randlora_io.checkpoint.shard_writer import BLOCK, SequentialWriter
from randlora_io.checkpoint.stream import stream_rewrite

OPS = st.lists(st.tuples(st.sampled_from(["write", "copy"]), st.integers(0, 5 * BLOCK + 7)), max_size=12)


def _replay(path, source, ops, direct, chunk=2 * BLOCK):
    """Apply ``ops`` to a SequentialWriter at ``path``; return the bytes it should hold."""
    expected = bytearray()
    fd = os.open(source, os.O_RDONLY)
    try:
        with SequentialWriter(path, direct=direct, chunk=chunk) as out:
            for i, (op, size) in enumerate(ops):
                if op == "write":
                    data = bytes((i * 7 + j) % 251 for j in range(size))
                    out.write(data)
                else:
                    offset = (i * 977) % 4096
                    out.copy_from(fd, offset, size, "truncated")
                    data = source.read_bytes()[offset: offset + size]
                expected += data
    finally:
        os.close(fd)
    return bytes(expected)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.bin"
    path.write_bytes(os.urandom(4096 + 5 * BLOCK + 8))
    return path


@settings(max_examples=40, deadline=None)
@given(ops=OPS, direct=st.booleans())
def test_writer_holds_exactly_what_was_written(tmp_path_factory, ops, direct):
    tmp = tmp_path_factory.mktemp("w")
    source = tmp / "source.bin"
    source.write_bytes(os.urandom(4096 + 5 * BLOCK + 8))
    expected = _replay(tmp / "out.bin", source, ops, direct)
    assert (tmp / "out.bin").read_bytes() == expected


def test_direct_writer_is_used_where_the_file_system_allows(tmp_path, source):
    with SequentialWriter(tmp_path / "probe", direct=True) as out:
        direct = out.direct
    if not direct:
        pytest.skip("this file system refuses O_DIRECT: the buffered path is what runs here")
    ops = [("write", 3), ("copy", 2 * BLOCK + 5), ("write", 3 * BLOCK), ("copy", 17)]
    expected = _replay(tmp_path / "out.bin", source, ops, direct=True)
    assert (tmp_path / "out.bin").read_bytes() == expected


def test_writer_falls_back_when_an_aligned_write_is_refused(tmp_path, source, monkeypatch):
    real_write = os.write
    refused = []

    def write(fd, data):
        if not refused and len(data) % BLOCK == 0 and len(data) >= BLOCK:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    ops = [("write", BLOCK + 3), ("copy", 3 * BLOCK), ("write", 11), ("copy", BLOCK - 1)]
    expected = _replay(tmp_path / "out.bin", source, ops, direct=True)
    assert (tmp_path / "out.bin").read_bytes() == expected
    if refused:  # only when the first aligned write went through the direct path
        assert refused == [2 * BLOCK]


def _shard(tmp_path):
    tensors = {
        "a.weight": torch.randn(33, 17),
        "b.weight": torch.randn(5, 7).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(11, dtype=torch.int64),
        "c.weight": torch.randn(300, 129).to(torch.float16),
        "d.weight": torch.randn(64, 64),
    }
    path = tmp_path / "in.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "kept"})
    return path, tensors


@pytest.mark.parametrize("direct", ["1", "0"])
def test_stream_rewrite_transforms_only_the_given_keys(tmp_path, monkeypatch, direct):
    monkeypatch.setenv("RANDLORA_IO_DIRECT", direct)
    path, tensors = _shard(tmp_path)
    before = path.read_bytes()
    buffers = {}
    calls = []

    def transform(key, tensor):
        # results live in two alternating buffers per dtype, as stream_rewrite's contract allows
        slot = (tensor.dtype, len(calls) % 2)
        calls.append(key)
        buf = buffers.setdefault(slot, torch.empty(1 << 16, dtype=tensor.dtype))
        out = buf[: tensor.numel()].view(tensor.shape)
        torch.mul(tensor, 2, out=out)
        return out

    keys = {"a.weight", "c.weight", "d.weight", "empty"}
    progress = []
    stream_rewrite(path, read_header(path), tmp_path / "out.safetensors", transform, keys=keys,
                   progress=progress.append)
    assert path.read_bytes() == before
    assert sum(progress) == len(before) and len(progress) == 1 + len(tensors)  # header, then tensor by tensor
    got = load_file(str(tmp_path / "out.safetensors"))
    assert list(got) == list(load_file(str(path)))
    for key, tensor in tensors.items():
        want = tensor * 2 if key in keys else tensor
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], want), key
    assert read_header(tmp_path / "out.safetensors").metadata == {"format": "pt", "note": "kept"}
    assert sorted(calls) == sorted(keys)


def test_stream_rewrite_casts_and_reports_truncation(tmp_path):
    path, tensors = _shard(tmp_path)
    header = read_header(path)
    stream_rewrite(path, header, tmp_path / "f32.safetensors", lambda k, t: t, out_dtype=torch.float32, keys=set())
    got = load_file(str(tmp_path / "f32.safetensors"))
    assert got["b.weight"].dtype == torch.float32 and torch.equal(got["b.weight"], tensors["b.weight"].float())
    assert got["ids"].dtype == torch.int64
    os.truncate(path, path.stat().st_size - 100)  # shrinks after the header was validated
    for keys in (set(), None):
        with pytest.raises(SafetensorsFormatError, match="truncated while reading"):
            stream_rewrite(path, header, tmp_path / "t.safetensors", lambda k, t: t, keys=keys)


def test_stream_rewrite_stops_on_a_transform_error(tmp_path):
    path, _ = _shard(tmp_path)

    def transform(key, tensor):
        if key == "c.weight":
            raise ValueError("boom")
        return tensor

    with pytest.raises(ValueError, match="boom"):
        stream_rewrite(path, read_header(path), tmp_path / "out.safetensors", transform)
