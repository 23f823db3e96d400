"""Training data for ``randlora-io train``: a local file turned into fixed-length examples of token ids.

Accepted, one kind per file (a file mixing kinds is refused):

- JSONL rows ``{"input_ids": [...]}`` (no tokenizer needed);
- JSONL rows ``{"text": "..."}``, or plain text (``.txt``/``.text``/``.md``, one document per line);
- a ``datasets`` dir (``Dataset.save_to_disk``; its ``train`` split for a DatasetDict) of rows of those kinds;
- instruction JSONL: ``{"prompt": "...", "completion": "..."}``, or ``{"messages": [{"role", "content"}, ...]}``
  ending with an assistant turn (rendered with the tokenizer's chat template). The loss is on the completion (the
  last assistant turn) only; these examples are never packed.

Plain kinds are joined (with EOS when the tokenizer has one) and cut into blocks of ``seq_len`` tokens, as the
transformers examples' ``group_texts`` does; with ``packing=False`` each row is one example, padded to ``seq_len``.
Errors name the file (and line): a non-UTF-8 file, a CSV or other table, a row of another kind, fewer tokens than
``seq_len`` (never silently shrunk), a row longer than ``seq_len`` when not packing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SourceFormatError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
IGNORE = -100   # label of a token that is not trained on (transformers' ignore_index)
KINDS = {"input_ids": "input_ids", "text": "text", "prompt": "prompt/completion", "messages": "messages"}


@dataclass
class Examples:
    """``input_ids`` (N, L) int64; ``labels`` (N, L) int64 with IGNORE where no loss is taken; ``attention_mask``
    (N, L) int64, or None when every example is a full block (packed)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    kind: str

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids[index], "labels": self.labels[index]}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask[index]
        return out

    def split(self, fraction: float, seed: int) -> tuple[Examples, Examples | None]:
        """(train, eval): ``fraction`` of the examples (at least one) held out at random, or (self, None)."""
        if fraction <= 0:
            return self, None
        n_eval = max(1, round(len(self) * fraction))
        if n_eval >= len(self):
            raise SourceFormatError(f"--eval-split {fraction} leaves no training data ({len(self)} examples)")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[n_eval:]), self.subset(perm[:n_eval])

    def subset(self, index: torch.Tensor) -> Examples:
        """The examples at ``index`` (a 1-D int64 tensor)."""
        mask = None if self.attention_mask is None else self.attention_mask[index]
        return Examples(self.input_ids[index], self.labels[index], mask, self.kind)


def _row_kind(row) -> str | None:
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("input_ids"), list):
        return "input_ids"
    if isinstance(row.get("text"), str):
        return "text"
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return "prompt"
    if isinstance(row.get("messages"), list):
        return "messages"
    return None


def _check_kinds(path: Path, numbered_rows) -> tuple[str, list[tuple[int, object]]]:
    """(kind, rows) of ``(line number, row dict)`` pairs, every row of one kind, or the error naming the row."""
    rows: list[tuple[int, object]] = []
    kind, first_line = None, 0
    for lineno, row in numbered_rows:
        row_kind = _row_kind(row)
        if row_kind is None:
            raise SourceFormatError(f"{path}:{lineno}: expected a row of input_ids, text, prompt/completion or "
                                    "messages")
        if kind is None:
            kind, first_line = row_kind, lineno
        elif row_kind != kind:
            raise SourceFormatError(f"{path}:{lineno}: a {KINDS[row_kind]} row in a file of {KINDS[kind]} rows "
                                    f"(line {first_line}); use one kind per file")
        rows.append((lineno, row))
    if kind is None:
        raise SourceFormatError(f"{path}: no training data (the file is empty)")
    return kind, rows


def _jsonl_rows(path: Path, fh):
    for lineno, line in enumerate(fh, 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg}); one JSON object per "
                                        "line") from None


def _dataset_rows(path: Path):
    """Rows of a ``datasets`` dir (``Dataset.save_to_disk``), numbered from 1, as dicts."""
    try:
        import datasets
    except ImportError:
        raise SourceFormatError(f"{path}: a directory is read as a datasets dir (save_to_disk), which needs the "
                                "datasets package: pip install datasets; or give a JSONL file") from None
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable dir is one clear error
        raise SourceFormatError(f"{path}: not a datasets dir ({type(exc).__name__}: {exc})") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise SourceFormatError(f"{path}: a DatasetDict without a 'train' split ({', '.join(data)})")
        data = data["train"]
    return ((i, dict(row)) for i, row in enumerate(data, 1))


def _read_rows(path: Path) -> tuple[str, list[tuple[int, object]]]:
    """(kind, [(line number, row)]) of a JSONL or text file or a datasets dir; every row of one kind."""
    if path.is_dir():
        return _check_kinds(path, _dataset_rows(path))
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
        raise SourceFormatError(f"{path}: {suffix or 'no suffix'} is not a training data format; give JSONL "
                                f"({', '.join(JSONL_SUFFIXES)}) or plain text ({', '.join(TEXT_SUFFIXES)}) "
                                "(a CSV is not read as text: convert it to JSONL rows)")
    try:
        with open(path, encoding="utf-8") as fh:
            if suffix in JSONL_SUFFIXES:
                return _check_kinds(path, _jsonl_rows(path, fh))
            rows = [(lineno, line.rstrip("\n")) for lineno, line in enumerate(fh, 1) if line.strip()]
    except UnicodeDecodeError as exc:
        raise SourceFormatError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                                f"{exc.start}); re-encode it as UTF-8") from None
    if not rows:
        raise SourceFormatError(f"{path}: no training data (the file is empty)")
    return "text", rows


