"""Train RandLoRA with DistributedDataParallel under torchrun, and save the adapter once (rank 0).

Each process trains on its own slice of every batch; DDP averages the gradients of λ and γ (the only trainable
parameters), so every rank holds the same adapter. CPU processes talk over gloo, GPUs over nccl.

Run: torchrun --nproc-per-node 2 examples/train_ddp.py [--steps N] [--out FILE]
(the same training from the CLI: torchrun --nproc-per-node 2 -m randlora_io train BASE DATA -o OUT)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from randlora_io.train import RandloraConfig, load_into
from randlora_io.train import attach

from train_torch_loop import batches, example_args, tiny_llama  # noqa: E402  (shared with the plain-loop example)


def main() -> None:
    args = example_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")

    model = tiny_llama().to(device)                 # the same base on every rank (seeded)
    handle = attach(model, RandloraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW(handle.parameters(), lr=5e-3)
    model.train()
    for step, ids in enumerate(batches(args.steps, batch=8), 1):
        ids = ids.chunk(world)[rank].to(device)     # this rank's slice of the global batch
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()                             # DDP averages the λ, γ gradients across ranks
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step == 1 or step % 20 == 0 or step == args.steps):
            print(f"step {step:4d}  loss {loss.item():.4f}")

    # every rank holds the same adapter
    flat = torch.cat([p.detach().flatten() for p in handle.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same_everywhere = all(torch.equal(g, flat) for g in gathered)
    model.eval()
    handle.save(args.out)                           # under torch.distributed: rank 0 writes
    dist.barrier()
    ok = same_everywhere
    if rank == 0:
        ids = next(batches(1)).to(device)
        fresh = tiny_llama().to(device).eval()
        load_into(fresh, args.out, check_fingerprint=True)
        with torch.no_grad():
            ok = ok and torch.allclose(fresh(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        print(f"saved {args.out}; the same adapter on all {world} ranks: {same_everywhere}; reloaded gives the "
              f"trained logits: {ok}")
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
