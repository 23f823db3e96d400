"""Training: the paper's central claim at small scale, and the cost of a training step.

Part 1 (claim): a teacher-student task whose target update is full rank. A frozen 2-layer MLP (D×D layers) must learn
ΔW* = c·Q per layer (Q random orthogonal: full rank, flat spectrum). randlora-io's RandLoRA (r = 32) is trained against
PEFT LoRA with at least as many trainable parameters, and PEFT RandLoRA, same data, steps and optimiser; the final
relative error ‖f(x) − f*(x)‖² / ‖f*(x)‖² is printed. A Gaussian ΔW* (full rank but with a few dominant directions)
is printed too, as the honest counter-case.

Part 2 (cost): a Llama built in code (h=512, 4 layers, all 7 projections), batch 4×256 tokens: randlora-io RandLoRA
vs PEFT RandLoRA at the same r, and PEFT LoRA at equal trainable parameters, each in its own process: median step
time, the bytes autograd saves for backward (activation memory), and peak RSS; without and with gradient
checkpointing, ``--repeats`` rounds with the methods' order rotated each round, min / median of the speed ratios.
The ratios of each run's fastest step are printed too: on a shared machine another process's burst inflates a
run's median, while its fastest step is the least disturbed.

Run: python bench/bench_train.py [--steps 600] [--threads 2] [--part 1|2|all] [--repeats 3] [--measured-steps 5]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, report_self, run_worker  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------------------- part 1

def mlp(dim: int):
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    torch.manual_seed(0)
    return MLP()


def randlora_params(dim: int, r: int) -> int:
    n = -(-dim // r)
    return r * n + n * dim


def claim(dim: int, r: int, steps: int, target: str) -> dict:
    import torch
    from peft import LoraConfig, RandLoraConfig, get_peft_model

    from randlora_io.train import RandloraConfig
    from randlora_io.train import attach

    gen = torch.Generator().manual_seed(42)
    teacher = mlp(dim)
    with torch.no_grad():
        for lin in (teacher.fc1, teacher.fc2):
            if target == "orthogonal":
                q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
                lin.weight += 0.5 * q
            else:
                lin.weight += 0.5 * torch.randn(dim, dim, generator=gen) / math.sqrt(dim)
    per_layer = randlora_params(dim, r)
    k = -(-per_layer // (2 * dim))                              # LoRA rank with ≥ RandLoRA's parameters
    rows = {}
    for name in ("randlora-io RandLoRA", "PEFT RandLoRA", "PEFT LoRA"):
        student = mlp(dim)
        if name == "randlora-io RandLoRA":
            params = attach(student, RandloraConfig(r=r, alpha=r, target_modules=["fc1", "fc2"])).parameters()
            model = student
        elif name == "PEFT RandLoRA":
            model = get_peft_model(student, RandLoraConfig(r=r, randlora_alpha=r, target_modules=["fc1", "fc2"]))
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            model = get_peft_model(student, LoraConfig(r=k, lora_alpha=k, target_modules=["fc1", "fc2"]))
            params = [p for p in model.parameters() if p.requires_grad]
        best = None
        for lr in (3e-3, 1e-2, 3e-2):                            # each method gets its best of three rates
            with torch.no_grad():
                init = [p.detach().clone() for p in params]
            opt = torch.optim.Adam(params, lr=lr)
            data = torch.Generator().manual_seed(1)
            for _ in range(steps):
                x = torch.randn(256, dim, generator=data)
                with torch.no_grad():
                    y = teacher(x)
                loss = (model(x) - y).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            x = torch.randn(4096, dim, generator=torch.Generator().manual_seed(7))
            with torch.no_grad():
                y = teacher(x)
                base = (mlp(dim)(x) - y).pow(2).sum()
                err = float((model(x) - y).pow(2).sum() / base)
            best = min(best or (err, lr), (err, lr))
            with torch.no_grad():
                for p, p0 in zip(params, init):
                    p.copy_(p0)
        rows[name] = {"params": sum(p.numel() for p in params), "error": best[0], "lr": best[1]}
    return {"target": target, "dim": dim, "r": r, "lora_k": k, "rows": rows}


# ---------------------------------------------------------------------------------------------------------- part 2

def worker(method: str, hidden: int, layers: int, r: int, lora_k: int, batch: int, seq: int, steps: int,
           threads: int, checkpointing: bool = False) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=4096)
    model = LlamaForCausalLM(config)
    if method == "ours":
        from randlora_io.train import RandloraConfig
        from randlora_io.train import attach

        handle = attach(model, RandloraConfig(r=r, target_modules=TARGETS))
        params, shared = handle.parameters(), [handle.shared.on("cpu").A, handle.shared.on("cpu").B]
    else:
        from peft import LoraConfig, RandLoraConfig, get_peft_model

        cfg = (RandLoraConfig(r=r, randlora_alpha=20 * r, target_modules=TARGETS) if method == "peft-randlora"
               else LoraConfig(r=lora_k, lora_alpha=2 * lora_k, target_modules=TARGETS))
        model = get_peft_model(model, cfg)
        params, shared = [p for p in model.parameters() if p.requires_grad], []
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    # storage that exists anyway (weights, buffers, shared bases) is not activation memory
    static = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *shared]}
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, 4096, (batch, seq), generator=torch.Generator().manual_seed(0))
    times, saved_bytes = [], 0
    for step in range(steps + 2):
        seen: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in static:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        start = time.perf_counter()
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=ids, labels=ids).loss
            saved_bytes = sum(seen.values())
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - start)
    report_self(step_s=statistics.median(times), step_min_s=min(times), saved_mib=saved_bytes / 2**20,
                trainable=sum(p.numel() for p in params))


def lora_rank_for(hidden: int, layers: int, r: int) -> int:
    """The LoRA rank whose parameter count is closest to RandLoRA's on all 7 projections of the Llama."""
    inter, kv = int(hidden * 2.6875), hidden
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
              (hidden, inter)]
    rand = sum(randlora_params(min(s), r) for s in shapes)
    per_rank = sum(a + b for a, b in shapes)
    return max(1, round(rand / per_rank))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs="*")
    parser.add_argument("--steps", type=int, default=600, help="training steps of part 1")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--train-rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--part", choices=["1", "2", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3, help="part 2 rounds (methods alternate)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--measured-steps", type=int, default=5, help="timed part 2 steps per run (after 2 warm-up)")
    args = parser.parse_args()
    if args.worker is not None:
        m, h, l, r, k, b, s, n, t, c = args.worker
        worker(m, int(h), int(l), int(r), int(k), int(b), int(s), int(n), int(t), c == "1")
        return

    import torch

    torch.set_num_threads(args.threads)
    print(machine_line())
    if args.part != "2":
        part1(args)
    if args.part != "1":
        part2(args)


