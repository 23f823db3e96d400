"""Training data for ``randlora-io train``: a local file turned into fixed-length blocks of token ids.

Accepted: JSONL rows ``{"input_ids": [...]}`` (no tokenizer needed), JSONL rows ``{"text": "..."}``, or plain text
(one document per line; both need BASE's tokenizer). Documents are joined (with EOS when the tokenizer has one) and
cut into blocks of ``seq_len`` tokens, as the transformers examples' ``group_texts`` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import SourceFormatError


def _rows(path: Path) -> tuple[list[list[int]], list[str]]:
    ids, texts = [], []
    is_jsonl = path.suffix in (".jsonl", ".json")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if not is_jsonl:
                texts.append(line.rstrip("\n"))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg}); one JSON object per line")
            if isinstance(row, dict) and isinstance(row.get("input_ids"), list):
                tokens = row["input_ids"]
                if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
                    raise SourceFormatError(f"{path}:{lineno}: input_ids must be non-negative integers")
                ids.append(tokens)
            elif isinstance(row, dict) and isinstance(row.get("text"), str):
                texts.append(row["text"])
            else:
                raise SourceFormatError(f"{path}:{lineno}: expected {{\"input_ids\": [...]}} or {{\"text\": \"...\"}}")
    return ids, texts


def load_blocks(path: str | os.PathLike, seq_len: int, vocab_size: int, tokenizer=None) -> torch.Tensor:
    """(num_blocks, seq_len) int64 token ids from ``path``; the last partial block is dropped unless it is the only
    one (then the blocks are as long as the data)."""
    path = Path(path)
    if not path.is_file():
        raise SourceFormatError(f"{path}: no such data file")
    ids, texts = _rows(path)
    if texts:
        if tokenizer is None:
            raise SourceFormatError(f"{path}: text data needs a tokenizer, and the base model dir has none; "
                                    "give JSONL rows of {\"input_ids\": [...]} instead")
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids += [tokenizer(t, add_special_tokens=False)["input_ids"] + eos for t in texts]
    stream = [t for row in ids for t in row]
    if len(stream) < 2:
        raise SourceFormatError(f"{path}: fewer than 2 tokens of training data")
    if max(stream) >= vocab_size:
        raise SourceFormatError(f"{path}: token id {max(stream)} is outside the model's vocabulary ({vocab_size})")
    if len(stream) < seq_len:
        seq_len = len(stream)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)
