"""The base fingerprint: which base weights an adapter was trained on, and the check that a merge target is that base.

``sha256-weights:<hex>``: SHA-256 over the targeted base weights in sorted key order, each as the UTF-8 line
``f"{key}|{list(shape)}|{dtype}\n"`` (dtype as torch prints it, e.g. ``torch.bfloat16``) followed by the tensor's raw
bytes (row-major, little-endian). ``train.attach`` records it in ``base_model.fingerprint`` when it saves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
from safetensors import safe_open

from ..errors import BaseModelMismatchError

FINGERPRINT_PREFIX = "sha256-weights:"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fingerprint_update(digest: "hashlib._Hash", key: str, weight: torch.Tensor) -> None:
    """Feed one weight (any device, any layout) into ``digest`` as the fingerprint defines it, reading its bytes
    through a CPU copy (never pinning or resizing the weight's own storage)."""
    w = weight.detach()
    line = f"{key}|{list(w.shape)}|{w.dtype}\n".encode()
    digest.update(line)
    if w.numel():
        flat = w.to("cpu", copy=True).contiguous().reshape(-1)
        digest.update(memoryview(flat.view(torch.uint8).numpy()))


def fingerprint_of(weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The fingerprint of ``(key, weight)`` pairs given in sorted key order."""
    digest = hashlib.sha256()
    for key, weight in weights:
        fingerprint_update(digest, key, weight)
    return FINGERPRINT_PREFIX + digest.hexdigest()


def base_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """``sha256-weights:<hex>`` of ``{base weight key: weight}`` (the targeted weights of a model)."""
    return fingerprint_of((key, weights[key]) for key in sorted(weights))


def recorded_fingerprint(base_model: Mapping | None) -> str | None:
    """The fingerprint an adapter header records (``base_model.fingerprint``) when it is one this module defines."""
    value = (base_model or {}).get("fingerprint") if isinstance(base_model, Mapping) else None
    return value if isinstance(value, str) and value.startswith(FINGERPRINT_PREFIX) else None


def _read(ckpt, key: str) -> torch.Tensor:
    with safe_open(str(ckpt.shard_path(ckpt.weight_map[key])), framework="pt") as f:
        return f.get_tensor(key)


def checkpoint_fingerprints(ckpt, names: Mapping[str, str],
                            casts: tuple[torch.dtype | None, ...] = (None,), dequantize_fp8: bool = False) -> dict:
    """``{cast dtype (None = as stored): fingerprint}`` of the checkpoint weights ``names`` (fingerprint key →
    checkpoint key), read one tensor at a time. ``dequantize_fp8``: in the same pass, also ``{("dequantized", cast):
    fingerprint}`` with an FP8 block-quantized checkpoint's fp8 weights as transformers loads them on a CPU
    (codes · scale_inv in float32, then the cast) instead of their codes."""
    from ..checkpoint.fp8_blocks import dequantize

    layout = ckpt.quantization if dequantize_fp8 else None
    variants = [(cast, False) for cast in casts] + ([(cast, True) for cast in casts] if layout is not None else [])
    digests = {variant: hashlib.sha256() for variant in variants}
    for key in sorted(names):
        tensor = _read(ckpt, names[key])
        widened = None
        if layout is not None and names[key] in layout.scales:
            widened = dequantize(tensor, _read(ckpt, layout.scales[names[key]]), layout.block, torch.float32)
        for (cast, dequantized), digest in digests.items():
            t = widened if dequantized and widened is not None else tensor
            fingerprint_update(digest, key, t if cast is None else t.to(cast))
        del tensor, widened
    return {(("dequantized", cast) if dequantized else cast): FINGERPRINT_PREFIX + d.hexdigest()
            for (cast, dequantized), d in digests.items()}


def check_fingerprint(ckpt, source) -> None:
    """Refuse a merge of ``source`` into the checkpoint ``ckpt`` when the adapter records the fingerprint of the base
    it was trained on and BASE's targeted weights differ from it (in their stored dtype, or cast to the float dtype
    the model was trained in). Adapters without a fingerprint are not checked."""
    adapter = getattr(source, "adapter", None)
    expected = recorded_fingerprint(getattr(getattr(adapter, "header", None), "base_model", None))
    if expected is None:
        return
    # the fingerprint hashes the adapter's own key names; a key-mapped view (keymap.py) reads them from the
    # checkpoint under the names transformers saved them as
    inner_key = getattr(source, "inner_key", lambda key: key)
    names = {inner_key(key): key for key in source.keys() if key not in source.replacements}
    if checkpoint_fingerprints(ckpt, names)[None] == expected:
        return
    # trained on this base loaded in another dtype, or (an fp8 base) as transformers loads it on a CPU, dequantized
    if expected in checkpoint_fingerprints(ckpt, names, _FLOAT_DTYPES, dequantize_fp8=True).values():
        return
    raise BaseModelMismatchError(
        f"{source.path}: was trained on another base: its recorded base fingerprint does not match the targeted "
        f"weights of {ckpt.root}; merge into the base it was trained on, or pass --ignore-base-fingerprint to merge "
        "anyway")
