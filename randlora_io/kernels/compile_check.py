"""Compile the Triton kernels for real NVIDIA targets on a machine without a GPU, and report what ptxas made of them.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the whole pipeline down to a cubin with the
ptxas the triton wheel ships; no driver is needed. For each (target, kernel variant, config) the report says whether it
compiled, whether tensor-core instructions are in the PTX (``mma.sync`` on sm_80, ``wgmma`` on sm_90), the shared
memory it needs, and ptxas's register / spill / stack figures (ptxas ``-v`` run again on the PTX).

This must run with ``TRITON_INTERPRET`` unset (the interpreter replaces ``@triton.jit`` functions at import), so the
tests call it in a subprocess::

    python -m randlora_io.kernels.compile_check --targets 80 90 > report.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory one block may use (A100: 163 KiB, H100: 227 KiB)

_MERGE_SIG = {
    "w_ptr": "*bf16", "stride_wm": "i32", "stride_wd": "i32", "ub_ptr": "*fp32", "stride_um": "i32",
    "stride_uk": "i32", "lam_ptr": "*fp32", "gam_ptr": "*fp32", "a_ptr": "*fp32", "stride_a": "i32", "M": "i32",
    "D": "i32", "K": "i32", "n": "i32", "scaling": "fp32", "seed_lo": "i32", "seed_hi": "i32", "lo_cut": "i64",
    "hi_cut": "i64",
}
_PHILOX_SIG = {"out_ptr": "*fp32", "rows": "i32", "cols": "i32", "row0": "i32", "col0": "i32", "seed_lo": "i32",
               "seed_hi": "i32", "lo_cut": "i64", "hi_cut": "i64"}


@dataclass
class Variant:
    """One kernel specialisation: which kernel, its constexprs, its launch options, its weight dtype."""

    kernel: str                 # "merge" or "philox_block"
    constexprs: dict
    num_warps: int
    num_stages: int
    w_dtype: str = "bf16"
    w_transposed: bool = False  # W's (M, D) view is a transpose (out < in, or a Conv1D weight)

    @property
    def name(self) -> str:
        c = self.constexprs
        if self.kernel == "philox_block":
            return f"philox_block KIND={c['KIND']}"
        src = f"gen-{'dense' if c['KIND'] == 0 else 'ternary'}" if c["GENERATE"] else "loaded"
        return (f"merge {src} {c['PRECISION']} U_LIMBS={c['U_LIMBS']} w={self.w_dtype} "
                f"{'Wt ' if self.w_transposed else ''}{c['BLOCK_M']}x{c['BLOCK_D']}x{c['BLOCK_K']} "
                f"w{self.num_warps} s{self.num_stages}")

    @property
    def tensor_cores(self) -> bool:
        from .merge_triton import TENSOR_CORE_PRECISIONS

        return self.kernel == "merge" and self.constexprs["PRECISION"] in TENSOR_CORE_PRECISIONS


@dataclass
class Result:
    target: int
    variant: str
    tensor_cores_expected: bool
    ok: bool
    error: str = ""
    seconds: float = 0.0
    mma: bool = False
    wgmma: bool = False
    shared: int = 0
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1


def variants(target: int) -> list[Variant]:
    """What to compile for ``target``: every autotune config of :func:`merge_triton.configs_for` with the default
    ``split`` precision for loaded exact-bf16 bases (3 MMAs) and in-kernel dense philox bases (6 MMAs); on the first
    config also in-kernel ternary bases, loaded non-bf16 bases, a transposed weight, a float32 weight (the CLI merge
    adds into float32) and each other precision (``ieee`` on its own config); and the philox block kernel."""
    from .merge_triton import PRECISIONS, configs_for

    base = {"GENERATE": False, "KIND": 0, "PRECISION": "split", "U_LIMBS": 1, "EMULATE": False}
    gen_dense = dict(base, GENERATE=True, U_LIMBS=3)
    out = [Variant("merge", {**src, **cfg.kwargs}, cfg.num_warps, cfg.num_stages)
           for cfg in configs_for(target, "split") for src in (base, gen_dense)]
    first = configs_for(target, "split")[0]

    def on_first(constexprs: dict, **kw) -> Variant:
        return Variant("merge", {**constexprs, **first.kwargs}, first.num_warps, first.num_stages, **kw)

    out += [on_first(dict(base, GENERATE=True, KIND=1)), on_first(dict(base, U_LIMBS=3)),
            on_first(base, w_transposed=True), on_first(base, w_dtype="fp32")]
    for precision in PRECISIONS:
        if precision != "split":
            cfg = configs_for(target, precision)[0]
            out.append(Variant("merge", {**base, "PRECISION": precision, **cfg.kwargs}, cfg.num_warps,
                               cfg.num_stages))
    for kind in (0, 1):
        out.append(Variant("philox_block", {"MATRIX": 1, "KIND": kind, "BLOCK_R": 16, "BLOCK_C": 16}, 4, 1))
    return out


def _ptxas_stats(ptx: str, target: int) -> dict:
    """Registers, spill bytes and stack frame of the PTX's kernel, from ``ptxas -v`` of the wheel's ptxas with Triton's
    flags (used when Triton took the kernel from its cache and ran no ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(target).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(target)}", src,
                               "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True)
    return _parse_ptxas_log(proc.stdout + proc.stderr)


