"""``randlora-io train`` as a tool: gradient accumulation, schedule, clipping, precision, eval split, resumable
checkpoints, plain-line logs, instruction data with the loss on the completion only, and bad data named by file."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from test_train import write_pattern_data

from randlora_io.format.adapter import read_adapter
from randlora_io.train import RandloraConfig
from randlora_io.train.data import IGNORE, load_examples
from randlora_io.train.loop import train_causal_lm


def pattern_data(path, rows=24, length=40, vocab=50):
    """JSONL rows of arithmetic token patterns (test_train's data, 24 rows by default)."""
    return write_pattern_data(path, rows=rows, length=length, vocab=vocab)


def word_tokenizer(directory, chat_template=None):
    """A word-level tokenizer saved into ``directory`` (the base model dir); no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "what", "did", "do", "?", "user", "assistant", ":"]
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)
    return fast


def scales(path):
    adapter = read_adapter(path)
    return {k: (adapter.lambdas[k], adapter.gammas[k]) for k in adapter.lambdas}


def test_resume_from_a_checkpoint_continues_exactly(llama_dir, tmp_path):
    data = pattern_data(tmp_path / "d.jsonl")
    common = dict(config=RandloraConfig(r=4), steps=6, batch_size=2, grad_accum=2, seq_len=16, warmup_steps=2,
                  schedule="cosine", max_grad_norm=0.5, eval_split=0.2)
    straight = train_causal_lm(llama_dir, data, tmp_path / "a.safetensors", save_every=3, **common)
    checkpoint = tmp_path / "a.safetensors.checkpoints" / "step-3"
    assert straight.checkpoints == [checkpoint] and straight.eval_loss is not None
    assert {p.name for p in checkpoint.iterdir()} == {"adapter.randlora.safetensors", "state.pt"}
    train_causal_lm(llama_dir, data, tmp_path / "b.safetensors", resume=checkpoint, **common)
    a, b = scales(tmp_path / "a.safetensors"), scales(tmp_path / "b.safetensors")
    for key in a:
        assert torch.equal(a[key][0], b[key][0]) and torch.equal(a[key][1], b[key][1]), key
    # resuming with other data is refused, not silently continued on a different order
    with pytest.raises(Exception, match="training examples"):
        train_causal_lm(llama_dir, pattern_data(tmp_path / "other.jsonl", rows=12), tmp_path / "c.safetensors",
                        resume=checkpoint, **common)


def test_gradient_accumulation_equals_the_larger_batch(llama_dir, tmp_path):
    data = pattern_data(tmp_path / "d.jsonl")
    kw = dict(config=RandloraConfig(r=4), steps=2, seq_len=16, max_grad_norm=0)
    train_causal_lm(llama_dir, data, tmp_path / "big.safetensors", batch_size=4, grad_accum=1, **kw)
    train_causal_lm(llama_dir, data, tmp_path / "acc.safetensors", batch_size=2, grad_accum=2, **kw)
    big, acc = scales(tmp_path / "big.safetensors"), scales(tmp_path / "acc.safetensors")
    for key in big:
        torch.testing.assert_close(acc[key][0], big[key][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(acc[key][1], big[key][1], rtol=1e-4, atol=1e-6)


def test_cli_options_and_plain_log_lines(llama_dir, tmp_path):
    data = pattern_data(tmp_path / "d.jsonl")
    out = tmp_path / "cli.safetensors"
    result = run_cli("train", llama_dir, data, "-o", out, "--r", "4", "--steps", "4", "--seq-len", "16",
                     "--batch-size", "2", "--grad-accum", "2", "--schedule", "linear", "--warmup-steps", "1",
                     "--max-grad-norm", "1", "--precision", "bf16", "--device", "cpu", "--eval-split", "0.25",
                     "--eval-every", "2", "--log-every", "2", "--gradient-checkpointing")
    lines = result.output.splitlines()
    assert any(line.startswith("step 2/4 loss ") for line in lines), result.output   # not a tty: plain lines
    assert any(line.startswith("step 2/4 eval loss ") for line in lines), result.output
    assert "eval loss" in lines[-1] and read_adapter(out).header.rank == 4
    epochs = run_cli("train", llama_dir, data, "-o", tmp_path / "e.safetensors", "--r", "4", "--epochs", "1",
                     "--seq-len", "16", "--batch-size", "8")
    assert "trained 8 steps" in epochs.output     # 24 rows × 40 tokens = 60 blocks of 16: ⌈60 / 8⌉ steps


def test_cuda_requested_without_cuda_is_one_line(llama_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = pattern_data(tmp_path / "d.jsonl")
    assert_one_line_error(run_cli("train", llama_dir, data, "-o", tmp_path / "o.safetensors", "--device", "cuda",
                                  check=False), "cuda", "--device cpu")


def test_bad_data_is_one_line_naming_the_file(llama_dir, tmp_path):
    word_tokenizer(llama_dir)
    out = tmp_path / "o.safetensors"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("the cat sat on the mat\ncaf\xe9\n".encode("latin-1"))
    assert_one_line_error(run_cli("train", llama_dir, latin1, "-o", out, check=False), "latin1.txt", "UTF-8")
    table = tmp_path / "table.csv"
    table.write_text("text,label\nthe cat sat,1\n")
    assert_one_line_error(run_cli("train", llama_dir, table, "-o", out, check=False), "table.csv", "CSV")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"input_ids": [1, 2, 3]}\n{"text": "the cat"}\n')
    assert_one_line_error(run_cli("train", llama_dir, mixed, "-o", out, check=False), "mixed.jsonl:2", "one kind")
    short = pattern_data(tmp_path / "short.jsonl", rows=1, length=10)
    assert_one_line_error(run_cli("train", llama_dir, short, "-o", out, "--seq-len", "32", check=False),
                          "short.jsonl", "fewer than one block of --seq-len 32")
    long_row = pattern_data(tmp_path / "long.jsonl", rows=2, length=40)
    assert_one_line_error(run_cli("train", llama_dir, long_row, "-o", out, "--seq-len", "16", "--no-packing",
                                  check=False), "long.jsonl:1", "more than --seq-len 16")
    assert not out.exists()


def test_prompt_completion_rows_train_on_the_completion_only(llama_dir, tmp_path):
    tok = word_tokenizer(llama_dir)
    rows = tmp_path / "sft.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": "what did the cat do ?", "completion": "the cat sat on the mat"})
                              for _ in range(8)) + "\n")
    examples = load_examples(rows, 24, 128, tok)
    prompt = len(tok("what did the cat do ?", add_special_tokens=False)["input_ids"])
    completion = len(tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]) + 1   # + EOS
    assert examples.kind == "prompt" and examples.input_ids.shape == (8, 24)
    assert (examples.labels[0, :prompt] == IGNORE).all()
    answer = slice(prompt, prompt + completion)
    assert torch.equal(examples.labels[0, answer], examples.input_ids[0, answer])
    assert (examples.labels[0, prompt + completion:] == IGNORE).all()                      # padding
    assert examples.attention_mask[0].sum() == prompt + completion
    report = train_causal_lm(llama_dir, rows, tmp_path / "sft.safetensors", config=RandloraConfig(r=4), steps=10,
                             seq_len=24, batch_size=4)
    assert report.loss_after < report.loss_before


def test_chat_messages_use_the_template_and_train_on_the_last_answer(llama_dir, tmp_path):
    template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}assistant : {% endif %}")
    tok = word_tokenizer(llama_dir, chat_template=template)
    rows = tmp_path / "chat.jsonl"
    chat = [{"role": "user", "content": "what did the dog do ?"}, {"role": "assistant", "content": "the dog ran"}]
    rows.write_text(json.dumps({"messages": chat}) + "\n")
    examples = load_examples(rows, 32, 128, tok)
    trained = examples.input_ids[0][examples.labels[0] != IGNORE].tolist()
    assert trained == tok("the dog ran", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    bad = tmp_path / "bad_chat.jsonl"
    bad.write_text(json.dumps({"messages": chat[:1]}) + "\n")
    assert_one_line_error(run_cli("train", llama_dir, bad, "-o", tmp_path / "o.safetensors", check=False),
                          "bad_chat.jsonl:1", "assistant")


def test_a_datasets_dir_is_read_as_its_rows(llama_dir, tmp_path):
    """A ``save_to_disk`` dir gives the same examples as the JSONL file of its rows; a DatasetDict's ``train`` split
    is the one read (its ``test`` split is not trained on); a dir without one is one line."""
    from datasets import Dataset, DatasetDict

    rows = [{"input_ids": [(s + 3 * j) % 50 for j in range(40)]} for s in range(24)]
    directory = tmp_path / "saved_dataset"
    Dataset.from_list(rows).save_to_disk(str(directory))
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert torch.equal(load_examples(directory, 16, 128).input_ids, load_examples(jsonl, 16, 128).input_ids)
    split = tmp_path / "split"
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:2])}).save_to_disk(str(split))
    assert torch.equal(load_examples(split, 16, 128).input_ids, load_examples(jsonl, 16, 128).input_ids)
    no_train = tmp_path / "no_train"
    DatasetDict({"validation": Dataset.from_list(rows)}).save_to_disk(str(no_train))
    assert_one_line_error(run_cli("train", llama_dir, no_train, "-o", tmp_path / "o.safetensors", check=False),
                          "no_train", "'train' split")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert_one_line_error(run_cli("train", llama_dir, empty, "-o", tmp_path / "o.safetensors", check=False),
                          "empty_dir", "not a datasets dir")
    assert not (tmp_path / "o.safetensors").exists()


def test_a_datasets_dir_of_prompt_completion_rows_trains_through_the_cli(llama_dir, tmp_path):
    from datasets import Dataset

    word_tokenizer(llama_dir)
    directory = tmp_path / "sft_dataset"
    Dataset.from_list([{"prompt": "what did the cat do ?", "completion": "the cat sat on the mat"}] * 8
                      ).save_to_disk(str(directory))
    out = tmp_path / "sft.safetensors"
    run_cli("train", llama_dir, directory, "-o", out, "--r", "4", "--steps", "3", "--seq-len", "24")
    assert read_adapter(out).layers


def test_without_the_datasets_package_a_directory_is_one_line(llama_dir, tmp_path, monkeypatch):
    directory = tmp_path / "saved_dataset"
    directory.mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError, as when not installed
    assert_one_line_error(run_cli("train", llama_dir, directory, "-o", tmp_path / "o.safetensors", check=False),
                          "saved_dataset", "pip install datasets")


def test_tensorboard_logs_loss_lr_and_eval_loss(llama_dir, tmp_path):
    """The event file holds one train/loss and train/lr point per step (the values the plain log prints) and the
    final eval loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = pattern_data(tmp_path / "d.jsonl", rows=8)
    board = tmp_path / "runs"
    result = run_cli("train", llama_dir, data, "-o", tmp_path / "o.safetensors", "--r", "4", "--steps", "3",
                     "--seq-len", "16", "--log-every", "1", "--eval-split", "0.25", "--tensorboard", board)
    events = EventAccumulator(str(board))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/loss"} <= set(events.Tags()["scalars"])
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3]
    logged = [float(line.split(" loss ")[1].split()[0]) for line in result.output.splitlines()
              if line.startswith("step ") and " loss " in line and "eval" not in line]
    assert logged == pytest.approx([e.value for e in losses], abs=1e-4)
    assert all(math.isfinite(e.value) for e in events.Scalars("eval/loss"))


def test_tensorboard_missing_or_unwritable_is_one_line(llama_dir, tmp_path, monkeypatch):
    data = pattern_data(tmp_path / "d.jsonl", rows=4)
    out = tmp_path / "o.safetensors"
    args = ("train", llama_dir, data, "-o", out, "--r", "4", "--steps", "2", "--seq-len", "16", "--tensorboard")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a dir")
    assert_one_line_error(run_cli(*args, blocker, check=False), "a_file")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when tensorboard is not installed
    assert_one_line_error(run_cli(*args, tmp_path / "runs", check=False), "--tensorboard", "pip install tensorboard")
    assert not out.exists()
