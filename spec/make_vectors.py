"""Write spec/vectors/*.json from spec/reference.py. Run: python spec/make_vectors.py"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from reference import delta_element, element_bits, element_value, philox4x32_10, sample_scales

HERE = Path(__file__).parent / "vectors"


def f32_bits(x: float) -> str:
    return "0x%08x" % struct.unpack("<I", struct.pack("<f", x))[0]


def main() -> None:
    HERE.mkdir(exist_ok=True)
    kat = []
    for counter, key in [((0, 0, 0, 0), (0, 0)), ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF)),
                         ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0))]:
        kat.append({"counter": ["0x%08x" % c for c in counter], "key": ["0x%08x" % k for k in key],
                    "output": ["0x%08x" % o for o in philox4x32_10(counter, key)]})
    elements = []
    for seed, kind, threshold in [(0, "dense", None), (42, "dense", None), (2**40 + 7, "dense", None),
                                  (7, "sparse", 715827882), (7, "very_sparse", 189812531)]:
        for matrix_id, row, col in [(0, 0, 0), (0, 0, 1), (0, 3, 5), (0, 7, 4095), (1, 0, 0), (1, 11007, 4095),
                                    (1, 123, 77), (1, 4096, 3)]:
            elements.append({"seed": seed, "kind": kind, "threshold": threshold, "matrix": "AB"[matrix_id],
                             "row": row, "col": col, "bits": "0x%08x" % element_bits(seed, matrix_id, row, col),
                             "value_f32": f32_bits(element_value(seed, matrix_id, row, col, kind, threshold))})
    deltas = []
    for seed, kind, threshold, rank, alpha, shape, fan in [(3, "dense", None, 4, 8.0, (12, 10), False),
                                                          (5, "dense", None, 3, 6.0, (7, 13), False),
                                                          (9, "sparse", 715827882, 2, 4.0, (6, 9), True)]:
        out_f, in_f = (shape[1], shape[0]) if fan else shape
        D = min(out_f, in_f)
        n = -(-D // rank)
        lam, gam = sample_scales(rank, n, D)
        probes = [(r, c) for r in range(shape[0]) for c in range(shape[1]) if (r * 7 + c * 3) % 5 == 0][:12]
        values = [delta_element(seed, kind, threshold, rank, alpha, shape, fan, lam, gam, r, c) for r, c in probes]
        deltas.append({"seed": seed, "generator": "philox", "kind": kind, "threshold": threshold, "rank": rank,
                       "alpha": alpha, "shape": list(shape), "fan_in_fan_out": fan,
                       "scales": "spec/reference.py:sample_scales", "lambda": lam, "gamma": gam,
                       "probes": [{"row": r, "col": c, "value": v} for (r, c), v in zip(probes, values)]})
    doc = {"philox4x32_10_kat": kat, "basis_elements": elements, "delta_probes": deltas,
           "note": "produced by spec/reference.py, a scalar pure-Python reading of SPEC.md"}
    (HERE / "golden.json").write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", HERE / "golden.json")


if __name__ == "__main__":
    main()
