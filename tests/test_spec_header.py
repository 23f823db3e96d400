"""SPEC.md 1.1 header rules that are not whole-file vectors: strict JSON limits, the container's header-length
limit, the version a writer writes, and messages that say what is wrong."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import save_file
from test_format import make_adapter

from randlora_io.format.adapter import read_adapter, write_adapter
from randlora_io.errors import BasisMismatchError, HeaderError
from randlora_io.format.spec import FORMAT_VERSION, LayerSpec, parse_header


def _with_header_text(tmp_path, text: str):
    adapter = make_adapter()
    tensors = {f"{k}.lambda": v for k, v in adapter.lambdas.items()} | {f"{k}.gamma": v for k, v in adapter.gammas.items()}
    path = tmp_path / "odd.safetensors"
    save_file(tensors, str(path), metadata={"randlora": text})
    return adapter, path


@pytest.mark.parametrize("name,make_text,fragment", [
    ("deep nesting", lambda h: json.dumps(h)[:-1] + ', "x_deep": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested"),
    ("5000-digit integer", lambda h: json.dumps(h)[:-1] + ', "x_big": ' + "9" * 5000 + "}", "json"),
    ("Infinity in an unknown key", lambda h: json.dumps(h)[:-1] + ', "x_inf": Infinity}', "infinity"),
])
def test_hostile_header_json_gives_one_line(tmp_path, name, make_text, fragment):
    adapter, path = _with_header_text(tmp_path, "{}")
    _, path = _with_header_text(tmp_path, make_text(adapter.header.to_json()))
    with pytest.raises(HeaderError, match="odd.safetensors"):
        read_adapter(path)
    assert_one_line_error(run_cli("validate", path, check=False), "odd.safetensors", fragment)


def test_header_length_limit_is_safetensors_own(tmp_path):
    """SPEC §1: 100,000,000 bytes, the limit of the safetensors library (one more and safe_open refuses)."""
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    assert_one_line_error(run_cli("validate", path, check=False), "long.safetensors", "100000000")


def test_new_files_are_1_1_and_rewrites_keep_the_label(tmp_path):
    assert FORMAT_VERSION == "1.1"
    adapter = make_adapter()
    assert adapter.header.to_json()["format_version"] == "1.1"
    header = adapter.header.to_json() | {"format_version": "1.0"}
    assert parse_header(json.dumps(header)).format_version == "1.0"


def test_philox_checksum_mismatch_does_not_blame_the_rng(tmp_path):
    adapter = make_adapter()
    adapter.header.bases_sha256 = "f" * 64
    write_adapter(adapter, tmp_path / "a.safetensors")
    with pytest.raises(BasisMismatchError) as info:
        read_adapter(tmp_path / "a.safetensors")
    message = str(info.value)
    assert "checksum" in message and "philox is exact" in message and "random numbers" not in message


def test_layer_spec_stays_hashable_with_extra_keys():
    layer = LayerSpec(key="w", shape=(4, 6), fan_in_fan_out=False, num_bases=2, extra={"x": [1]})
    assert hash(layer) == hash(LayerSpec(key="w", shape=(4, 6), fan_in_fan_out=False, num_bases=2))
    assert layer.to_json()["x"] == [1]


def test_verify_on_read_can_be_deferred(tmp_path):
    """read_adapter(verify_bases=False) for tools that only display a file; bases() still verifies before use."""
    adapter = make_adapter()
    adapter.header.bases_sha256 = "0" * 64
    write_adapter(adapter, tmp_path / "a.safetensors")
    lazy = read_adapter(tmp_path / "a.safetensors", verify_bases=False)
    with pytest.raises(BasisMismatchError):
        lazy.delta(next(iter(lazy.layers)))
    assert torch.equal(lazy.lambdas[next(iter(lazy.layers))], adapter.lambdas[next(iter(adapter.layers))])


def test_unknown_fingerprint_algorithms_are_ignored():
    """SPEC §7: only ``sha256-weights:`` is defined; a tool ignores other prefixes instead of refusing the file."""
    from randlora_io.format.fingerprint import recorded_fingerprint

    assert recorded_fingerprint({"fingerprint": "md5:0123"}) is None
    assert recorded_fingerprint({"fingerprint": None}) is None
    assert recorded_fingerprint({"fingerprint": "sha256-weights:ab"}) == "sha256-weights:ab"
    header = make_adapter(base_model={"id": None, "revision": None, "fingerprint": "blake3:zz"}).header.to_json()
    assert parse_header(json.dumps(header)).base_model["fingerprint"] == "blake3:zz"


def test_cast_dtype_rule_for_mixed_dtype_bases():
    """SPEC §4.3: one half dtype among float32 layers is a cast to it; bfloat16 with float16 is refused (or stored)."""
    from randlora_io.checkpoint.base_model import BaseModelInfo, half_cast_dtype
    from randlora_io.errors import RandloraError

    def info(*dtypes):
        return BaseModelInfo(shapes={f"l{i}.weight": (4, 4) for i in range(len(dtypes))},
                             dtypes={f"l{i}.weight": d for i, d in enumerate(dtypes)}, root="base")

    keys = ["l0.weight", "l1.weight", "l2.weight"]
    assert half_cast_dtype(keys, info(torch.float32, torch.float32, torch.float32), "src") is None
    assert half_cast_dtype(keys, info(torch.float32, torch.bfloat16, torch.float32), "src") == "bfloat16"
    assert half_cast_dtype(keys, info(torch.float16, torch.float32, torch.float16), "src") == "float16"
    with pytest.raises(RandloraError, match="src"):
        half_cast_dtype(keys, info(torch.bfloat16, torch.float32, torch.float16), "src")
