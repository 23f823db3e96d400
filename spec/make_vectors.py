"""Write spec/vectors/*.json from spec/reference.py. Run: python spec/make_vectors.py

golden.json: numbers (Philox known answers, basis elements, word → value rules, ΔW probes with their tolerance
bound, checksums, `peft`-generator bases, the base fingerprint). files.json: whole randlora files, valid and
invalid, each invalid one naming the rule it breaks and which check catches it (SPEC §8); VeRA (SPEC §2.1): its bases,
ΔW probes and files.
"""

from __future__ import annotations

import base64
import copy
import json
import struct
from pathlib import Path

from reference import (SPARSE_THRESHOLD, base_fingerprint, bases_sha256, bits_value, delta_element_bound,
                       element_bits, element_value, f32_bytes, peft_bases, philox4x32_10, philox_bases, sample_scales,
                       scaling, shared_dims, vera_delta_element, vera_peft_bases, vera_philox_bases,
                       very_sparse_threshold)

HERE = Path(__file__).parent / "vectors"


def f32_bits(x: float) -> str:
    return "0x%08x" % struct.unpack("<I", struct.pack("<f", x))[0]


def _num_bases(D: int, r: int) -> int:
    return -(-D // r)


# --------------------------------------------------------------------------------------------------------------------
# golden.json
# --------------------------------------------------------------------------------------------------------------------


def kat_vectors() -> list[dict]:
    kat = []
    for counter, key in [((0, 0, 0, 0), (0, 0)), ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF)),
                         ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0))]:
        kat.append({"counter": ["0x%08x" % c for c in counter], "key": ["0x%08x" % k for k in key],
                    "output": ["0x%08x" % o for o in philox4x32_10(counter, key)]})
    return kat


def element_vectors() -> list[dict]:
    elements = []
    for seed, kind, threshold in [(0, "dense", None), (42, "dense", None), (2**40 + 7, "dense", None),
                                  (7, "sparse", 715827882), (7, "very_sparse", 189812531),
                                  (2**32, "dense", None), (2**64 - 1, "dense", None)]:
        for matrix_id, row, col in [(0, 0, 0), (0, 0, 1), (0, 3, 5), (0, 7, 4095), (1, 0, 0), (1, 11007, 4095),
                                    (1, 123, 77), (1, 4096, 3)]:
            elements.append({"seed": seed, "kind": kind, "threshold": threshold, "matrix": "AB"[matrix_id],
                             "row": row, "col": col, "bits": "0x%08x" % element_bits(seed, matrix_id, row, col),
                             "value_f32": f32_bits(element_value(seed, matrix_id, row, col, kind, threshold))})
    return elements


def word_vectors() -> list[dict]:
    """SPEC §4.2's word → value rules at their boundaries (x = T−1, T, 2^32−T−1, 2^32−T, and the extremes)."""
    out = []
    for x in (0, 1, 0x1FF, 0x200, 0x7FFFFFFF, 0x80000000, 0xFFFFFE00, 0xFFFFFFFF):
        out.append({"kind": "dense", "threshold": None, "bits": "0x%08x" % x, "value_f32": f32_bits(bits_value(x, "dense"))})
    for kind, T in (("sparse", SPARSE_THRESHOLD), ("very_sparse", 1), ("very_sparse", 2**31)):
        for x in sorted(x for x in {0, T - 1, T, 2**32 - T - 1, 2**32 - T, 2**32 - 1} if 0 <= x < 2**32):
            out.append({"kind": kind, "threshold": T, "bits": "0x%08x" % x, "value_f32": f32_bits(bits_value(x, kind, T))})
    return out


DELTA_CASES = [  # id, seed, kind, threshold, rank, alpha, shape, fan_in_fan_out
    ("dense_r4_12x10", 3, "dense", None, 4, 8.0, (12, 10), False),
    ("dense_r_not_dividing_D", 5, "dense", None, 3, 6.0, (7, 13), False),
    ("sparse_fan_in_fan_out", 9, "sparse", 715827882, 2, 4.0, (6, 9), True),
    ("square_fan_in_fan_out", 11, "dense", None, 2, 2.0, (6, 6), True),
    ("square_no_fan", 11, "dense", None, 2, 2.0, (6, 6), False),
    ("very_sparse", 13, "very_sparse", very_sparse_threshold(8), 2, 3.0, (8, 12), False),
    ("seed_2^32_plus_5", 2**32 + 5, "dense", None, 2, 4.0, (5, 8), False),
    ("seed_2^64_minus_1", 2**64 - 1, "dense", None, 2, 4.0, (8, 5), False),
    ("r_equals_D", 17, "dense", None, 5, 5.0, (5, 9), False),
    ("r_not_dividing_D_out_gt_in", 19, "sparse", 715827882, 2, 1.0, (10, 5), False),
    ("fan_out_lt_in", 23, "dense", None, 3, 3.0, (9, 6), True),
]


