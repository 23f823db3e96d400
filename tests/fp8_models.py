"""Tiny Llamas in transformers' FP8 block layout, quantized here by a float64 reference written independently of
``randlora_io.checkpoint.fp8_blocks`` (frexp-based e4m3 rounding, not a code table), and the oracle a merge into them
is checked against: requant(dequant(W) + ΔW), with ΔW from PEFT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

FP8_MAX = 448.0
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float64 ``x`` to the nearest e4m3fn value, ties to even, saturating at ±448: the value's binade from frexp
    (at least e4m3's smallest normal binade, 2⁻⁶, below which the spacing stays 2⁻⁹), 3 mantissa bits kept."""
    x = x.double()
    _, exp = torch.frexp(x.abs().clamp_min(2.0 ** -6))
    quantum = torch.pow(2.0, (exp - 1 - 3).double())  # |x| in [2^(e-1), 2^e): spacing 2^(e-1-3)
    return (torch.round(x / quantum) * quantum).clamp(-FP8_MAX, FP8_MAX)  # torch.round: half to even


def quantize64(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn, scale_inv float32) of ``w`` (out, in): per block scale_inv = f32(amax / 448), 1.0 for an
    all-zero block, codes = e4m3(W / scale_inv) computed in float64."""
    w = w.double()
    rows, cols = w.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    scale = torch.ones(grid, dtype=torch.float32)
    codes = torch.zeros_like(w)
    for i in range(grid[0]):
        for j in range(grid[1]):
            sl = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            amax = float(w[sl].abs().max())
            s = float(torch.tensor(amax / FP8_MAX, dtype=torch.float32)) if amax else 1.0
            scale[i, j] = s
            codes[sl] = round_e4m3(w[sl] / s)
    return codes.to(torch.float8_e4m3fn), scale


def dequant64(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float64 codes · scale per block (exact)."""
    full = scale.double().repeat_interleave(block[0], 0)[:codes.shape[0]].repeat_interleave(block[1], 1)
    return codes.double() * full[:, :codes.shape[1]]


def fp8_llama(path: Path, *, block=(16, 16), hidden=40, intermediate=72, layers=2, seed=0,
              not_converted=("model.layers.1.mlp.down_proj",), zero_block="model.layers.0.self_attn.q_proj.weight",
              shards=1, split_pair: str | None = None):
    """Save a tiny Llama in the FP8 layout at ``path``; returns (float32 model holding the dequantized weights,
    {fp8 weight key: (codes, scale_inv)}). Projections are quantized except ``not_converted`` (kept bf16 like
    the embeddings, norms and lm_head); ``zero_block``'s first block is zeroed before quantizing. ``shards``: how many
    files (keys dealt round-robin in name order); ``split_pair``: a weight whose scale goes to another shard."""
    from safetensors.torch import save_file
    from tiny_models import tiny_llama

    model = tiny_llama(seed=seed, hidden=hidden, intermediate=intermediate, layers=layers)
    state, pairs = {}, {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module.rsplit(".", 1)[-1] in PROJ and module not in not_converted:
                if name == zero_block:
                    tensor[:block[0], :block[1]] = 0
                codes, scale = quantize64(tensor, block)
                pairs[name] = (codes, scale)
                state[name], state[module + ".weight_scale_inv"] = codes, scale
                tensor.copy_(dequant64(codes, scale, block).float())
            else:
                tensor.copy_(tensor.to(torch.bfloat16).float())
                state[name] = tensor.to(torch.bfloat16).clone()
    path.mkdir(parents=True)
    config = model.config.to_dict()
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block),
                                     "activation_scheme": "dynamic", "modules_to_not_convert": list(not_converted)}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    keys = sorted(state)
    if shards == 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return model, pairs
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    where = {k: names[i % shards] for i, k in enumerate(keys)}
    if split_pair is not None:  # its scale in the shard after its weight's
        scale = split_pair.removesuffix(".weight") + ".weight_scale_inv"
        where[scale] = names[(names.index(where[split_pair]) + 1) % shards]
    for name in names:
        save_file({k: state[k] for k in keys if where[k] == name}, str(path / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(state[k].numel() * state[k].element_size() for k in keys)},
             "weight_map": where}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return model, pairs
