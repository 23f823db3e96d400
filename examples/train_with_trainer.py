"""Train RandLoRA with ``transformers.Trainer``, then save in the randlora format and merge into the weights.

``attach`` makes only λ and γ trainable, so the Trainer's optimizer sees just those. ``RandloraTrainer`` (a Trainer)
writes checkpoints that hold the adapter file plus the optimizer state, and ``train(resume_from_checkpoint=...)``
continues from them exactly. A tiny Llama is built in code (no downloads).
Run: python examples/train_with_trainer.py [--steps N] [--out FILE]
"""

from __future__ import annotations

import tempfile

import torch
from transformers import TrainingArguments

from randlora_io.train import RandloraConfig, RandloraTrainer
from randlora_io.train import attach

from train_torch_loop import example_args, tiny_llama  # noqa: E402  (shared with the plain-loop example)


class ArithmeticSequences(torch.utils.data.Dataset):
    def __init__(self, rows: int = 256, length: int = 32, vocab: int = 64):
        gen = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (rows, 1), generator=gen)
        stride = torch.randint(1, 4, (rows, 1), generator=gen)
        self.ids = (start + stride * torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    args = example_args()

    model = tiny_llama()
    handle = attach(model, RandloraConfig(r=8))  # all Linear layers but lm_head
    work = tempfile.mkdtemp()
    training = TrainingArguments(output_dir=work, max_steps=args.steps, per_device_train_batch_size=8,
                                 learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=20,
                                 save_strategy="steps", save_steps=max(1, args.steps // 2), report_to=[],
                                 use_cpu=True, disable_tqdm=True)
    trainer = RandloraTrainer(handle=handle, model=model, args=training, train_dataset=ArithmeticSequences())
    result = trainer.train()  # checkpoints in work/checkpoint-N: adapter.randlora.safetensors + optimizer state
    print(f"final training loss {result.training_loss:.4f}")
    model.eval()
    handle.save(args.out)
    print(f"saved {args.out} ({args.out.stat().st_size:,} bytes; {handle.trainable_parameters():,} trained values)")

    ids = ArithmeticSequences(rows=2).ids
    with torch.no_grad():
        before = model(ids).logits
        merged = handle.merge()  # ΔW added into the base weights, wrappers removed
        after = merged(ids).logits
    same = torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    print("merged model gives the trained logits:", same)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
