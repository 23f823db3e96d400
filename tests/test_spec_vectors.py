"""SPEC.md's conformance vectors (spec/vectors/): the scalar reference reproduces them, the package passes every one,
and the JSON Schema and the reader give the same verdict on every file vector (SPEC §8)."""

from __future__ import annotations

import base64
import json
import struct
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_line_error, run_cli

from randlora_io.format.adapter import write_adapter
from randlora_io.format.basis import (bits_to_values_numpy, bits_to_values_torch, generate_bases, peft_bases_raw, peft_bases_to_spec)
from randlora_io.format.delta import reference_delta
from randlora_io.errors import RandloraError
from randlora_io.checkpoint.safetensors_io import read_header
from randlora_io.format.spec import GeneratorSpec, LayerSpec, num_bases
from randlora_io.format.vera import VeraLayer, vera_bases, vera_delta
from randlora_io.format.vera_file import VeraAdapter, read_any_adapter, write_vera_adapter

VECTORS = ROOT / "spec" / "vectors"
GOLDEN = json.loads((VECTORS / "golden.json").read_text())
FILES = json.loads((VECTORS / "files.json").read_text())["vectors"]


def _f32_hex(value: float) -> str:
    return "0x%08x" % struct.unpack("<I", struct.pack("<f", float(value)))[0]


def test_reference_regenerates_every_vector():
    """spec/reference.py (no package imports) reproduces golden.json and files.json exactly."""
    sys.path.insert(0, str(ROOT / "spec"))
    try:
        import make_vectors
    finally:
        sys.path.remove(str(ROOT / "spec"))
    assert json.loads(json.dumps(make_vectors.golden())) == GOLDEN
    assert json.loads(json.dumps(make_vectors.files()))["vectors"] == FILES


def test_word_to_value_rules_at_their_boundaries():
    for entry in GOLDEN["word_values"]:
        x = int(entry["bits"], 16)
        np_value = bits_to_values_numpy(np.array([x], dtype=np.uint32), entry["kind"], entry["threshold"])[0]
        torch_value = bits_to_values_torch(torch.tensor([x], dtype=torch.int64), entry["kind"], entry["threshold"])[0]
        assert _f32_hex(np_value) == entry["value_f32"] == _f32_hex(torch_value), entry


def _philox(entry) -> GeneratorSpec:
    return GeneratorSpec(name="philox", kind=entry["kind"], seed=entry["seed"], threshold=entry["threshold"])


@pytest.mark.parametrize("entry", GOLDEN["delta_probes"], ids=[e.get("id", str(i)) for i, e in
                                                                enumerate(GOLDEN["delta_probes"])])
def test_delta_probes_within_the_conformance_tolerance(entry):
    """SPEC §3: |ΔW − ΔW_64| ≤ (K + 5)·2^−24·abs_sum for every probe (fan_in_fan_out, r ∤ D, r = D, big seeds)."""
    gen, shape, fan, r = _philox(entry), tuple(entry["shape"]), entry["fan_in_fan_out"], entry["rank"]
    layer = LayerSpec(key="w", shape=shape, fan_in_fan_out=fan, num_bases=num_bases(min(shape), r))
    bases = generate_bases(gen, r, min(shape), max(shape))
    scaling = entry["alpha"] / r * (3.0 if gen.kind == "dense" else 2.0**31 / gen.threshold)
    delta = reference_delta(layer, torch.tensor(entry["lambda"]), torch.tensor(entry["gamma"]), bases.A, bases.B,
                            scaling)
    assert tuple(delta.shape) == shape
    K = r * layer.num_bases
    for probe in entry["probes"]:
        bound = (K + 5) * 2.0**-24 * probe["abs_sum"]
        assert abs(delta[probe["row"], probe["col"]].item() - probe["value"]) <= bound, (probe, bound)


def test_philox_checksum_vectors():
    for entry in GOLDEN["checksums"]:
        bases = generate_bases(_philox(entry), entry["rank"], entry["min_dim"], entry["max_dim"])
        assert bases.A.numpy().astype("<f4").tobytes().hex() == entry["A_f32le_hex"]
        assert bases.B.numpy().astype("<f4").tobytes().hex() == entry["B_f32le_hex"]
        assert bases.sha256() == entry["sha256"]


@pytest.mark.parametrize("entry", GOLDEN["peft_bases"], ids=lambda e: f"{e['kind']}-{e['draw_dtype']}-{e['cast_dtype']}")
def test_peft_generator_vectors(entry):
    gen = GeneratorSpec(name="peft", kind=entry["kind"], seed=entry["seed"], draw_dtype=entry["draw_dtype"],
                        cast_dtype=entry["cast_dtype"])
    bases = peft_bases_to_spec(*peft_bases_raw(gen, entry["rank"], entry["min_dim"], entry["max_dim"]))
    assert bases.sha256() == entry["sha256"]
    for el in entry["elements"]:
        matrix = bases.A if el["matrix"] == "A" else bases.B
        assert _f32_hex(matrix[el["row"], el["col"]].item()) == el["value_f32"], el


def _vera_gen(entry) -> GeneratorSpec:
    draw = "float32" if entry["generator"] == "peft" else None
    return GeneratorSpec(name=entry["generator"], kind="dense", seed=entry["seed"], draw_dtype=draw,
                         cast_dtype=entry.get("cast_dtype"), method="vera")


