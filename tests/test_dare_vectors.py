"""SPEC.md Appendix A (DARE keep masks): spec/dare_reference.py, written from the text alone, reproduces
spec/vectors/dare.json, and the package's vectorised rule (merge/compose.py) gives the same bits."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest

from conftest import ROOT
from randlora_io.merge.compose import _key, dare_keep_mask, dare_uniforms

VECTORS = json.loads((ROOT / "spec" / "vectors" / "dare.json").read_text(encoding="utf-8"))


def _packed_hex(mask) -> str:
    return np.packbits(mask.reshape(-1).numpy().astype(np.uint8)).tobytes().hex()


def test_the_scalar_reference_regenerates_the_vectors():
    sys.path.insert(0, str(ROOT / "spec"))
    try:
        import dare_reference
    finally:
        sys.path.remove(str(ROOT / "spec"))
    assert json.loads(json.dumps(dare_reference.vectors(), ensure_ascii=False)) == VECTORS


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: f"{c['seed']}-{c['input_index']}-{c['shape']}")
def test_the_package_gives_every_vector(case):
    seed, index = int(case["seed"]), int(case["input_index"])
    assert "0x%016x" % _key(seed, index, case["key"], case["shape"])[0] == case["start_state"]
    count = int(np.prod(case["shape"]))
    u = dare_uniforms(seed, index, case["key"], count)
    assert ["0x%014x" % int(x * 2.0 ** 53) for x in u[:4]] == case["u53_first"]
    mask = dare_keep_mask(seed, index, case["key"], tuple(case["shape"]), case["density"])
    assert tuple(mask.shape) == tuple(case["shape"])
    assert _packed_hex(mask) == case["keep_bits_hex"]


def test_a_larger_tensor_keeps_about_density_and_matches():
    case = VECTORS["count_case"]
    mask = dare_keep_mask(int(case["seed"]), int(case["input_index"]), case["key"], (64, 64), case["density"])
    assert int(mask.sum()) == case["kept"]
    assert abs(case["kept"] / case["elements"] - case["density"]) < 0.03
    assert hashlib.sha256(_packed_hex(mask).encode()).hexdigest() == case["keep_bits_sha256"]