def delta_vectors() -> list[dict]:
    deltas = []
    for name, seed, kind, threshold, rank, alpha, shape, fan in DELTA_CASES:
        out_f, in_f = (shape[1], shape[0]) if fan else shape
        D = min(out_f, in_f)
        n = _num_bases(D, rank)
        lam, gam = sample_scales(rank, n, D)
        cells = [(r, c) for r in range(shape[0]) for c in range(shape[1])]
        probes = cells if len(cells) <= 64 else [(r, c) for r, c in cells if (r * 7 + c * 3) % 5 == 0][:24]
        probe_rows = []
        for r, c in probes:
            value, abs_sum = delta_element_bound(seed, kind, threshold, rank, alpha, shape, fan, lam, gam, r, c)
            probe_rows.append({"row": r, "col": c, "value": value, "abs_sum": abs_sum})
        deltas.append({"id": name, "seed": seed, "generator": "philox", "kind": kind, "threshold": threshold,
                       "rank": rank, "alpha": alpha, "shape": list(shape), "fan_in_fan_out": fan,
                       "K": rank * n, "scaling_f64": scaling(alpha, rank, kind, threshold),
                       "scales": "spec/reference.py:sample_scales", "lambda": lam, "gamma": gam, "probes": probe_rows})
    return deltas


def checksum_vectors() -> list[dict]:
    out = []
    for seed, kind, threshold, rank, min_dim, max_dim in [(1, "dense", None, 2, 5, 7), (2**64 - 1, "sparse", 715827882, 3, 4, 6)]:
        A, B = philox_bases(seed, kind, threshold, rank, min_dim, max_dim)
        out.append({"generator": "philox", "seed": seed, "kind": kind, "threshold": threshold, "rank": rank,
                    "min_dim": min_dim, "max_dim": max_dim,
                    "A_f32le_hex": b"".join(f32_bytes(row) for row in A).hex(),
                    "B_f32le_hex": b"".join(f32_bytes(row) for row in B).hex(),
                    "sha256": bases_sha256(A, B)})
    return out


PEFT_CASES = [  # seed, kind, draw_dtype, cast_dtype, rank, min_dim, max_dim
    (0, "dense", "bfloat16", None, 3, 7, 10),
    (0, "dense", "float16", None, 3, 7, 10),
    (0, "dense", "bfloat16", "float16", 3, 7, 10),
    (1234, "sparse", "float32", None, 2, 6, 9),
    (1234, "sparse", "float32", "bfloat16", 2, 6, 9),
    (99, "very_sparse", "float32", "float16", 2, 16, 20),
    (2**64 - 1, "dense", "bfloat16", None, 2, 4, 6),
]


def peft_vectors() -> list[dict]:
    out = []
    for seed, kind, draw, cast, rank, min_dim, max_dim in PEFT_CASES:
        A, B = peft_bases(seed, kind, draw, cast, rank, min_dim, max_dim)
        elements = [{"matrix": "A", "row": i, "col": j, "value_f32": f32_bits(float(A[i, j]))}
                    for i, j in ((0, 0), (rank - 1, min_dim - 1))]
        elements += [{"matrix": "B", "row": i, "col": j, "value_f32": f32_bits(float(B[i, j]))}
                     for i, j in ((0, 0), (max_dim - 1, B.shape[1] - 1))]
        out.append({"generator": "peft", "seed": seed, "kind": kind, "draw_dtype": draw, "cast_dtype": cast,
                    "rank": rank, "min_dim": min_dim, "max_dim": max_dim, "elements": elements,
                    "sha256": bases_sha256(A.tolist(), B.tolist())})
    return out


def fingerprint_vectors() -> list[dict]:
    def bf16_bytes(values):  # truncation of exact-in-bf16 values: the high half of their float32 bytes
        return b"".join(struct.pack("<f", v)[2:] for v in values)

    w1 = ("model.layers.0.mlp.up.weight", [3, 2], "torch.float32", f32_bytes([0.5, -1.0, 2.0, 0.25, 0.0, -3.5]))
    w2 = ("model.layers.0.attn.q.weight", [2, 2], "torch.bfloat16", bf16_bytes([1.0, -2.0, 0.5, 4.0]))
    weights = [w1, w2]
    return [{"weights": [{"key": k, "shape": s, "dtype": d, "data_hex": raw.hex()} for k, s, d, raw in weights],
             "fingerprint": base_fingerprint(weights)}]


VERA_BASES_CASES = [  # generator, seed, cast_dtype, rank, max_out, max_in
    ("peft", 0, None, 3, 7, 5),
    ("peft", 2**63 + 5, None, 4, 6, 9),
    ("peft", 2**64 - 1, "bfloat16", 2, 5, 4),  # PEFT's projection_prng_key -1
    ("peft", 42, "float16", 8, 3, 2),  # r above both dims
    ("philox", 0, None, 3, 7, 5),
    ("philox", 2**64 - 1, None, 2, 5, 4),
]


