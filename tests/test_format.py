"""The randlora file: round trips, size, and refusal of bad files with one clear line."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from randlora_io.format.adapter import build_adapter, read_adapter, write_adapter
from randlora_io.errors import HeaderError, RandloraError
from randlora_io.format.spec import METADATA_KEY, SPARSE_THRESHOLD, GeneratorSpec, num_bases


def make_adapter(seed=0, r=4, shapes=None, kind="dense", generator="philox", alpha=8.0, dtype=torch.float32,
                 base_model=None):
    shapes = shapes or {"model.layers.0.q.weight": ((24, 16), False), "model.layers.0.up.weight": ((40, 16), False),
                        "model.layers.0.down.weight": ((16, 40), False)}
    if generator == "philox":
        gen = GeneratorSpec(name="philox", kind=kind, seed=seed, threshold=None if kind == "dense" else SPARSE_THRESHOLD)
    else:
        gen = GeneratorSpec(name="peft", kind=kind, seed=seed, draw_dtype="bfloat16" if kind == "dense" else "float32")
    g = torch.Generator().manual_seed(seed)
    lambdas, gammas = {}, {}
    for key, (shape, _) in shapes.items():
        n = num_bases(min(shape), r)
        lambdas[key] = torch.randn(r, n, generator=g).to(dtype)
        gammas[key] = torch.randn(n, min(shape), generator=g).to(dtype)
    return build_adapter(generator=gen, rank=r, alpha=alpha, layers=shapes, lambdas=lambdas, gammas=gammas,
                         base_model=base_model)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**64 - 1), r=st.integers(1, 16), kind=st.sampled_from(["dense", "sparse", "very_sparse"]),
       generator=st.sampled_from(["philox", "peft"]), alpha=st.floats(0.5, 64),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), fan=st.booleans())
def test_write_read_round_trips_every_field_bit_exactly(tmp_path_factory, seed, r, kind, generator, alpha, dtype, fan):
    shapes = {"a.weight": ((16, 24), fan), "b.weight": ((24, 16), fan)}
    adapter = make_adapter(seed, r, shapes, kind, generator, alpha, dtype, base_model={"id": "tiny", "revision": "x"})
    path = tmp_path_factory.mktemp("rt") / "a.safetensors"
    write_adapter(adapter, path)
    back = read_adapter(path)
    assert back.header.to_json() == adapter.header.to_json()
    for key in shapes:
        assert back.lambdas[key].dtype == dtype
        assert torch.equal(back.lambdas[key].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           adapter.lambdas[key].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        assert torch.equal(back.gammas[key], adapter.gammas[key])
    back.bases(verify=True)  # checksum in the header matches the regenerated bases


def test_unknown_optional_keys_survive_a_rewrite(tmp_path):
    adapter = make_adapter()
    adapter.header.extra["x_note"] = {"by": "someone"}
    write_adapter(adapter, tmp_path / "a.safetensors")
    back = read_adapter(tmp_path / "a.safetensors")
    assert back.header.extra == {"x_note": {"by": "someone"}}


def test_file_is_at_most_4P_plus_8KiB(tmp_path):
    adapter = make_adapter(r=8)
    path = tmp_path / "a.safetensors"
    write_adapter(adapter, path)
    P = adapter.trainable_parameters()
    assert path.stat().st_size <= 4 * P + 8192, (path.stat().st_size, P)


def test_checksum_mismatch_is_refused(tmp_path):
    adapter = make_adapter()
    adapter.header.bases_sha256 = "0" * 64
    write_adapter(adapter, tmp_path / "a.safetensors")
    with pytest.raises(RandloraError, match="checksum"):
        read_adapter(tmp_path / "a.safetensors").bases()
    assert_one_line_error(run_cli("validate", tmp_path / "a.safetensors", check=False), "checksum")


def _rewrite_header(src, dst, mutate):
    adapter = read_adapter(src)
    header = adapter.header.to_json()
    mutate(header)
    tensors = {f"{k}.lambda": v for k, v in adapter.lambdas.items()} | {f"{k}.gamma": v for k, v in adapter.gammas.items()}
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(header)})


BAD_HEADERS = [
    ("missing rank", lambda h: h.pop("rank"), "rank"),
    ("mistyped rank", lambda h: h.update(rank="4"), "rank"),
    ("negative rank", lambda h: h.update(rank=-1), "rank"),
    ("rank above min_dim", lambda h: h.update(rank=10_000), "rank"),
    ("unknown major version", lambda h: h.update(format_version="2.0"), "version"),
    ("unknown generator", lambda h: h["generator"].update(name="mt19937"), "generator"),
    ("missing generator parameters", lambda h: h["generator"].pop("kind"), "kind"),
    ("wrong N", lambda h: next(iter(h["layers"].values())).update(num_bases=99), "num_bases"),
    ("missing layers", lambda h: h.pop("layers"), "layers"),
]


@pytest.mark.parametrize("name,mutate,fragment", BAD_HEADERS, ids=[b[0] for b in BAD_HEADERS])
def test_bad_headers_give_one_line(tmp_path, name, mutate, fragment):
    good = tmp_path / "good.safetensors"
    write_adapter(make_adapter(), good)
    bad = tmp_path / "bad.safetensors"
    _rewrite_header(good, bad, mutate)
    with pytest.raises(HeaderError):
        read_adapter(bad)
    for command in ("validate", "inspect"):
        assert_one_line_error(run_cli(command, bad, check=False), "bad.safetensors", fragment)


def test_tensor_shape_mismatch_and_nan(tmp_path):
    good = tmp_path / "good.safetensors"
    adapter = make_adapter()
    write_adapter(adapter, good)
    header = adapter.header.dumps()
    key = next(iter(adapter.layers))
    tensors = {f"{k}.lambda": v for k, v in adapter.lambdas.items()} | {f"{k}.gamma": v for k, v in adapter.gammas.items()}
    shape_bad = dict(tensors, **{f"{key}.gamma": torch.zeros(3, 3)})
    save_file(shape_bad, str(tmp_path / "shape.safetensors"), metadata={METADATA_KEY: header})
    assert_one_line_error(run_cli("validate", tmp_path / "shape.safetensors", check=False), "shape")
    nan_bad = dict(tensors, **{f"{key}.lambda": tensors[f"{key}.lambda"] * float("nan")})
    save_file(nan_bad, str(tmp_path / "nan.safetensors"), metadata={METADATA_KEY: header})
    assert_one_line_error(run_cli("validate", tmp_path / "nan.safetensors", check=False), "nan")


def _raw_file(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


HOSTILE = [
    ("truncated prefix", b"\x01\x02\x03", "truncated"),
    ("2^62 header length", _raw_file(b"{}", length=2**62), "header length"),
    ("header longer than file", _raw_file(b'{"a":1}', length=500), "truncated"),
    ("not json", _raw_file(b"{nope"), "json"),
    ("duplicate keys", _raw_file(b'{"__metadata__":{"a":"1"},"__metadata__":{"a":"2"}}'), "duplicate"),
    ("non-string metadata", _raw_file(b'{"__metadata__":{"a":1}}'), "metadata"),
    ("overlapping offsets", _raw_file(b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                      b'"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', b"\0" * 12), "overlap"),
    ("gap", _raw_file(b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8), "gap"),
    ("trailing bytes", _raw_file(b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 9), "trailing"),
    ("truncated data", _raw_file(b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\0" * 5), "truncated"),
    ("bad dtype", _raw_file(b'{"x":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4), "dtype"),
    ("not utf-8", _raw_file(b'{"\xff":1}'), "utf-8"),
    ("extra tensor field", _raw_file(b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"y":1}}', b"\0" * 4),
     "exactly"),
    ("byte length disagrees", _raw_file(b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\0" * 4),
     "expected 8"),
]


@pytest.mark.parametrize("name,blob,fragment", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_malformed_safetensors_give_one_line(tmp_path, name, blob, fragment):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(blob)
    before = path.read_bytes()
    for command in ("validate", "inspect"):
        assert_one_line_error(run_cli(command, path, check=False), "evil.safetensors", fragment)
    assert path.read_bytes() == before


def test_truncated_real_adapter(tmp_path):
    path = tmp_path / "a.safetensors"
    write_adapter(make_adapter(), path)
    path.write_bytes(path.read_bytes()[:-10])
    assert_one_line_error(run_cli("validate", path, check=False), "truncated")


def test_inspect_table_and_json(tmp_path):
    path = tmp_path / "a.safetensors"
    write_adapter(make_adapter(seed=77, r=4), path)
    table = run_cli("inspect", path).output
    assert "philox" in table and "77" in table and "model.layers.0.up.weight" in table and "40x16" in table
    doc = json.loads(run_cli("inspect", path, "--json").output)
    assert doc["seed"] == 77 and doc["rank"] == 4 and len(doc["layers"]) == 3
    assert doc["layers"][1]["N"] == 4 and doc["layers"][1]["params"] == 4 * 4 + 4 * 16
    assert run_cli("validate", path).exit_code == 0


def test_cli_as_a_subprocess_prints_no_traceback(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\0\0")
    proc = subprocess.run([sys.executable, "-m", "randlora_io", "validate", str(bad)], capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    usage = subprocess.run([sys.executable, "-m", "randlora_io", "convert"], capture_output=True, text=True)
    assert usage.returncode == 2
