"""Test setup: Triton's interpreter on CPU-only machines (must be set before triton is imported), quiet warnings,
and fixtures that build tiny models and PEFT adapters in code."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(min(2, torch.get_num_threads()))

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]

import pytest  # noqa: E402

from tiny_models import tiny_llama  # noqa: E402


@pytest.fixture
def llama_dir(tmp_path):
    """A tiny fp32 Llama saved as a HF dir (one model.safetensors + config)."""
    model = tiny_llama()
    path = tmp_path / "base"
    model.save_pretrained(path)
    return path


def run_cli(*args: str, check: bool = True):
    """Invoke the CLI in-process through click's runner; returns the Result (stdout, stderr, exit_code)."""
    from click.testing import CliRunner

    from randlora_io.cli.main import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if check and result.exit_code != 0:
        raise AssertionError(f"CLI failed ({result.exit_code}): {result.output} {result.stderr}")
    return result


def assert_one_line_error(result, *fragments: str) -> None:
    """The CLI error contract: non-zero exit, exactly one line on stderr, no traceback, naming what is wrong."""
    assert result.exit_code not in (0, None), result.output
    err = result.stderr.strip()
    assert err.startswith("randlora-io: error:"), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment.lower() in err.lower(), (fragment, err)


def merge_refusal(base, adapter, out) -> str:
    """``randlora-io merge BASE ADAPTER -o OUT`` must fail by the one-line error contract and write nothing; returns
    the error line (stderr, stripped) for a word-for-word check."""
    result = run_cli("merge", base, adapter, "-o", out, check=False)
    assert_one_line_error(result)
    assert not Path(out).exists()
    return result.stderr.strip()