def part1(args) -> None:
    print(f"## Part 1: full-rank target, equal trainable parameters (2-layer MLP, D={args.dim}, {args.steps} steps)")
    for target in ("orthogonal", "gaussian"):
        res = claim(args.dim, args.rank, args.steps, target)
        print(f"\ntarget ΔW* = {target}; RandLoRA r={res['r']}, LoRA k={res['lora_k']}")
        print(f"{'method':24s} {'params':>8s} {'rel. error':>11s} {'best lr':>8s}")
        for name, row in res["rows"].items():
            print(f"{name:24s} {row['params']:8d} {row['error']:11.4f} {row['lr']:8.0e}")
        ours, lora = res["rows"]["randlora-io RandLoRA"]["error"], res["rows"]["PEFT LoRA"]["error"]
        print(f"RandLoRA / LoRA error: {ours / lora:.3f} ({'RandLoRA lower' if ours < lora else 'LoRA lower'})")



def part2(args) -> None:
    k = lora_rank_for(args.hidden, args.layers, args.train_rank)
    names = {"ours": f"randlora-io RandLoRA r={args.train_rank}", "peft-randlora": f"PEFT RandLoRA r={args.train_rank}",
             "peft-lora": f"PEFT LoRA k={k}"}
    methods = list(names)
    summary = {}
    for checkpointing in (False, True):
        print(f"\n## Part 2: one training step, Llama h={args.hidden}, {args.layers} layers, 7 projections, batch "
              f"{args.batch}×{args.seq}, {args.threads} threads, gradient checkpointing "
              f"{'on' if checkpointing else 'off'}, {args.repeats} alternating rounds")
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for round_ in range(args.repeats):
            order = methods[round_ % len(methods):] + methods[: round_ % len(methods)]
            for method in order:
                runs[method].append(run_worker(__file__, method, str(args.hidden), str(args.layers),
                                               str(args.train_rank), str(k), str(args.batch), str(args.seq), str(args.measured_steps),
                                               str(args.threads), "1" if checkpointing else "0"))
        print(f"{'method':28s} {'trainable':>10s} {'step s (median)':>16s} {'saved MiB':>10s} {'peak RSS MiB':>13s}")
        for method in methods:
            res = runs[method]
            print(f"{names[method]:28s} {res[0]['trainable']:10d} "
                  f"{statistics.median(r['step_s'] for r in res):16.3f} {res[0]['saved_mib']:10.1f} "
                  f"{max(r['peak_rss_mib'] for r in res):13.0f}")
        for other in ("peft-randlora", "peft-lora"):
            ratios = [p["step_s"] / o["step_s"] for p, o in zip(runs[other], runs["ours"])]
            rss = max(r["peak_rss_mib"] for r in runs["ours"]) / max(r["peak_rss_mib"] for r in runs[other])
            fastest = [p["step_min_s"] / o["step_min_s"] for p, o in zip(runs[other], runs["ours"])]
            print(f"ours vs {names[other]}: speed ×{min(ratios):.2f} min, ×{statistics.median(ratios):.2f} median; "
                  f"{rss:.2f} of its peak RSS; fastest step of each run: ×{min(fastest):.2f} min, "
                  f"×{statistics.median(fastest):.2f} median")
        summary["checkpointing" if checkpointing else "plain"] = runs
    print(json.dumps({"part2": summary}))


if __name__ == "__main__":
    main()
