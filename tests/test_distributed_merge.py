"""``torchrun --nproc_per_node 2 -m randlora_io merge``: two CPU processes (gloo) share the shards by bytes and write
the same bytes as one process; a failure in either leaves no OUT and no temp dir, reported once by rank 0."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file
from tiny_models import peft_randlora, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _files(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir()) if f.is_file()}


def _torchrun(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "randlora_io", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny Llama in 5+ shards and a PEFT RandLoRA adapter for it."""
    root = tmp_path_factory.mktemp("dist")
    tiny_llama(layers=3).save_pretrained(root / "base", max_shard_size="60KB")
    peft_randlora(tiny_llama(layers=3), r=6, seed=3).save_pretrained(root / "peft")
    assert len(list((root / "base").glob("*.safetensors"))) >= 4
    return root


def test_two_processes_write_the_same_bytes_as_one(sharded, tmp_path):
    run_cli("merge", sharded / "base", sharded / "peft", "-o", tmp_path / "single")
    proc = _torchrun("merge", str(sharded / "base"), str(sharded / "peft"), "-o", str(tmp_path / "shared"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(tmp_path / "shared") == _files(tmp_path / "single")
    assert proc.stdout.count("2 processes") == 1, proc.stdout  # one closing line, from rank 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shared")]


def test_a_failure_in_one_process_fails_all_and_leaves_nothing(sharded, tmp_path):
    """A NaN in a weight of the last shard (rank 0 takes the largest shards first, so its owner varies): every
    process fails, OUT never appears, the temp dir is gone, and the reason is printed once."""
    from randlora_io.sources.dense import METADATA_KEY

    index = json.loads((sharded / "base" / "model.safetensors.index.json").read_text())
    proj = {s: k for k, s in sorted(index["weight_map"].items(), reverse=True) if k.endswith("proj.weight")}
    from randlora_io.merge.distributed import share_out

    split = share_out({s: (sharded / "base" / s).stat().st_size for s in sorted(set(index["weight_map"].values()))}, 2)
    picks = [next(s for s in split[rank] if s in proj) for rank in (0, 1)]  # one shard owned by each rank
    for shard in picks:
        key = proj[shard]
        base_weight = load_file(sharded / "base" / shard)[key]
        bad = tmp_path / f"bad-{shard}.safetensors"
        save_file({key: torch.full_like(base_weight, 3e38)}, str(bad),
                  metadata={METADATA_KEY: json.dumps({"format_version": "1.0"})})
        out = tmp_path / f"out-{shard}"
        proc = _torchrun("merge", str(sharded / "base"), str(bad), "-o", str(out), "--weight", "2")
        assert proc.returncode != 0
        assert proc.stderr.count("randlora-io: error:") == 1, proc.stderr[-3000:]
        assert "nan" in proc.stderr.lower() and key in proc.stderr
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]
