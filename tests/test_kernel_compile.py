"""The Triton kernels compile for real NVIDIA targets (sm_80, sm_90) on a CPU-only machine, for every autotune
config, and ptxas is happy with what they become: tensor-core instructions (mma.sync / wgmma) for the tensor-core
precisions, no local-memory spills, shared memory within the target's limit.

All variants are compiled once per session (module-scoped fixture), both targets in parallel subprocesses without
``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions): 32 variants in 70–140 s on two busy cores
with an empty Triton cache, 30–40 s when its on-disk cache already holds them (ptxas is then re-run for the stats).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from randlora_io.kernels.compile_check import SHARED_LIMIT, Result, problems, variants
from randlora_io.kernels.merge_triton import PRECISIONS, configs_for

TARGETS = (80, 90)


@pytest.fixture(scope="module")
def compiled() -> dict[int, list[Result]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    procs = {t: subprocess.Popen([sys.executable, "-m", "randlora_io.kernels.compile_check", "--targets", str(t)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for t in TARGETS}
    out = {}
    for target, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-3000:]
        out[target] = [Result(**r) for r in json.loads(stdout)]
    print(f"compiled {sum(map(len, out.values()))} kernel variants in {time.perf_counter() - start:.1f} s")
    return out


def check_target(results: list[Result], target: int) -> None:
    names = [r.variant for r in results]
    assert names == [v.name for v in variants(target)]  # nothing skipped
    for cfg in configs_for(target, "split"):             # every autotune config is among them
        tile = f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_D']}x{cfg.kwargs['BLOCK_K']} w{cfg.num_warps}"
        assert any(tile in n and "gen-dense" in n for n in names) and any(tile in n and "loaded" in n for n in names)
    assert {p for p in PRECISIONS} <= {n.split()[2] for n in names if n.startswith("merge")}
    failures = {r.variant: problems(r) for r in results if problems(r)}
    assert not failures, json.dumps(failures, indent=1)
    for r in results:
        assert r.spill_stores == 0 and r.registers > 0 and r.shared <= SHARED_LIMIT[target]


def test_merge_kernel_compiles_for_sm80(compiled):
    check_target(compiled[80], 80)
    assert all(r.mma and not r.wgmma for r in compiled[80] if r.tensor_cores_expected)


def test_merge_kernel_compiles_for_sm90(compiled):
    check_target(compiled[90], 90)
    assert all(r.wgmma for r in compiled[90] if r.tensor_cores_expected)


def test_ieee_precision_stays_off_tensor_cores(compiled):
    """``ieee`` is the float32-FMA path: if it silently used tensor cores it would be TF32, not IEEE."""
    for target in TARGETS:
        ieee = [r for r in compiled[target] if " ieee " in r.variant]
        assert ieee and not any(r.mma for r in ieee)


def test_problems_flags_what_a_bad_build_looks_like():
    """The checker itself: a spill, a missing wgmma and too much shared memory are each reported."""
    bad = Result(90, "merge x", True, ok=True, mma=True, wgmma=False, shared=SHARED_LIMIT[90] + 1, registers=255,
                 spill_stores=8, spill_loads=4)
    found = " ".join(problems(bad))
    assert "spills" in found and "wgmma" in found and "shared memory" in found
    assert problems(Result(80, "merge y", True, ok=False, error="PTXASError: boom")) == [
        "does not compile: PTXASError: boom"]
