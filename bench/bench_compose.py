"""Composing K = 3 RandLoRA adapters by TIES into a Llama-shaped bf16 checkpoint: randlora-io's streaming
``merge --method ties`` vs what people do today, "PEFT merge each adapter, then mergekit ties over the merged
models" (each PEFT merge: from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained; then
mergekit 0.1.5's ``run_merge`` on CPU). Every step runs in its own process.

It prints, per side, the end-to-end wall time, the peak RSS of its largest step and the peak disk it needed beyond
the inputs (ours: OUT; theirs: the K merged models + OUT), then the ratios. Goal (#26): ≥ 3× faster end to end with
≤ 1/3 of the peak disk and RSS. The sides alternate across ``--repeat`` runs; min and median are reported.

Run: python bench/bench_compose.py [--size 1b|small] [--method ties] [--density 50] [--repeat N] [--workdir DIR]
(--density in percent). The checkpoint and the adapters (dense, sparse, very_sparse: three different bases) are
bench_merge_cpu.py's.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge_cpu import build_adapters, build_base  # noqa: E402
from common import bench_args, dir_bytes, machine_line, report_self, run_worker, workdir  # noqa: E402

KINDS = ("dense", "sparse", "very_sparse")


def worker(step: str, work: Path, method: str, density: float) -> None:
    import torch

    start = time.perf_counter()
    if step == "ours":
        from randlora_io.merge.plan import merge

        out = work / "out-ours"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        merge(work / "base", [work / f"adapter-{k}.safetensors" for k in KINDS], out, device="cpu", method=method,
              density=density)
    elif step.startswith("peft-"):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        kind = step.removeprefix("peft-")
        model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, work / f"peft-{kind}").merge_and_unload()
        model.save_pretrained(work / f"merged-{kind}", max_shard_size="400MB")
    else:  # mergekit over the merged models
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        config = MergeConfiguration.model_validate({
            "merge_method": method, "base_model": str(work / "base"), "dtype": "bfloat16",
            "models": [{"model": str(work / f"merged-{k}"), "parameters": {"weight": 1.0, "density": density}}
                       for k in KINDS]})
        run_merge(config, str(work / "out-mergekit"), MergeOptions(cuda=False, copy_tokenizer=False,
                                                                     write_model_card=False, lazy_unpickle=True,
                                                                     quiet=True))
    report_self(inner_s=time.perf_counter() - start)


def _ours(script: str, work: Path, args) -> tuple[float, float, int]:
    res = run_worker(script, "ours", "--workdir", str(work), "--method", args.method, "--density", str(args.density))
    disk = dir_bytes(work / "out-ours", "*")
    shutil.rmtree(work / "out-ours", ignore_errors=True)
    return res["wall_s"], res["peak_rss_mib"], disk


def _theirs(script: str, work: Path, args) -> tuple[float, float, int]:
    wall, rss = 0.0, 0.0
    for step in [f"peft-{k}" for k in KINDS] + ["mergekit"]:
        res = run_worker(script, step, "--workdir", str(work), "--method", args.method,
                         "--density", str(args.density))
        wall, rss = wall + res["wall_s"], max(rss, res["peak_rss_mib"])
    disk = sum(dir_bytes(work / f"merged-{k}", "*") for k in KINDS) + dir_bytes(work / "out-mergekit", "*")
    for name in [f"merged-{k}" for k in KINDS] + ["out-mergekit"]:
        shutil.rmtree(work / name, ignore_errors=True)
    return wall, rss, disk


def main() -> None:
    args = bench_args(choices={"size": ("1b", "small"), "method": ("ties", "dare_ties", "breadcrumbs_ties")},
                      density=50, repeat=1, rank=32)
    density = args.density / 100
    if args.worker == "build":
        return build_adapters(Path(args.workdir), build_base(Path(args.workdir), args.size, 0), args.rank,
                              list(KINDS))
    if args.worker:
        return worker(args.worker, Path(args.workdir), args.method, density)  # workers get percent too
    with workdir(args.workdir, "bench-compose-") as work:
        if not (work / "base" / "config.json").exists():
            subprocess.run([sys.executable, __file__, "--worker", "build", "--workdir", str(work), "--size",
                            args.size, "--rank", str(args.rank)], check=True)
        print(machine_line())
        print(f"K = {len(KINDS)} adapters ({', '.join(KINDS)}), --method {args.method} --density {density:g}; "
              f"base {dir_bytes(work / 'base', '*.safetensors') / 2**20:.0f} MiB")
        sides = {"ours": [], "theirs": []}
        for run in range(args.repeat):
            order = ("ours", "theirs") if run % 2 == 0 else ("theirs", "ours")
            for side in order:
                runner = _ours if side == "ours" else _theirs
                wall, rss, disk = runner(__file__, work, args)
                sides[side].append((wall, rss, disk))
                label = ("randlora-io merge --method" if side == "ours" else "PEFT merge ×3 + mergekit")
                print(f"run {run + 1}: {label:28s} wall {wall:7.1f} s   peak RSS {rss:7.0f} MiB   "
                      f"peak disk {disk / 2**20:7.0f} MiB")
        for what, i in (("wall", 0), ("peak RSS", 1), ("peak disk", 2)):
            ours, theirs = [s[i] for s in sides["ours"]], [s[i] for s in sides["theirs"]]
            ratio = [t / o for o, t in zip(ours, theirs)]
            print(f"{what:9s} theirs/ours: min {min(ratio):.2f}x  median {statistics.median(ratio):.2f}x")


if __name__ == "__main__":
    main()
