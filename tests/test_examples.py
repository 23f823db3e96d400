"""The training examples run end to end (each checks its own result and exits non-zero if it is wrong), and the GPU
benchmark harness runs its smoke mode on CPU (so a GPU session only has to run it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script", ["train_torch_loop.py", "train_with_trainer.py"])
def test_training_example_runs(script, tmp_path):
    out = tmp_path / "adapter.randlora.safetensors"
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--steps", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert out.is_file() and out.stat().st_size < 100_000


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is the CPU interpreter run")
def test_gpu_bench_smoke_mode_runs(tmp_path):
    script = EXAMPLES.parent / "bench" / "bench_merge_gpu.py"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    methods = ["kernel, B drawn in-kernel", "kernel, B loaded", "bare addmm_ (bf16)", "PEFT merge"]
    rows = [line for line in proc.stdout.splitlines() if any(m in line for m in methods)]
    assert len(rows) == 8, proc.stdout
    checks = [float(line.rsplit("=", 1)[1]) for line in proc.stdout.splitlines() if "check:" in line]
    assert len(checks) == 2 and max(checks) <= 1.0, proc.stdout  # kernel within one bf16 rounding of the oracle
