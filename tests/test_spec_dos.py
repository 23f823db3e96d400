"""Tiny files must not make the reader allocate gigabytes (issue #16, SPEC §2 bases and §4.6 budget): min_dim/max_dim
must be what the layers imply, zero-size layers are refused, and bases above the budget are refused before any
allocation, with one line that names the file and how to raise the budget."""

from __future__ import annotations

import json
import resource
import time

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import save_file

from randlora_io.format.adapter import peft_shared_dims, read_adapter
from randlora_io.format.basis import BASES_BUDGET_ENV, bases_nbytes, generate_bases
from randlora_io.errors import AdapterShapeError, BasesTooLargeError, HeaderError, RandloraError
from randlora_io.format.spec import GeneratorSpec


def _big_layer_file(path, dim: int, rank: int, sha: bool = False) -> None:
    """A consistent header for one (dim, dim) layer at rank ``rank`` (n = 1): a small file, huge bases."""
    n = -(-dim // rank)
    header = {"format": "randlora", "format_version": "1.1", "generator": {"name": "philox", "kind": "dense"},
              "seed": 1, "rank": rank, "alpha": 1.0, "bases": {"min_dim": dim, "max_dim": dim},
              "layers": {"w.weight": {"shape": [dim, dim], "fan_in_fan_out": False, "num_bases": n, "dtype": "float32"}}}
    if sha:
        header["bases"]["sha256"] = "0" * 64
    save_file({"w.weight.lambda": torch.zeros(rank, n), "w.weight.gamma": torch.zeros(n, dim)}, str(path),
              metadata={"randlora": json.dumps(header)})


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("sha", [False, True])
def test_huge_bases_are_refused_before_allocating(tmp_path, sha):
    path = tmp_path / "dos.safetensors"
    _big_layer_file(path, 45000, 45000, sha=sha)  # A and B: 2 × 45000² float32 ≈ 16 GB; the file is 360 KB
    assert path.stat().st_size < 400_000
    rss0, t0 = _peak_rss_mib(), time.monotonic()
    with pytest.raises(BasesTooLargeError, match=BASES_BUDGET_ENV):
        read_adapter(path)
    for command in ("validate", "inspect"):
        assert_one_line_error(run_cli(command, path, check=False), "dos.safetensors", BASES_BUDGET_ENV)
    assert time.monotonic() - t0 < 20 and _peak_rss_mib() - rss0 < 200


def test_budget_is_raised_by_the_parameter_and_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "mid.safetensors"
    _big_layer_file(path, 300, 4)  # A 4×300, B 300×300: 364,800 bytes
    assert bases_nbytes(4, 300, 300) == 4 * (4 * 300 + 300 * 300)
    monkeypatch.setenv(BASES_BUDGET_ENV, "100000")
    with pytest.raises(BasesTooLargeError, match="mid.safetensors"):
        read_adapter(path)
    assert read_adapter(path, max_bases_bytes=10**6).bases() is not None
    monkeypatch.setenv(BASES_BUDGET_ENV, "1000000")
    read_adapter(path).bases()
    monkeypatch.setenv(BASES_BUDGET_ENV, "lots")
    with pytest.raises(RandloraError, match=BASES_BUDGET_ENV):
        read_adapter(path)


def test_generate_bases_checks_the_budget_and_sizes_itself():
    gen = GeneratorSpec(name="philox", kind="dense", seed=0)
    with pytest.raises(BasesTooLargeError):
        generate_bases(gen, 1, 45000, 45000)
    with pytest.raises(BasesTooLargeError, match="^src.safetensors: .*RANDLORA_IO_MAX_BASES_BYTES"):
        generate_bases(gen, 1, 64, 64, max_bytes=100, source="src.safetensors")
    for r, lo, hi in ((1, 0, 5), (0, 4, 5), (5, 4, 5), (1, 6, 5)):
        with pytest.raises(HeaderError):
            generate_bases(gen, r, lo, hi)


def test_zero_size_layers_are_refused():
    with pytest.raises(AdapterShapeError, match="zero"):
        peft_shared_dims([((0, 45000), False), ((16, 16), False)])
    with pytest.raises(AdapterShapeError, match="zero"):
        peft_shared_dims([((16, 0), True)])
    assert peft_shared_dims([((96, 64), False), ((64, 96), False)]) == (96, 96)
