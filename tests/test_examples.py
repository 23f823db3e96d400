"""The training examples run end to end (each checks its own result and exits non-zero if it is wrong)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script", ["train_torch_loop.py", "train_with_trainer.py"])
def test_training_example_runs(script, tmp_path):
    out = tmp_path / "adapter.randlora.safetensors"
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--steps", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert out.is_file() and out.stat().st_size < 100_000
