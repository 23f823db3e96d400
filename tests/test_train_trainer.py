"""transformers integration: RandloraTrainer checkpoints hold the adapter + optimizer and resume exactly;
``save_pretrained`` of an attached model writes the merged model, which loads; a merged state dict is not loaded
into an attached model; ``Trainer(bf16=True)`` trains."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama

from randlora_io.errors import AdapterStateError
from randlora_io.train import RandloraConfig, RandloraTrainer
from randlora_io.train import attach

IDS = torch.randint(0, 90, (2, 11), generator=torch.Generator().manual_seed(0))   # in both tiny vocabularies


class Sequences(torch.utils.data.Dataset):
    def __init__(self, rows: int = 16, length: int = 12):
        gen = torch.Generator().manual_seed(0)
        start = torch.randint(0, 128, (rows, 1), generator=gen)
        self.ids = (start + 3 * torch.arange(length)) % 128

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_for(out, max_steps, save_steps=3, trainer_cls=RandloraTrainer, **extra):
    from transformers import TrainingArguments

    model = tiny_llama(layers=1)
    handle = attach(model, RandloraConfig(r=4, seed=1))
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2, save_steps=save_steps,
                             save_strategy="steps", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0, logging_strategy="no", **extra)
    kwargs = {"handle": handle} if trainer_cls is RandloraTrainer else {}
    return trainer_cls(model=model, args=args, train_dataset=Sequences(), **kwargs), handle


def scales(handle):
    return [p.detach().clone() for p in handle.parameters()]


def test_checkpoints_hold_the_adapter_and_optimizer_and_resume_exactly(tmp_path):
    straight, handle = trainer_for(tmp_path / "a", max_steps=6)
    straight.train()
    expected = scales(handle)
    checkpoint = tmp_path / "a" / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert "adapter.randlora.safetensors" in files and "optimizer.pt" in files and "scheduler.pt" in files
    assert not any(f.startswith("model") for f in files)          # not the whole model

    resumed, handle2 = trainer_for(tmp_path / "b", max_steps=6)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for a, e in zip(scales(handle2), expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-7)
    assert any(float(p.abs().max()) > 0 for p in expected[::2])     # λ trained away from 0


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])     # GPT-2: Conv1D weights, a tied lm_head
def test_save_pretrained_of_an_attached_model_writes_a_loadable_merged_model(make, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make()
    handle = attach(model, RandloraConfig(r=4, seed=4))
    with torch.no_grad():
        for i, p in enumerate(handle.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
        expected = model(IDS).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "merged")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the model is not changed
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    # that merged state dict is not silently loaded into the attached model (λ, γ would stay untrained)
    with pytest.raises(AdapterStateError, match="merged model"):
        model.load_state_dict(loaded.state_dict(), strict=False)
    handle.detach()
    assert "save_pretrained" not in model.__dict__
    model.load_state_dict(loaded.state_dict())        # detached, it is a plain model again


def test_trainer_bf16_autocast_trains(tmp_path):
    from transformers import Trainer

    trainer, handle = trainer_for(tmp_path / "bf16", max_steps=2, save_steps=100, trainer_cls=Trainer, bf16=True)
    trainer.train()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in handle.parameters())
    assert any(float(p.abs().max()) > 0 for p in handle.parameters()[::2])


def test_a_plain_trainer_checkpoint_is_loadable_but_not_silently_resumed(tmp_path):
    """Plain Trainer checkpoints go through save_pretrained: a merged model (loadable); resuming from one into an
    attached model is refused instead of restarting λ, γ from zero with a warning."""
    from transformers import Trainer

    first, _ = trainer_for(tmp_path / "a", max_steps=2, save_steps=2, trainer_cls=Trainer)
    first.train()
    second, _ = trainer_for(tmp_path / "b", max_steps=4, save_steps=2, trainer_cls=Trainer)
    with pytest.raises(AdapterStateError, match="merged model"):
        second.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