def _parse_ptxas_log(log: str) -> dict:
    """Registers, spill bytes and stack frame from a ``ptxas -v`` log (-1 where absent)."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_stores": int(spills.group(1)) if spills else -1,
            "spill_loads": int(spills.group(2)) if spills else -1,
            "stack": int(stack.group(1)) if stack else -1}


def compile_one(variant: Variant, target: int) -> Result:
    """Compile one variant for ``cuda`` compute capability ``target`` (80, 90) and inspect the result."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import merge_triton

    constexprs = dict(variant.constexprs)
    if variant.kernel == "merge":
        fn, sig = merge_triton._merge_kernel, dict(_MERGE_SIG, w_ptr=f"*{variant.w_dtype}")
        # what the JIT specialises at a typical launch: unit strides become constants, 16-divisible pointers and
        # sizes get divisibility hints (a (M, D) weight with D = in_features, or its transpose; B row-major)
        unit = "stride_wm" if variant.w_transposed else "stride_wd"
        constexprs.update({unit: 1, "stride_uk": 1})
        aligned = ["w_ptr", "ub_ptr", "lam_ptr", "gam_ptr", "a_ptr", "stride_um", "stride_a", "M", "D", "K",
                   "stride_wd" if variant.w_transposed else "stride_wm"]
    else:
        fn, sig = merge_triton._philox_block_kernel, dict(_PHILOX_SIG)
        aligned = ["out_ptr"]
    sig.update({k: "constexpr" for k in constexprs})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    res = Result(target, variant.name, variant.tensor_cores, ok=False)
    start = time.perf_counter()
    try:
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints its own ptxas -v log (TRITON_DUMP_PTXAS_LOG)
            compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", target, 32),
                                      options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
        ptx = compiled.asm["ptx"]
        res.ok = True
        res.wgmma = "wgmma.mma_async" in ptx
        res.mma = res.wgmma or re.search(r"\bmma\.sync", ptx) is not None
        res.shared = int(compiled.metadata.shared)
        stats = _parse_ptxas_log(log.getvalue())
        if stats["registers"] < 0 or stats["spill_stores"] < 0:   # taken from Triton's cache: no ptxas ran
            stats = _ptxas_stats(ptx, target)
        for key, value in stats.items():
            setattr(res, key, value)
    except Exception as exc:  # noqa: BLE001 - reported, the test fails on it
        res.error = f"{type(exc).__name__}: {str(exc)[:2000]}"
    res.seconds = round(time.perf_counter() - start, 2)
    return res


def problems(res: Result) -> list[str]:
    """What is wrong with one compiled variant (empty when it passes every check)."""
    if not res.ok:
        return [f"does not compile: {res.error}"]
    out = []
    if res.tensor_cores_expected and not res.mma:
        out.append("no tensor-core instruction (mma/wgmma) in the PTX")
    if res.target >= 90 and res.tensor_cores_expected and not res.wgmma:
        out.append("sm_90 build without wgmma")
    if res.spill_stores != 0 or res.spill_loads != 0:
        out.append(f"local-memory spills: {res.spill_stores} B stores, {res.spill_loads} B loads")
    if res.shared > SHARED_LIMIT[res.target]:
        out.append(f"shared memory {res.shared} B > the sm_{res.target} limit {SHARED_LIMIT[res.target]} B")
    return out


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the kernels)", file=sys.stderr)
        return 2
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"   # one ptxas run per variant: its -v log is printed, parsed here
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=int, nargs="+", default=[80, 90])
    args = p.parse_args(argv)
    results = [compile_one(v, t) for t in args.targets for v in variants(t)]
    json.dump([asdict(r) for r in results], sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
