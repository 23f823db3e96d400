"""A second, scalar implementation of SPEC.md Appendix A (DARE keep masks), written from the text alone: plain
Python integers and hashlib, no numpy, no torch, no package imports. ``python spec/dare_reference.py`` rewrites
spec/vectors/dare.json; tests/test_dare_vectors.py checks that it reproduces the file and that the package agrees."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

M64 = (1 << 64) - 1


def start_state(seed: int, input_index: int, key: str) -> int:
    msg = b"randlora/dare-keep/v1\x00" + seed.to_bytes(8, "little") + input_index.to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(msg + key.encode("utf-8"), digest_size=8).digest(), "little")


def word(state: int, i: int) -> int:
    """z of element i: the (i+1)-th SplitMix64 output from ``state``."""
    z = (state + (i + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def keep_bits(seed: int, input_index: int, key: str, count: int, density: float) -> list[int]:
    """1 = kept: u = (z >> 11) · 2⁻⁵³ < density, compared as float64 (exact: u has 53 bits)."""
    state = start_state(seed, input_index, key)
    return [1 if (word(state, i) >> 11) * 2.0 ** -53 < density else 0 for i in range(count)]


def _hex_bits(bits: list[int]) -> str:
    """The bits packed 8 per byte, element 0 in the most significant bit of byte 0, as hex."""
    padded = bits + [0] * (-len(bits) % 8)
    return bytes(int("".join(map(str, padded[j:j + 8])), 2) for j in range(0, len(padded), 8)).hex()


CASES = [  # seed, input index, key, shape, density
    (0, 0, "model.layers.0.self_attn.q_proj.weight", [8, 8], 0.5),
    (0, 1, "model.layers.0.self_attn.q_proj.weight", [8, 8], 0.5),
    (1, 0, "model.layers.0.self_attn.q_proj.weight", [8, 8], 0.5),
    (0, 0, "model.layers.0.self_attn.k_proj.weight", [4, 16], 0.5),
    (7, 2, "lm_head.weight", [3, 5, 7], 0.1),
    (7, 2, "lm_head.weight", [3, 5, 7], 0.9),
    (2 ** 64 - 1, 2 ** 64 - 1, "ü/é.weight", [33], 0.3),
    (12345, 0, "", [1], 1.0),
    (99, 3, "transformer.h.0.attn.c_attn.weight", [0, 4], 0.5),
]


def vectors() -> dict:
    """Appendix A's vectors: per case its start state, the first words' u numerators and the packed keep bits;
    and one 4096-element case's kept count."""
    out = []
    for seed, index, key, shape, density in CASES:
        count = 1
        for d in shape:
            count *= d
        state = start_state(seed, index, key)
        out.append({"seed": str(seed), "input_index": str(index), "key": key, "shape": shape, "density": density,
                    "start_state": "0x%016x" % state,
                    "u53_first": ["0x%014x" % (word(state, i) >> 11) for i in range(min(count, 4))],
                    "keep_bits_hex": _hex_bits(keep_bits(seed, index, key, count, density))})
    big = keep_bits(5, 1, "model.layers.3.mlp.down_proj.weight", 4096, 0.25)
    return {"rule": "SPEC.md Appendix A (randlora/dare-keep/v1)", "cases": out,
            "count_case": {"seed": "5", "input_index": "1", "key": "model.layers.3.mlp.down_proj.weight",
                           "elements": 4096, "density": 0.25, "kept": sum(big),
                           "keep_bits_sha256": hashlib.sha256(_hex_bits(big).encode()).hexdigest()}}


if __name__ == "__main__":
    path = Path(__file__).resolve().parent / "vectors" / "dare.json"
    path.write_text(json.dumps(vectors(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path}")
