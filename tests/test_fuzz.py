"""Fuzzing the readers (randlora file, dense file, PEFT dir, sharded index) through the CLI: every mutated input
either works or gives exit 1 with one line naming the file — never a traceback or an "internal error", never a
modified input, never memory out of proportion to the file.

CI runs a small, derandomized budget. A longer run: ``RANDLORA_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q
tests/test_fuzz.py`` (random, not derandomized, when the variable is set).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import peft_lora, tiny_llama

EXAMPLES = int(os.environ.get("RANDLORA_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="RANDLORA_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck))
RSS_BOUND_MB = 1024  # peak RSS growth allowed over the whole fuzz run: the seed files are a few hundred KB


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Valid inputs to mutate: a randlora file, a dense file, a PEFT LoRA dir, a sharded checkpoint."""
    root = tmp_path_factory.mktemp("seeds")
    tiny_llama().save_pretrained(root / "base")
    tiny_llama().save_pretrained(root / "sharded", max_shard_size="100KB")
    peft_lora(tiny_llama(), r=2, targets=["q_proj"]).save_pretrained(root / "lora")
    run_cli("convert", root / "lora", root / "a.safetensors", "--to", "randlora", "--rank", "4")
    run_cli("convert", root / "lora", root / "d.safetensors", "--to", "dense")
    return root


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module", autouse=True)
def rss_bound():
    start = _max_rss_mb()
    yield
    assert _max_rss_mb() - start < RSS_BOUND_MB, f"peak RSS grew by {_max_rss_mb() - start:.0f} MB while fuzzing"


def _check(result, *names: str) -> None:
    """The contract on one mutated input: success, or exit 1 with one line that names the file."""
    out = result.output + (result.stderr or "")
    assert "Traceback" not in out and "internal error" not in out, out
    if result.exit_code == 0:
        return
    assert result.exit_code == 1, (result.exit_code, out)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert any(name in err for name in names), (names, err)


def _mutate(data: bytes, draw) -> bytes:
    """Flip, overwrite, insert or cut bytes; biased towards the header, where the parsing happens."""
    data = bytearray(data)
    header_end = min(len(data), 8 + int.from_bytes(data[:8], "little")) if len(data) >= 8 else len(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "cut", "length"]))
        limit = max(1, min(header_end, len(data)) if draw(st.booleans()) else len(data))
        pos = min(draw(st.integers(0, limit - 1)), max(len(data) - 1, 0))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from(list(b'{}[]",:0129-.eE ntfu\\') + [0, 255]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "cut":
            del data[pos: pos + draw(st.integers(1, 64))]
        elif op == "length" and len(data) >= 8:
            data[:8] = draw(st.sampled_from([0, 1, 7, 2**32, 2**63, len(data), header_end + 8])).to_bytes(8, "little")
    return bytes(data)


@FUZZ
@given(data=st.data(), which=st.sampled_from(["a.safetensors", "d.safetensors"]),
       command=st.sampled_from(["inspect", "validate"]))
def test_fuzz_adapter_files(seeds, tmp_path_factory, data, which, command):
    path = tmp_path_factory.mktemp("f") / which
    path.write_bytes(_mutate((seeds / which).read_bytes(), data.draw))
    before = _digest(path)
    _check(run_cli(command, path, check=False), str(path), path.name)
    assert _digest(path) == before


_JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                            | st.text(max_size=12), lambda c: st.lists(c, max_size=3)
                            | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=6)


def _json_paths(obj, prefix=()):
    """Every (path, value) inside a parsed JSON document, objects and lists included."""
    yield prefix, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield from _json_paths(value, prefix + (key,))


@FUZZ
@given(data=st.data())
def test_fuzz_randlora_header_values(seeds, tmp_path_factory, data):
    """The randlora header (a JSON string inside the safetensors metadata) with one value replaced or dropped at any
    depth: validate and convert refuse in one line or work; the tensors themselves are left as they are."""
    from randlora_io.format.adapter import METADATA_KEY
    from randlora_io.checkpoint.safetensors_io import load_tensors, read_header
    from safetensors.torch import save_file

    src = seeds / "a.safetensors"
    header = read_header(src)
    doc = json.loads(header.metadata[METADATA_KEY])
    paths = [p for p, _ in _json_paths(doc) if p]
    where = data.draw(st.sampled_from(paths))
    parent = doc
    for key in where[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = data.draw(_JSON_VALUES)
    path = tmp_path_factory.mktemp("h") / "a.safetensors"
    save_file(load_tensors(src), str(path), metadata={**header.metadata, METADATA_KEY: json.dumps(doc)})
    before = _digest(path)
    for args in (("validate", path), ("convert", path, path.parent / "d.safetensors", "--to", "dense")):
        _check(run_cli(*args, check=False), str(path), path.name)
    assert _digest(path) == before


@FUZZ
@given(data=st.data())
def test_fuzz_peft_dirs(seeds, tmp_path_factory, data):
    """A PEFT dir with a mutated adapter_config.json (values replaced, keys dropped, bytes damaged) or weights."""
    folder = tmp_path_factory.mktemp("p") / "lora"
    shutil.copytree(seeds / "lora", folder)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    how = data.draw(st.sampled_from(["value", "drop", "bytes", "weights"]))
    if how == "value":
        config[data.draw(st.sampled_from(sorted(config) + ["rank_pattern", "alpha_pattern", "target_modules"]))] = \
            data.draw(_JSON_VALUES)
        config_path.write_text(json.dumps(config))
    elif how == "drop":
        config.pop(data.draw(st.sampled_from(sorted(config))))
        config_path.write_text(json.dumps(config))
    elif how == "bytes":
        config_path.write_bytes(_mutate(config_path.read_bytes(), data.draw))
    else:
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(_mutate(weights.read_bytes(), data.draw))
    before = _digest(folder)
    out = folder.parent / "out.safetensors"
    for args in (("inspect", folder), ("convert", folder, out, "--to", "dense")):
        _check(run_cli(*args, check=False), str(folder), folder.name)
    assert _digest(folder) == before


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_index(seeds, tmp_path_factory, data):
    """A sharded BASE whose index JSON or a shard is damaged: merge refuses in one line or merges, BASE unchanged."""
    work = tmp_path_factory.mktemp("c")
    base = work / "sharded"
    shutil.copytree(seeds / "sharded", base)
    index = base / "model.safetensors.index.json"
    if data.draw(st.booleans()):
        parsed = json.loads(index.read_text())
        keys = sorted(parsed["weight_map"])
        key = data.draw(st.sampled_from(keys))
        parsed["weight_map"][key] = data.draw(st.sampled_from(
            ["../x.safetensors", "/etc/passwd", "missing.safetensors", "pytorch_model.bin", "", 3, None,
             parsed["weight_map"][keys[0]]]))
        index.write_text(json.dumps(parsed))
    else:
        index.write_bytes(_mutate(index.read_bytes(), data.draw))
    before = _digest(base)
    result = run_cli("merge", base, seeds / "a.safetensors", "-o", work / "out", check=False)
    _check(result, str(base), base.name)
    assert _digest(base) == before
    assert not [p for p in work.iterdir() if p.name.startswith(".out")]


def test_fuzz_seeds_are_valid(seeds, tmp_path):
    """The unmutated seeds work, so the fuzz tests start from inputs that exercise the whole reader."""
    for name in ("a.safetensors", "d.safetensors"):
        run_cli("validate", seeds / name)
    run_cli("inspect", seeds / "lora")
    run_cli("merge", seeds / "sharded", seeds / "a.safetensors", "-o", tmp_path / "out")