def _tokenize(path: Path, kind: str, rows, tokenizer) -> list[tuple[list[int], list[int]]]:
    """[(ids, labels)] per row; labels IGNORE on prompt tokens."""
    if kind == "input_ids":
        out = []
        for lineno, row in rows:
            ids = row["input_ids"]
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise SourceFormatError(f"{path}:{lineno}: input_ids must be non-negative integers")
            out.append((ids, list(ids)))
        return out
    if tokenizer is None:
        raise SourceFormatError(f"{path}: {KINDS[kind]} data needs a tokenizer, and the base model dir has none; "
                                "give JSONL rows of {\"input_ids\": [...]} instead")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    out = []
    for lineno, row in rows:
        if kind == "text":
            ids = encode(row if isinstance(row, str) else row["text"]) + eos
            out.append((ids, list(ids)))
            continue
        if kind == "prompt":
            prompt, completion = row["prompt"], row["completion"]
        else:
            prompt, completion = _render_chat(path, lineno, row["messages"], tokenizer)
        p_ids, c_ids = encode(prompt), encode(completion) + eos
        if not c_ids:
            raise SourceFormatError(f"{path}:{lineno}: the completion is empty; there is nothing to train on")
        out.append((p_ids + c_ids, [IGNORE] * len(p_ids) + c_ids))
    return out


def _render_chat(path: Path, lineno: int, messages, tokenizer) -> tuple[str, str]:
    """(prompt, completion) text of a chat: the tokenizer's template up to the last (assistant) turn, and the rest."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise SourceFormatError(f"{path}:{lineno}: messages rows need the tokenizer's chat template, and the base "
                                "model's tokenizer has none; give prompt/completion rows instead")
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                               and isinstance(m.get("content"), str) for m in messages):
        raise SourceFormatError(f"{path}:{lineno}: messages must be a list of {{\"role\", \"content\"}} objects")
    if messages[-1]["role"] != "assistant":
        raise SourceFormatError(f"{path}:{lineno}: the last message must be the assistant's (the part trained on)")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise SourceFormatError(f"{path}:{lineno}: the chat template does not render the conversation as its "
                                "prompt followed by the answer; give prompt/completion rows instead")
    return prompt, full[len(prompt):]


def load_examples(path: str | os.PathLike, seq_len: int, vocab_size: int, tokenizer=None,
                  packing: bool = True) -> Examples:
    """The examples of ``path`` (see the module docstring). Plain kinds are packed into (N, seq_len) blocks unless
    ``packing`` is False; instruction kinds are one padded example per row."""
    path = Path(path)
    if not path.exists():
        raise SourceFormatError(f"{path}: no such data file")
    kind, rows = _read_rows(path)
    pairs = _tokenize(path, kind, rows, tokenizer)
    top = max((max(ids) for ids, _ in pairs if ids), default=-1)
    if top >= vocab_size:
        raise SourceFormatError(f"{path}: token id {top} is outside the model's vocabulary ({vocab_size})")
    if packing and kind in ("input_ids", "text"):
        ids = [t for row, _ in pairs for t in row]
        if len(ids) < seq_len:
            raise SourceFormatError(f"{path}: has {len(ids)} tokens, fewer than one block of --seq-len {seq_len}; "
                                    "lower --seq-len or give more data")
        n = len(ids) // seq_len
        blocks = torch.tensor(ids[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)
        return Examples(blocks, blocks.clone(), None, kind)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((len(pairs), seq_len), pad, dtype=torch.int64)
    labels = torch.full((len(pairs), seq_len), IGNORE, dtype=torch.int64)
    mask = torch.zeros((len(pairs), seq_len), dtype=torch.int64)
    for i, ((ids, lab), (lineno, _)) in enumerate(zip(pairs, rows)):
        if len(ids) > seq_len:
            raise SourceFormatError(f"{path}:{lineno}: the row has {len(ids)} tokens, more than --seq-len "
                                    f"{seq_len}; raise --seq-len" + (" or pack the data" if not packing and kind in (
                                        "input_ids", "text") else ""))
        if len(ids) < 2:
            raise SourceFormatError(f"{path}:{lineno}: fewer than 2 tokens; nothing to predict")
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return Examples(input_ids, labels, mask, kind)


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return 0


def load_blocks(path: str | os.PathLike, seq_len: int, vocab_size: int, tokenizer=None) -> torch.Tensor:
    """(num_blocks, seq_len) int64 token ids of plain (input_ids / text) data, packed."""
    return load_examples(path, seq_len, vocab_size, tokenizer, packing=True).input_ids
