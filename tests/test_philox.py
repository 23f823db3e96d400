"""Philox4x32-10 and the philox basis generator: known answers, golden vectors, numpy ≡ torch, tile independence."""

from __future__ import annotations

import json
import struct

import numpy as np
import torch
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

from randlora_io.format.basis import generate_bases, philox_block_numpy, philox_block_torch
from randlora_io.format.philox import basis_bits_numpy, philox4x32_numpy, philox4x32_torch
from randlora_io.format.spec import SPARSE_THRESHOLD, GeneratorSpec

GOLDEN = json.loads((ROOT / "spec" / "vectors" / "golden.json").read_text())

# Published known-answer vectors of Random123 (kat_vectors, philox4x32_10): counter, key → output.
RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_random123_known_answers_numpy_and_torch():
    for counter, key, expected in RANDOM123_KAT:
        got_np = philox4x32_numpy(tuple(np.array([c], dtype=np.uint32) for c in counter), key)
        assert tuple(int(w[0]) for w in got_np) == expected
        got_t = philox4x32_torch(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
        assert tuple(int(w[0]) for w in got_t) == expected


def _gen(entry) -> GeneratorSpec:
    return GeneratorSpec(name="philox", kind=entry["kind"], seed=entry["seed"], threshold=entry["threshold"])


def test_golden_basis_elements():
    for entry in GOLDEN["basis_elements"]:
        mid = "AB".index(entry["matrix"])
        rows, cols = slice(entry["row"], entry["row"] + 1), slice(entry["col"], entry["col"] + 1)
        bits = int(basis_bits_numpy(entry["seed"], mid, rows, cols)[0, 0])
        assert "0x%08x" % bits == entry["bits"], entry
        for value in (philox_block_numpy(_gen(entry), mid, rows, cols)[0, 0],
                      philox_block_torch(_gen(entry), mid, rows, cols)[0, 0].item()):
            assert "0x%08x" % struct.unpack("<I", struct.pack("<f", float(value)))[0] == entry["value_f32"], entry


def test_golden_delta_probes():
    from randlora_io.format.delta import reference_delta
    from randlora_io.format.spec import LayerSpec, num_bases

    for entry in GOLDEN["delta_probes"]:
        gen = _gen(entry)
        shape, fan, r = tuple(entry["shape"]), entry["fan_in_fan_out"], entry["rank"]
        layer = LayerSpec(key="w", shape=shape, fan_in_fan_out=fan, num_bases=num_bases(min(shape), r))
        bases = generate_bases(gen, r, min(shape), max(shape))
        from randlora_io.format.spec import normalisation

        scaling = entry["alpha"] / r * normalisation(gen)
        delta = reference_delta(layer, torch.tensor(entry["lambda"]), torch.tensor(entry["gamma"]), bases.A, bases.B,
                                scaling)
        for probe in entry["probes"]:
            assert abs(delta[probe["row"], probe["col"]].item() - probe["value"]) <= 1e-5 * (abs(probe["value"]) + 1e-3)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), kind=st.sampled_from(["dense", "sparse"]), matrix=st.integers(0, 1),
       r0=st.integers(0, 40), h=st.integers(1, 9), c0=st.integers(0, 70), w=st.integers(1, 13))
def test_any_block_generated_alone_equals_that_block_of_the_whole(seed, kind, matrix, r0, h, c0, w):
    gen = GeneratorSpec(name="philox", kind=kind, seed=seed, threshold=None if kind == "dense" else SPARSE_THRESHOLD)
    whole = philox_block_numpy(gen, matrix, slice(0, r0 + h), slice(0, c0 + w))
    block = philox_block_numpy(gen, matrix, slice(r0, r0 + h), slice(c0, c0 + w))
    assert np.array_equal(block.view(np.uint32), whole[r0:, c0:].view(np.uint32))
    block_t = philox_block_torch(gen, matrix, slice(r0, r0 + h), slice(c0, c0 + w))
    assert np.array_equal(block_t.numpy().view(np.uint32), block.view(np.uint32))


def test_dense_values_are_exact_odd_multiples_and_unit_variance_after_normalisation():
    gen = GeneratorSpec(name="philox", kind="dense", seed=11)
    bases = generate_bases(gen, 16, 256, 512)
    scaled = bases.B.double() * 2**23
    assert torch.equal(scaled, scaled.round()) and torch.all(scaled.remainder(2) == 1)
    assert abs(float((bases.B.double() ** 2).mean()) * 3 - 1) < 0.01


def test_sparse_ternary_density():
    gen = GeneratorSpec(name="philox", kind="sparse", seed=5, threshold=SPARSE_THRESHOLD)
    B = generate_bases(gen, 8, 64, 4096).B
    assert set(torch.unique(B).tolist()) == {-1.0, 0.0, 1.0}
    assert abs(float((B != 0).float().mean()) - 1 / 3) < 0.01
