"""Sharded and data-parallel training under ``torchrun`` (2 CPU processes, gloo): DDP, FSDP1 (use_orig_params=True,
and =False with each base Linear wrapped on its own), FSDP2 ``fully_shard``. Every way of saving gives the file a
single process training on the whole batch writes, within float tolerance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_dist_worker import single

from randlora_io.format.adapter import read_adapter

HERE = Path(__file__).parent
EXAMPLES = HERE.parent / "examples"
MODES = "ddp,fsdp1,fsdp1_wrapped,fsdp2"


def torchrun(*args: str, timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` on CPU, offline; fails the test with its stderr's tail."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    torchrun(str(HERE / "train_dist_worker.py"), MODES, str(out))
    single(out)
    return out


@pytest.mark.parametrize("name", ["ddp", "ddp_sd", "fsdp1_summon", "fsdp1_sd", "fsdp1_wrapped_sd", "fsdp2", "fsdp2_sd"])
def test_every_layout_saves_what_one_process_trains(runs, name):
    expected = read_adapter(runs / "single.safetensors")
    got = read_adapter(runs / f"{name}.safetensors")
    assert got.header.layers == expected.header.layers
    assert got.header.base_model["fingerprint"] == expected.header.base_model["fingerprint"]
    assert got.header.bases_sha256 == expected.header.bases_sha256
    for key in expected.lambdas:   # fp32 sums split over two processes, then 3 AdamW steps
        torch.testing.assert_close(got.lambdas[key], expected.lambdas[key], rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(got.gammas[key], expected.gammas[key], rtol=1e-4, atol=2e-5)
    assert any(float(t.abs().max()) > 1e-3 for t in expected.lambdas.values())   # it did train


def test_saving_sharded_parameters_outside_summon_full_params_says_how(runs):
    message = json.loads((runs / "notes.json").read_text())["fsdp1"]["outside"]
    assert "summon_full_params" in message and "state_dict=" in message and "q_proj" in message


class _CallWrapper(torch.nn.Module):
    """Stands in for FSDP1 wrapping a base Linear on its own: the weight is only to be used through its forward."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_base_wrapped_after_attach_is_called_not_read(dropout):
    from randlora_io.train import RandloraConfig
    from randlora_io.train import attach

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 12))
        handle = attach(model, RandloraConfig(r=4, target_modules=["0", "2"], dropout=dropout))
        with torch.no_grad():
            for i, p in enumerate(handle.parameters()):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        return model, handle

    results = []
    for wrap in (False, True):
        model, handle = build()
        if wrap:
            for layer in handle.layers.values():
                layer.base_layer = _CallWrapper(layer.base_layer)
        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3), requires_grad=True)
        torch.manual_seed(1)   # the same dropout mask
        y = model(x)
        y.square().sum().backward()
        results.append([y.detach(), x.grad] + [p.grad for p in handle.parameters()])
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_the_ddp_example_runs_under_torchrun(tmp_path):
    out = tmp_path / "ddp.randlora.safetensors"
    result = torchrun(str(EXAMPLES / "train_ddp.py"), "--steps", "6", "--out", str(out), cwd=tmp_path)
    assert "the same adapter on all 2 ranks: True" in result.stdout, result.stdout
    assert out.is_file() and read_adapter(out).header.rank == 8


def test_cli_train_under_torchrun_equals_one_process_with_the_whole_batch(llama_dir, tmp_path):
    from conftest import run_cli
    from test_train_cli import pattern_data

    data = pattern_data(tmp_path / "d.jsonl")
    args = ["train", str(llama_dir), str(data), "--basis-rank", "4", "--steps", "3", "--seq-len", "16"]
    result = torchrun("-m", "randlora_io", *args, "-o", str(tmp_path / "ddp.safetensors"), "--batch-size", "2",
                      cwd=tmp_path)
    assert result.stdout.count("trained 3 steps") == 1, result.stdout        # one summary for the job
    run_cli(*args, "-o", tmp_path / "one.safetensors", "--batch-size", "4")
    ddp, one = read_adapter(tmp_path / "ddp.safetensors"), read_adapter(tmp_path / "one.safetensors")
    for key in one.lambdas:
        torch.testing.assert_close(ddp.lambdas[key], one.lambdas[key], rtol=1e-4, atol=2e-6)
        torch.testing.assert_close(ddp.gammas[key], one.gammas[key], rtol=1e-4, atol=2e-6)