def _vera_bases(generator, seed, cast, rank, max_out, max_in):
    if generator == "philox":
        return vera_philox_bases(seed, rank, max_out, max_in)
    A, B = vera_peft_bases(seed, cast, rank, max_out, max_in)
    return A.tolist(), B.tolist()


def vera_bases_vectors() -> list[dict]:
    out = []
    for generator, seed, cast, rank, max_out, max_in in VERA_BASES_CASES:
        A, B = _vera_bases(generator, seed, cast, rank, max_out, max_in)
        elements = [{"matrix": "A", "row": i, "col": j, "value_f32": f32_bits(A[i][j])}
                    for i, j in ((0, 0), (rank - 1, max_in - 1))]
        elements += [{"matrix": "B", "row": i, "col": j, "value_f32": f32_bits(B[i][j])}
                     for i, j in ((0, 0), (max_out - 1, rank - 1))]
        out.append({"generator": generator, "seed": seed, "cast_dtype": cast, "rank": rank, "max_out": max_out,
                    "max_in": max_in, "elements": elements, "sha256": bases_sha256(A, B)})
    return out


VERA_DELTA_CASES = [  # id, generator, seed, rank, (max_out, max_in), stored shape, fan_in_fan_out
    ("philox out < in", "philox", 7, 3, (6, 9), [4, 9], False),
    ("philox Conv1D", "philox", 7, 3, (6, 9), [9, 6], True),
    ("peft r above the layer dims, slices of larger bases", "peft", 2**63, 8, (6, 9), [3, 5], False),
]


def vera_sample_vectors(out_f: int, rank: int) -> tuple[list[float], list[float]]:
    """Deterministic, exactly representable λ_b (out,) and λ_d (r,)."""
    return [((5 * o) % 13 - 6) / 32 for o in range(out_f)], [((3 * k) % 11 - 5) / 16 for k in range(rank)]


def vera_delta_vectors() -> list[dict]:
    out = []
    for name, generator, seed, rank, (max_out, max_in), shape, fan in VERA_DELTA_CASES:
        A, B = _vera_bases(generator, seed, None, rank, max_out, max_in)
        out_f = shape[1] if fan else shape[0]
        lam_b, lam_d = vera_sample_vectors(out_f, rank)
        probes = []
        for r, c in [(r, c) for r in range(shape[0]) for c in range(shape[1])][::3]:
            value, abs_sum = vera_delta_element(A, B, lam_b, lam_d, shape, fan, r, c)
            probes.append({"row": r, "col": c, "value": value, "abs_sum": abs_sum})
        out.append({"id": name, "generator": generator, "seed": seed, "rank": rank, "max_out": max_out,
                    "max_in": max_in, "shape": shape, "fan_in_fan_out": fan, "lambda_b": lam_b, "lambda_d": lam_d,
                    "probes": probes})
    return out


# --------------------------------------------------------------------------------------------------------------------
# files.json
# --------------------------------------------------------------------------------------------------------------------


