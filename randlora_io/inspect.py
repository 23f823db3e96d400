"""Describe and validate any supported adapter (``randlora-io inspect`` / ``validate``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .format.adapter import read_adapter
from .sources.dense import read_dense
from .sources.peft_dir import read_peft_dir
from .sources.peft_lora import read_peft_lora
from .sources.peft_params import read_param_layers
from .sources.peft_randlora import PEFT_TYPE, peft_kind, peft_scale_tensors
from .checkpoint.disk import path_bytes
from .errors import NonFiniteError
from .checkpoint.lazy_tensors import peek
from .sources.registry import base_info_from_config, base_shapes_from_config, detect_kind, open_source


def _layer_row(key: str, shape, r: int, n: int | None, tensors: list[torch.Tensor]) -> dict[str, Any]:
    row = {"key": key, "shape": list(shape) if shape else None, "r": r,
           "params": sum(t.numel() for t in tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors)}
    if n is not None:
        row["N"] = n
    return row


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able summary: kind, generator, seed, rank, and per layer shape, r, N, params, bytes."""
    path = Path(path)
    kind = detect_kind(path)
    info: dict[str, Any] = {"path": str(path), "kind": kind, "file_bytes": path_bytes(path)}
    if kind == "randlora":
        adapter = read_adapter(path, verify_bases=False)  # describing needs no bases; `validate` checks them
        h = adapter.header
        info.update(generator=h.generator.name, kind_of_bases=h.generator.kind, seed=h.seed, rank=h.rank,
                    alpha=h.alpha, scaling=h.scaling, format_version=h.format_version,
                    bases={"min_dim": h.min_dim, "max_dim": h.max_dim, "sha256": h.bases_sha256,
                           "stored": h.stored_bases},
                    base_model=h.base_model)
        info["layers"] = [_layer_row(k, l.shape, h.rank, l.num_bases,
                                     [peek(adapter.lambdas, k), peek(adapter.gammas, k)]) for k, l in h.layers.items()]
    elif kind == "peft-randlora":
        peft = read_peft_dir(path, expected_type=PEFT_TYPE)
        cfg = peft.config
        info.update(generator="peft (torch CPU RNG)", kind_of_bases=peft_kind(cfg), seed=cfg.get("projection_prng_key"),
                    rank=cfg.get("r"), alpha=cfg.get("randlora_alpha"), save_projection=cfg.get("save_projection"))
        info["layers"] = [_layer_row(k, None, lam.shape[0], lam.shape[1], [lam, gam])
                          for k, (lam, gam) in peft_scale_tensors(peft).items()]
    elif kind == "peft-lora":
        peft = read_peft_dir(path, expected_type="LORA")  # read once, for both kinds of layer
        layers = read_peft_lora(peft, base_info_from_config(path), decide_orientation=False)
        info["layers"] = [_layer_row(k, l.stored_shape, l.down.shape[0], None, [l.down, l.up]) for k, l in layers.items()]
        for module, p in read_param_layers(peft.tensors, peft.config, str(path)).items():  # target_parameters
            info["layers"].append(_layer_row(module, None, p.down.shape[0], None, [p.down, p.up]))
    else:
        deltas = read_dense(path)
        info["layers"] = [_layer_row(k, d.shape, min(d.shape), None, [d]) for k, d in deltas.items()]
    info["trainable_params"] = sum(layer["params"] for layer in info["layers"])
    return info


def validate(path: str | os.PathLike) -> str:
    """Full validation; returns a short description of what was checked, raises on the first defect."""
    path = Path(path)
    kind = detect_kind(path)
    if kind == "randlora":
        adapter = read_adapter(path)
        adapter.bases(verify=True)
        checked = "bases checksum verified" if adapter.header.bases_sha256 else "no bases checksum recorded"
        return f"randlora v{adapter.header.format_version}, {len(adapter.layers)} layers, {checked}"
    if kind == "peft-randlora":
        shapes = base_shapes_from_config(path)
        if shapes is not None:
            open_source(path)  # reads the local base's shapes, dtypes and layer types (config.json)
            return "PEFT RandLoRA dir, checked against its local base model"
        peft = read_peft_dir(path, expected_type=PEFT_TYPE)
        r = peft.config.get("r")
        for key, (lam, gam) in peft_scale_tensors(peft).items():
            if lam.ndim != 2 or gam.ndim != 2 or lam.shape[0] != r or lam.shape[1] != gam.shape[0]:
                raise NonFiniteError(f"{path}: {key!r} has λ {list(lam.shape)} and γ {list(gam.shape)} for r={r}")
            if not (torch.isfinite(lam).all() and torch.isfinite(gam).all()):
                raise NonFiniteError(f"{path}: {key!r} scales contain NaN or Inf")
        return "PEFT RandLoRA dir (shapes vs base not checked: base model not available locally)"
    source = open_source(path)
    params = getattr(source, "param_layers", None)
    if params:  # target_parameters wrappers: their checkpoint tensors depend on the base (resolved by `merge`)
        layers = getattr(source, "layers", {})
        return (f"{kind}, {len(layers)} layers and {len(params)} target_parameters wrappers (mapped onto a base's "
                "tensors by merge)")
    return f"{kind}, {len(source.keys())} layers"