@pytest.mark.parametrize("entry", GOLDEN["vera_bases"], ids=lambda e: f"{e['generator']}-{e['seed']}-{e['cast_dtype']}")
def test_vera_bases_vectors(entry):
    """SPEC §2.1: both VeRA generators give the vectors' elements and checksum (peft: PEFT 0.21.2's own draw)."""
    bases = vera_bases(_vera_gen(entry), entry["rank"], entry["max_out"], entry["max_in"])
    assert bases.sha256() == entry["sha256"]
    for el in entry["elements"]:
        matrix = bases.A if el["matrix"] == "A" else bases.B
        assert _f32_hex(matrix[el["row"], el["col"]].item()) == el["value_f32"], el


@pytest.mark.parametrize("entry", GOLDEN["vera_delta_probes"], ids=lambda e: e["id"])
def test_vera_delta_probes_within_the_conformance_tolerance(entry):
    """SPEC §2.1: |ΔW − ΔW_64| ≤ (r + 5)·2^−24·abs_sum for every probe."""
    bases = vera_bases(_vera_gen(entry), entry["rank"], entry["max_out"], entry["max_in"])
    layer = VeraLayer(tuple(entry["shape"]), entry["fan_in_fan_out"])
    delta = vera_delta(layer, torch.tensor(entry["lambda_b"]), torch.tensor(entry["lambda_d"]), bases.A, bases.B)
    assert tuple(delta.shape) == tuple(entry["shape"])
    for probe in entry["probes"]:
        bound = (entry["rank"] + 5) * 2.0**-24 * probe["abs_sum"]
        assert abs(delta[probe["row"], probe["col"]].item() - probe["value"]) <= bound, (probe, bound)


def test_base_fingerprint_vector():
    """SPEC §7: train.attach.base_fingerprint, the function handle.save records, gives the vector's value."""
    from randlora_io.train.attach import base_fingerprint

    for entry in GOLDEN["fingerprints"]:
        weights = {}
        for w in entry["weights"]:
            dtype = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16}[w["dtype"]]
            raw = torch.frombuffer(bytearray.fromhex(w["data_hex"]), dtype=dtype)
            weights[w["key"]] = raw.reshape(w["shape"])
        assert base_fingerprint(weights) == entry["fingerprint"]


# --------------------------------------------------------------------------------------------------------------------
# file vectors
# --------------------------------------------------------------------------------------------------------------------


def _write(tmp_path, entry):
    path = tmp_path / "vector.safetensors"
    path.write_bytes(base64.b64decode(entry["base64"]))
    return path


def _ids(entries):
    return [("ok: " if e["valid"] else "bad: ") + e["name"] for e in entries]


@pytest.mark.parametrize("entry", FILES, ids=_ids(FILES))
def test_reader_verdict_on_file_vectors(tmp_path, entry):
    path = _write(tmp_path, entry)
    before = path.read_bytes()
    if entry["valid"]:
        adapter = read_any_adapter(path)
        adapter.bases()  # regenerated (or stored) bases agree with the checksum
    else:
        with pytest.raises(RandloraError):
            read_any_adapter(path)
        assert_one_line_error(run_cli("validate", path, check=False), "vector.safetensors")
    assert path.read_bytes() == before


VALID = [e for e in FILES if e["valid"]]


@pytest.mark.parametrize("entry", VALID, ids=_ids(VALID))
def test_rewrite_preserves_every_key_and_the_version(tmp_path, entry):
    """SPEC §2: a tool that rewrites a file keeps unknown keys at every level, other metadata entries and the label."""
    path = _write(tmp_path, entry)
    original = read_header(path).metadata
    adapter = read_any_adapter(path)
    (write_vera_adapter if isinstance(adapter, VeraAdapter) else write_adapter)(adapter, tmp_path / "again.safetensors")
    again = read_header(tmp_path / "again.safetensors").metadata
    assert set(again) == set(original)
    assert {k: v for k, v in again.items() if k != "randlora"} == {k: v for k, v in original.items() if k != "randlora"}
    header, header_again = json.loads(original["randlora"]), json.loads(again["randlora"])
    for layer in header["layers"].values():  # defaults written out explicitly are the same file
        layer.setdefault("fan_in_fan_out", False)
        layer.setdefault("dtype", "float32")
    assert header_again == header


def _strict_json(text: str):
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError("duplicate key")
        return dict(pairs)

    def no_constants(name):
        raise ValueError(name)

    return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)


SCHEMA_CHECKED = [e for e in FILES if e["checked_by"] != "container"]


@pytest.mark.parametrize("entry", SCHEMA_CHECKED, ids=_ids(SCHEMA_CHECKED))
def test_schema_and_reader_agree(tmp_path, entry):
    """Strict JSON + spec/schema.json give the reader's verdict on every rule they can express; on the others
    (checked_by: reader) the schema accepts and the reader refuses."""
    import jsonschema  # a test dependency (pyproject's test extra): this check must run, never be skipped
    schema = json.loads((ROOT / "spec" / "schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    text = read_header(_write(tmp_path, entry)).metadata["randlora"]
    try:
        header = _strict_json(text)
    except ValueError:
        verdict = "json"
    else:
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(header))
        verdict = "schema" if errors else None
    expected = None if entry["valid"] or entry["checked_by"] == "reader" else entry["checked_by"]
    assert verdict == expected, (entry["name"], verdict)