def safetensors_bytes(tensors: list[tuple[str, str, list[int], bytes]], metadata: dict | None,
                      header_text: str | None = None) -> bytes:
    """A safetensors file: tensors laid out in the given order. ``header_text`` replaces the JSON header verbatim."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = header_text if header_text is not None else json.dumps(header, separators=(",", ":"))
    raw_header = text.encode()
    raw_header += b" " * (-len(raw_header) % 8)
    return struct.pack("<Q", len(raw_header)) + raw_header + b"".join(t[3] for t in tensors)


LAYERS = {"m.q.weight": ([6, 4], False), "m.o.weight": ([4, 6], False)}  # _find_dim → (6, 6), not max D = 4


class FileCase:
    """A randlora file under construction: header dict, tensors, other metadata entries, or a verbatim text."""

    def __init__(self, *, version="1.1", seed=42, generator=None, rank=2, alpha=4.0, layers=None, sha=True,
                 base_model=None):
        layers = layers or LAYERS
        self.generator = generator or {"name": "philox", "kind": "dense"}
        min_dim, max_dim = shared_dims(layers.values())
        self.header = {"format": "randlora", "format_version": version, "generator": copy.deepcopy(self.generator),
                       "seed": seed, "rank": rank, "alpha": alpha, "bases": {"min_dim": min_dim, "max_dim": max_dim},
                       "layers": {}}
        self.tensors: list[tuple[str, str, list[int], bytes]] = []
        for key, (shape, fan) in layers.items():
            out_f, in_f = (shape[1], shape[0]) if fan else shape
            D = min(out_f, in_f)
            n = _num_bases(D, rank)
            self.header["layers"][key] = {"shape": shape, "fan_in_fan_out": fan, "num_bases": n, "dtype": "float32"}
            lam, gam = sample_scales(rank, n, D)
            self.tensors.append((key + ".lambda", "F32", [rank, n], f32_bytes([v for row in lam for v in row])))
            self.tensors.append((key + ".gamma", "F32", [n, D], f32_bytes([v for row in gam for v in row])))
        if base_model is not None:
            self.header["base_model"] = base_model
        if sha:
            self.header["bases"]["sha256"] = self.regenerated_sha()
        self.other_metadata: dict[str, str] = {}
        self.text: str | None = None

    def regenerated_sha(self) -> str:
        h, g = self.header, self.generator
        if g["name"] == "philox":
            A, B = philox_bases(h["seed"], g["kind"], g.get("threshold"), h["rank"], h["bases"]["min_dim"],
                                h["bases"]["max_dim"])
            return bases_sha256(A, B)
        A, B = peft_bases(h["seed"], g["kind"], g["draw_dtype"], g.get("cast_dtype"), h["rank"],
                          h["bases"]["min_dim"], h["bases"]["max_dim"])
        return bases_sha256(A.tolist(), B.tolist())

    def store_bases(self) -> None:
        """Add __bases__.A/B (arbitrary exact values) with bases.stored and their checksum."""
        h = self.header
        r, min_dim, max_dim = h["rank"], h["bases"]["min_dim"], h["bases"]["max_dim"]
        width = _num_bases(min_dim, r) * r
        A = [[((i * 7 + j * 3) % 5 - 2) / 4 for j in range(min_dim)] for i in range(r)]
        B = [[((m * 5 + k) % 7 - 3) / 8 for k in range(width)] for m in range(max_dim)]
        self.tensors.append(("__bases__.A", "F32", [r, min_dim], b"".join(f32_bytes(row) for row in A)))
        self.tensors.append(("__bases__.B", "F32", [max_dim, width], b"".join(f32_bytes(row) for row in B)))
        h["bases"]["stored"] = True
        h["bases"]["sha256"] = bases_sha256(A, B)

    def tensor(self, name: str) -> int:
        return [t[0] for t in self.tensors].index(name)

    def bytes(self) -> bytes:
        text = self.text if self.text is not None else json.dumps(self.header)
        return safetensors_bytes(self.tensors, {"randlora": text, **self.other_metadata})


def _peft_dense() -> FileCase:
    return FileCase(generator={"name": "peft", "kind": "dense", "draw_dtype": "bfloat16", "cast_dtype": "float16"})


def _sparse() -> FileCase:
    return FileCase(generator={"name": "philox", "kind": "sparse", "threshold": SPARSE_THRESHOLD})


def valid_cases() -> list[tuple[str, str, FileCase]]:
    cases = []
    c = FileCase(version="1.0", sha=False)
    for layer in c.header["layers"].values():
        del layer["fan_in_fan_out"], layer["dtype"]  # the defaults: false, float32
    cases.append(("v1.0 minimal, defaults", "§2 defaults; a 1.0 file stays valid", c))
    c = FileCase(layers={"m.a.weight": ([6, 4], False), "m.b.weight": ([2, 8], False)})  # _find_dim (6, 8)
    del c.header["layers"]["m.b.weight"]["fan_in_fan_out"]  # read as true, the layers would imply (4, 8)
    cases.append(("fan_in_fan_out absent beside an explicit false", "§6 fan_in_fan_out defaults to false", c))
    cases.append(("v1.1 philox dense with checksum", "§2, §4.4", FileCase(base_model={"id": "org/m", "revision": None})))
    c = FileCase(version="1.7", base_model={"id": "org/m", "x_base": [1, 2]})
    c.header["x_top"] = {"note": "kept"}
    c.header["bases"]["x_bases"] = 1
    c.header["layers"]["m.q.weight"]["x_layer"] = "kept"
    c.other_metadata["x_other"] = "kept too"
    cases.append(("higher minor, unknown keys at every level", "§2 versions and unknown keys", c))
    cases.append(("philox sparse", "§4.2", _sparse()))
    c = FileCase(generator={"name": "philox", "kind": "very_sparse", "threshold": very_sparse_threshold(6)})
    cases.append(("philox very_sparse", "§4.2", c))
    cases.append(("seed 2^64-1", "§2 seed: exact 64-bit integer", FileCase(seed=2**64 - 1)))
    cases.append(("seed 2^53+1", "§2 seed: exact 64-bit integer (a binary64 parser reads 2^53)", FileCase(seed=2**53 + 1)))
    cases.append(("peft dense bfloat16 cast float16", "§4.3", _peft_dense()))
    c = FileCase(generator={"name": "peft", "kind": "sparse", "draw_dtype": "float32"})
    c.store_bases()
    cases.append(("stored bases", "§4.5", c))
    cases.append(("square fan_in_fan_out", "§2 fan_in_fan_out", FileCase(layers={"h.c_attn.weight": ([4, 4], True)})))
    c = FileCase()
    c.header["layers"]["m.q.weight"]["dtype"] = "bfloat16"
    i = c.tensor("m.q.weight.lambda")
    name, _, shape, raw = c.tensors[i]
    c.tensors[i] = (name, "BF16", shape, b"".join(raw[k + 2: k + 4] for k in range(0, len(raw), 4)))
    i = c.tensor("m.q.weight.gamma")
    name, _, shape, raw = c.tensors[i]
    c.tensors[i] = (name, "BF16", shape, b"".join(raw[k + 2: k + 4] for k in range(0, len(raw), 4)))
    cases.append(("bfloat16 scales", "§2 layer dtype", c))
    return cases


def _set(path: str, value):
    def mutate(c: FileCase):
        obj = c.header
        *parents, last = path.split("/")
        for p in parents:
            obj = obj[p]
        obj[last] = value
    return mutate


def _delete(path: str):
    def mutate(c: FileCase):
        obj = c.header
        *parents, last = path.split("/")
        for p in parents:
            obj = obj[p]
        del obj[last]
    return mutate


def _text(old: str, new: str):
    def mutate(c: FileCase):
        c.text = json.dumps(c.header).replace(old, new, 1)
        assert c.text != json.dumps(c.header), old
    return mutate


def _tensor(name: str, dtype: str | None = None, shape=None, raw=None, drop=False):
    def mutate(c: FileCase):
        i = c.tensor(name)
        if drop:
            del c.tensors[i]
            return
        n, d, s, r = c.tensors[i]
        c.tensors[i] = (n, dtype or d, shape or s, raw if raw is not None else r)
    return mutate


def _f16(raw_f32: bytes) -> bytes:
    return b"".join(struct.pack("<e", v) for (v,) in struct.iter_unpack("<f", raw_f32))


Q = "layers/m.q.weight"
INVALID = [  # name, rule, checked_by, base factory, mutation
    ("format not randlora", "§2 format", "schema", FileCase, _set("format", "lora")),
    ("version 01.0", "§2 format_version syntax", "schema", FileCase, _set("format_version", "01.0")),
    ("version 1", "§2 format_version syntax", "schema", FileCase, _set("format_version", "1")),
    ("unknown major 2.0", "§2 unknown MAJOR", "schema", FileCase, _set("format_version", "2.0")),
    ("seed 2^64", "§2 seed range", "schema", FileCase, _set("seed", 2**64)),
    ("seed -1", "§2 seed range", "schema", FileCase, _set("seed", -1)),
    ("seed as string", "§2 seed type", "schema", FileCase, _set("seed", "42")),
    ("seed 42.0", "§2 integers are written without fraction or exponent", "reader", FileCase, _text('"seed": 42', '"seed": 42.0')),
    ("rank 0", "§2 rank", "schema", FileCase, _set("rank", 0)),
    ("alpha 1e400", "§2 alpha finite", "schema", FileCase, _text('"alpha": 4.0', '"alpha": 1e400')),
    ("alpha NaN literal", "§1 strict JSON (no NaN)", "json", FileCase, _text('"alpha": 4.0', '"alpha": NaN')),
    ("duplicate key in header", "§1 strict JSON (no duplicate keys)", "json", FileCase,
     _text('"rank": 2', '"rank": 2, "rank": 2')),
    ("header not an object", "§2 header is an object", "schema", FileCase, _text(json.dumps(FileCase().header), "[]")),
    ("unknown generator", "§2 generator name", "schema", FileCase, _set("generator/name", "mt19937")),
    ("unknown kind", "§2 generator kind", "schema", FileCase, _set("generator/kind", "gaussian")),
    ("dense philox with threshold", "§4 unknown/foreign generator parameter", "schema", FileCase,
     _set("generator/threshold", 5)),
    ("philox with draw_dtype", "§4 unknown/foreign generator parameter", "schema", FileCase,
     _set("generator/draw_dtype", "float32")),
    ("unknown generator parameter", "§4 unknown generator parameter", "schema", FileCase, _set("generator/x_mode", 1)),
    ("sparse without threshold", "§4.2 threshold required", "schema", _sparse, _delete("generator/threshold")),
    ("threshold null", "§4.2 threshold integer", "schema", _sparse, _set("generator/threshold", None)),
    ("threshold 0", "§4.2 threshold range", "schema", _sparse, _set("generator/threshold", 0)),
    ("threshold 2^31+1", "§4.2 threshold range", "schema", _sparse, _set("generator/threshold", 2**31 + 1)),
    ("peft dense drawn in float32", "§4.3 draw_dtype × kind", "schema", _peft_dense, _set("generator/draw_dtype", "float32")),
    ("peft sparse drawn in bfloat16", "§4.3 draw_dtype × kind", "schema",
     lambda: FileCase(generator={"name": "peft", "kind": "sparse", "draw_dtype": "float32"}),
     _set("generator/draw_dtype", "bfloat16")),
    ("peft without draw_dtype", "§4.3 draw_dtype required", "schema", _peft_dense, _delete("generator/draw_dtype")),
    ("peft with threshold", "§4 foreign generator parameter", "schema", _peft_dense, _set("generator/threshold", 5)),
    ("cast_dtype null", "§4.3 cast_dtype absent or a dtype", "schema", _peft_dense, _set("generator/cast_dtype", None)),
    ("cast_dtype float64", "§4.3 cast_dtype values", "schema", _peft_dense, _set("generator/cast_dtype", "float64")),
    ("sha256 uppercase", "§4.4 lowercase hex", "schema", FileCase,
     lambda c: c.header["bases"].update(sha256=c.header["bases"]["sha256"].upper())),
    ("sha256 null", "§4.4 sha256 absent or 64 lowercase hex", "schema", FileCase, _set("bases/sha256", None)),
    ("sha256 63 chars", "§4.4 sha256 length", "schema", FileCase,
     lambda c: c.header["bases"].update(sha256=c.header["bases"]["sha256"][:63])),
    ("stored not boolean", "§2 bases.stored", "schema", FileCase, _set("bases/stored", "yes")),
    ("min_dim 0", "§2 bases", "schema", FileCase, _set("bases/min_dim", 0)),
    ("no layers", "§2 layers non-empty", "schema", FileCase, _set("layers", {})),
    ("zero-size layer", "§2 layer shape positive", "schema", FileCase, _set(Q + "/shape", [0, 6])),
    ("one-dimensional shape", "§2 layer shape", "schema", FileCase, _set(Q + "/shape", [6])),
    ("fan_in_fan_out as string", "§2 fan_in_fan_out", "schema", FileCase, _set(Q + "/fan_in_fan_out", "false")),
    ("layer dtype float8", "§2 layer dtype", "schema", FileCase, _set(Q + "/dtype", "float8_e4m3fn")),
    ("num_bases missing", "§2 num_bases required", "schema", FileCase, _delete(Q + "/num_bases")),
    ("base_model.id a number", "§2 base_model fields", "schema", FileCase, _set("base_model", {"id": 3})),
    ("base_model a string", "§2 base_model object", "schema", FileCase, _set("base_model", "org/m")),
    ("rank above min_dim", "§2 rank ≤ min_dim", "reader", FileCase, _set("rank", 7)),
    ("num_bases wrong", "§2 num_bases = ⌈D/r⌉", "reader", FileCase, _set(Q + "/num_bases", 3)),
    ("bases 45000 (DoS)", "§2 min_dim/max_dim equal the layers' _find_dim", "reader", FileCase,
     lambda c: c.header["bases"].update(min_dim=45000, max_dim=45000)),
    ("bases sized by max D, not _find_dim", "§2 min_dim/max_dim equal the layers' _find_dim", "reader", FileCase,
     lambda c: c.header["bases"].update(min_dim=4, max_dim=6)),
    ("min_dim above max_dim", "§2 min_dim ≤ max_dim", "reader", FileCase,
     lambda c: c.header["bases"].update(min_dim=7, max_dim=6)),
    ("checksum mismatch", "§4.4 verify on read", "reader", FileCase, _set("bases/sha256", "0" * 64)),
    ("checksum of another seed", "§4.4 verify on read", "reader", FileCase, _set("seed", 43)),
    ("lambda wrong shape", "§1 tensor shapes", "reader", FileCase, _tensor("m.q.weight.lambda", shape=[1, 4])),
    ("gamma missing", "§1 tensors: exactly λ, γ per layer", "reader", FileCase, _tensor("m.q.weight.gamma", drop=True)),
    ("lambda float16 but header float32", "§1 tensor dtype", "reader", FileCase,
     lambda c: _tensor("m.q.weight.lambda", dtype="F16", raw=_f16(c.tensors[c.tensor("m.q.weight.lambda")][3]))(c)),
    ("lambda int32", "§1 tensor dtype", "reader", FileCase, _tensor("m.q.weight.lambda", dtype="I32")),
    ("lambda NaN", "§2 λ, γ finite", "reader", FileCase,
     _tensor("m.q.weight.lambda", raw=struct.pack("<f", float("nan")) * 4)),
    ("stored bases without bases.stored", "§4.5", "reader", FileCase,
     lambda c: (c.store_bases(), c.header["bases"].pop("stored"))),
    ("bases.stored without tensors", "§4.5", "reader", FileCase, _set("bases/stored", True)),
    ("stored bases float16", "§4.5 stored bases are float32", "reader", FileCase,
     lambda c: (c.store_bases(), _tensor("__bases__.A", dtype="F16", raw=_f16(c.tensors[c.tensor("__bases__.A")][3]))(c))),
    ("stored bases, wrong checksum", "§4.4 verify on read", "reader", FileCase,
     lambda c: (c.store_bases(), c.header["bases"].update(sha256="1" * 64))),
]


VERA_LAYERS = {"m.q.weight": ([6, 4], False), "m.o.weight": ([4, 6], False), "h.c.weight": ([4, 9], True)}


# SPEC §2.1: the text a VeRA header holds in `alpha` (1.1 readers refuse a non-number there, showing it)
VERA_ALPHA_MARK = ("none: a VeRA adapter (SPEC 1.2 generator method vera), a newer adapter method than a 1.1 reader "
                   "knows; upgrade randlora-io")


class VeraFileCase(FileCase):
    """A VeRA file (SPEC §2.1, format 1.2): λ_b / λ_d per layer; (max_out, max_in) = (9, 6) for VERA_LAYERS."""

    def __init__(self, *, version="1.2", seed=42, generator=None, rank=5, layers=None, sha=True):
        layers = layers or VERA_LAYERS
        self.generator = generator or {"name": "philox", "kind": "dense", "method": "vera"}
        max_out = max(s[1] if f else s[0] for s, f in layers.values())
        max_in = max(s[0] if f else s[1] for s, f in layers.values())
        self.header = {"format": "randlora", "format_version": version, "generator": copy.deepcopy(self.generator),
                       "seed": seed, "rank": rank, "alpha": VERA_ALPHA_MARK,
                       "bases": {"max_out": max_out, "max_in": max_in}, "layers": {}}
        self.tensors = []
        for key, (shape, fan) in layers.items():
            out_f = shape[1] if fan else shape[0]
            self.header["layers"][key] = {"shape": shape, "fan_in_fan_out": fan, "dtype": "float32"}
            lam_b, lam_d = vera_sample_vectors(out_f, rank)
            self.tensors.append((key + ".lambda_b", "F32", [out_f], f32_bytes(lam_b)))
            self.tensors.append((key + ".lambda_d", "F32", [rank], f32_bytes(lam_d)))
        if sha:
            self.header["bases"]["sha256"] = self.regenerated_sha()
        self.other_metadata, self.text = {}, None

    def regenerated_sha(self) -> str:
        h, g = self.header, self.generator
        return bases_sha256(*_vera_bases(g["name"], h["seed"], g.get("cast_dtype"), h["rank"], h["bases"]["max_out"],
                                         h["bases"]["max_in"]))

    def store_bases(self) -> None:
        h = self.header
        r, max_out, max_in = h["rank"], h["bases"]["max_out"], h["bases"]["max_in"]
        A = [[((i * 7 + j * 3) % 5 - 2) / 4 for j in range(max_in)] for i in range(r)]
        B = [[((m * 5 + k) % 7 - 3) / 8 for k in range(r)] for m in range(max_out)]
        self.tensors.append(("__bases__.A", "F32", [r, max_in], b"".join(f32_bytes(row) for row in A)))
        self.tensors.append(("__bases__.B", "F32", [max_out, r], b"".join(f32_bytes(row) for row in B)))
        h["bases"]["stored"] = True
        h["bases"]["sha256"] = bases_sha256(A, B)


def _vera_peft() -> VeraFileCase:
    return VeraFileCase(generator={"name": "peft", "kind": "dense", "method": "vera", "draw_dtype": "float32",
                                   "cast_dtype": "bfloat16"}, seed=2**63 + 5)


def vera_valid_cases() -> list[tuple[str, str, FileCase]]:
    cases = [("vera philox", "§2.1 philox VeRA bases", VeraFileCase()),
             ("vera peft cast bfloat16, seed 2^63+5", "§2.1 peft VeRA bases", _vera_peft()),
             ("vera r above every layer dim", "§2.1 r is not bounded by the dims", VeraFileCase(rank=12))]
    c = VeraFileCase(generator={"name": "peft", "kind": "dense", "method": "vera", "draw_dtype": "float32"})
    c.store_bases()
    cases.append(("vera stored bases", "§2.1, §4.5", c))
    c = VeraFileCase(version="1.9", seed=2**64 - 1)
    c.header["x_top"], c.header["bases"]["x_bases"] = 1, "kept"
    c.header["layers"]["m.q.weight"]["x_layer"] = [1]
    c.other_metadata["x_other"] = "kept too"
    cases.append(("vera higher minor, unknown keys, seed 2^64-1", "§2 versions and unknown keys", c))
    return cases


VQ = "layers/m.q.weight"
VERA_INVALID = [  # name, rule, checked_by, base factory, mutation
    ("vera with alpha", "§2.1 no alpha", "schema", VeraFileCase, _set("alpha", 1.0)),
    ("vera layer with num_bases", "§2.1 no num_bases", "schema", VeraFileCase, _set(VQ + "/num_bases", 1)),
    ("vera bases with min_dim", "§2.1 bases are max_out / max_in", "schema", VeraFileCase, _set("bases/min_dim", 6)),
    ("vera without max_in", "§2.1 bases are max_out / max_in", "schema", VeraFileCase, _delete("bases/max_in")),
    ("vera sparse kind", "§2.1 VeRA bases are dense", "schema", VeraFileCase, _set("generator/kind", "sparse")),
    ("vera peft drawn in bfloat16", "§2.1 peft VeRA draw_dtype float32", "schema", _vera_peft,
     _set("generator/draw_dtype", "bfloat16")),
    ("vera peft without draw_dtype", "§2.1 peft VeRA draw_dtype required", "schema", _vera_peft,
     _delete("generator/draw_dtype")),
    ("vera philox with cast_dtype", "§4 foreign generator parameter", "schema", VeraFileCase,
     _set("generator/cast_dtype", "bfloat16")),
    ("unknown method", "§2.1 method: a newer method is refused", "schema", VeraFileCase, _set("generator/method", "dora")),
    ("vera bases not the layers' max", "§2.1 max_out / max_in equal the layers'", "reader", VeraFileCase,
     _set("bases/max_in", 7)),
    ("vera checksum mismatch", "§4.4 verify on read", "reader", VeraFileCase, _set("bases/sha256", "0" * 64)),
    ("vera checksum of another seed", "§4.4 verify on read", "reader", _vera_peft, _set("seed", 43)),
    ("vera lambda_b wrong shape", "§2.1 λ_b is (out,)", "reader", VeraFileCase, _tensor("m.q.weight.lambda_b", shape=[5],
                                                                                       raw=f32_bytes([0.0] * 5))),
    ("vera lambda_d missing", "§2.1 tensors: exactly λ_b, λ_d per layer", "reader", VeraFileCase,
     _tensor("h.c.weight.lambda_d", drop=True)),
    ("vera lambda_b NaN", "§2.1 λ_b, λ_d finite", "reader", VeraFileCase,
     _tensor("m.o.weight.lambda_b", raw=struct.pack("<f", float("nan")) * 4)),
    ("vera stored bases, wrong shape", "§4.5", "reader", VeraFileCase,
     lambda c: (c.store_bases(), _tensor("__bases__.B", shape=[5, 9])(c))),
]


def container_cases() -> list[tuple[str, str, bytes]]:
    good = FileCase()
    text = json.dumps(good.header)
    return [
        ("no randlora metadata", "§1 __metadata__.randlora holds the header",
         safetensors_bytes(good.tensors, {"other": "x"})),
        ("randlora metadata not a string", "§1 __metadata__ is string→string", safetensors_bytes(
            good.tensors, None, header_text=json.dumps({"__metadata__": {"randlora": good.header}}))),
        ("trailing bytes", "§1 offsets end at the end of the file", safetensors_bytes(good.tensors, {"randlora": text}) + b"\0"),
        ("duplicate safetensors key", "§1 no duplicate JSON keys", safetensors_bytes(
            good.tensors, None, header_text='{"__metadata__":{"randlora":"{}"},"__metadata__":'
            + json.dumps({"randlora": text}) + "}")),
    ]


def file_vectors() -> list[dict]:
    out = []
    for name, rule, case in valid_cases() + vera_valid_cases():
        out.append({"name": name, "valid": True, "rule": rule, "checked_by": None,
                    "base64": base64.b64encode(case.bytes()).decode()})
    for name, rule, checked_by, factory, mutate in INVALID + VERA_INVALID:
        case = factory()
        mutate(case)
        out.append({"name": name, "valid": False, "rule": rule, "checked_by": checked_by,
                    "base64": base64.b64encode(case.bytes()).decode()})
    for name, rule, blob in container_cases():
        out.append({"name": name, "valid": False, "rule": rule, "checked_by": "container",
                    "base64": base64.b64encode(blob).decode()})
    return out


def golden() -> dict:
    return {"philox4x32_10_kat": kat_vectors(), "basis_elements": element_vectors(), "word_values": word_vectors(),
            "delta_probes": delta_vectors(), "checksums": checksum_vectors(), "peft_bases": peft_vectors(),
            "fingerprints": fingerprint_vectors(), "vera_bases": vera_bases_vectors(),
            "vera_delta_probes": vera_delta_vectors(),
            "note": "produced by spec/reference.py, a scalar reading of SPEC.md (peft bases: torch, per §4.3)"}


def files() -> dict:
    return {"note": "randlora files as base64; checked_by: container | json | schema | reader (SPEC §8)",
            "vectors": file_vectors()}


def main() -> None:
    HERE.mkdir(exist_ok=True)
    (HERE / "golden.json").write_text(json.dumps(golden(), indent=1) + "\n")
    (HERE / "files.json").write_text(json.dumps(files(), indent=1) + "\n")
    print("wrote", HERE / "golden.json", HERE / "files.json")


if __name__ == "__main__":
    main()
