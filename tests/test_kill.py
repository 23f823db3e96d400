"""A merge killed at any point (SIGTERM as sent by timeout/SLURM/Kubernetes, or SIGKILL) leaves OUT absent or
complete, and a re-run succeeds and leaves no temp folder behind."""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from randlora_io.format.adapter import build_adapter, write_adapter
from randlora_io.format.spec import GeneratorSpec

ROOT = Path(__file__).resolve().parents[1]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A 4-shard fp32 checkpoint (~50 MB) with 16 adapted 384×384 weights, a dense randlora adapter for it, and the
    output of one uninterrupted merge (the reference)."""
    root = tmp_path_factory.mktemp("kill")
    base = root / "base"
    base.mkdir()
    gen = torch.Generator().manual_seed(0)
    weight_map, shapes = {}, {}
    for s in range(4):
        shard = f"model-{s + 1:05d}-of-00004.safetensors"
        tensors = {}
        for i in range(4):
            key = f"model.layers.{4 * s + i}.proj.weight"
            tensors[key] = torch.randn(384, 384, generator=gen)
            shapes[key] = (384, 384)
        tensors[f"model.layers.{4 * s}.filler"] = torch.randn(2_500_000, generator=gen)
        save_file(tensors, str(base / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})
    (base / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": %s}' % str(weight_map).replace("'", '"'))
    (base / "config.json").write_text('{"model_type": "llama"}')
    r = 16
    n = -(-384 // r)
    adapter = build_adapter(generator=GeneratorSpec(name="philox", kind="dense", seed=1), rank=r, alpha=32.0,
                            layers={k: (shape, False) for k, shape in shapes.items()},
                            lambdas={k: torch.randn(r, n, generator=gen) for k in shapes},
                            gammas={k: torch.randn(n, 384, generator=gen) for k in shapes})
    write_adapter(adapter, root / "a.safetensors")
    ref = root / "ref"
    subprocess.run([sys.executable, "-m", "randlora_io", "merge", str(base), str(root / "a.safetensors"), "-o",
                    str(ref)], check=True, cwd=ROOT, capture_output=True)
    return root, base, _digest(ref)


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("sig, seed", [(signal.SIGTERM, 0), (signal.SIGTERM, 1), (signal.SIGKILL, 3),
                                       (signal.SIGKILL, 4)])
def test_killed_merge_leaves_out_absent_or_complete(work, tmp_path, sig, seed):
    root, base, reference = work
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "randlora_io", "merge", str(base), str(root / "a.safetensors"), "-o", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # a random point while the output is being written (imports take seconds on a busy machine: wait for the temp
    # output to appear first), or after OUT appeared
    while proc.poll() is None and not _temps(tmp_path) and not out.exists():
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 0.4))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM and proc.returncode not in (0,):
        assert proc.returncode in (143, -signal.SIGTERM), (proc.returncode, err)
        if proc.returncode == 143:
            assert err.decode().strip().count("\n") == 0 and "Traceback" not in err.decode(), err
        assert not _temps(tmp_path), _temps(tmp_path)  # SIGTERM cleans up after itself
    if out.exists():
        assert _digest(out) == reference  # complete, and the merge it should be
    else:
        rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)  # removes stale temps, succeeds
        assert rerun.returncode == 0, rerun.stderr
        assert _digest(out) == reference
    assert not _temps(tmp_path), _temps(tmp_path)
