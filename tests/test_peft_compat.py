"""The `peft` generator and the reference delta against real PEFT 0.21.2 on tiny models made in code."""

from __future__ import annotations

import pytest
import torch
from tiny_models import peft_layer_deltas, peft_randlora, tiny_gpt2, tiny_llama

from randlora_io.format.adapter import peft_shared_dims
from randlora_io.format.basis import peft_bases_raw
from randlora_io.format.delta import reference_delta
from randlora_io.format.spec import GeneratorSpec, LayerSpec, num_bases

GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]


def _our_bases(peft_model, kind, seed, r, fan):
    shapes = [(m.base_layer.weight.shape, fan) for _, m in _targets(peft_model)]
    min_dim, max_dim = peft_shared_dims(shapes)
    gen = GeneratorSpec(name="peft", kind=kind, seed=seed, draw_dtype="bfloat16" if kind == "dense" else "float32")
    return peft_bases_raw(gen, r, min_dim, max_dim)


def _targets(peft_model):
    return [(n, m) for n, m in peft_model.named_modules() if hasattr(m, "randlora_lambda") and hasattr(m, "base_layer")]


CASES = [
    ("llama", "dense", 0, 8), ("llama", "dense", 123, 5), ("llama", "sparse", 7, 8), ("llama", "very_sparse", 99, 6),
    ("llama", "dense", 2**31 + 5, 32), ("gpt2", "dense", 4, 6), ("gpt2", "sparse", 1, 4), ("gpt2", "very_sparse", 8, 7),
]


@pytest.mark.parametrize("model_name,kind,seed,r", CASES)
def test_peft_generator_and_delta_match_peft(model_name, kind, seed, r):
    gpt2 = model_name == "gpt2"
    model = tiny_gpt2() if gpt2 else tiny_llama()
    pm = peft_randlora(model, r=r, seed=seed, sparse=kind == "sparse", very_sparse=kind == "very_sparse",
                       targets=GPT2_TARGETS if gpt2 else None, fan_in_fan_out=gpt2)
    A_peft = pm.base_model.randlora_A["default"]
    B_peft = pm.base_model.randlora_B["default"]
    A, B = _our_bases(pm, kind, seed, r, gpt2)
    # bit-for-bit: same shape, and identical float32 bit patterns (PEFT cast its buffers to the fp32 model dtype)
    assert A.shape == A_peft.shape and B.shape == B_peft.shape
    assert torch.equal(A.float().view(torch.int32), A_peft.float().view(torch.int32))
    assert torch.equal(B.float().view(torch.int32), B_peft.float().view(torch.int32))

    expected = peft_layer_deltas(pm)
    for name, module in _targets(pm):
        key = name.removeprefix("base_model.model.") + ".weight"
        shape = tuple(module.base_layer.weight.shape)
        layer = LayerSpec(key=key, shape=shape, fan_in_fan_out=gpt2, num_bases=num_bases(min(shape), r))
        ours = reference_delta(layer, module.randlora_lambda["default"].detach(),
                               module.randlora_gamma["default"].detach(), A.reshape(r, -1).float(),
                               B.flatten(1).float(), 16.0 / r)
        assert ours.shape == expected[key].shape
        rel = float((ours - expected[key]).norm() / expected[key].norm())
        assert rel <= 1e-6, (key, rel)


def test_bf16_model_bases_are_cast_like_peft():
    """PEFT casts the shared bases to the base layer dtype; the cast_dtype parameter reproduces it exactly."""
    pm = peft_randlora(tiny_llama(dtype=torch.bfloat16), r=8, seed=3, very_sparse=True)
    A_peft = pm.base_model.randlora_A["default"].float()
    B_peft = pm.base_model.randlora_B["default"].float()
    gen = GeneratorSpec(name="peft", kind="very_sparse", seed=3, draw_dtype="float32", cast_dtype="bfloat16")
    A, B = peft_bases_raw(gen, 8, 96, 96)
    assert torch.equal(A.float(), A_peft) and torch.equal(B.float(), B_peft)
    uncast, _ = peft_bases_raw(GeneratorSpec(name="peft", kind="very_sparse", seed=3, draw_dtype="float32"), 8, 96, 96)
    assert not torch.equal(uncast, A_peft)  # the cast is real: without it the bases differ


@pytest.mark.parametrize("kind", ["sparse", "very_sparse"])
def test_chunked_sparse_draw_equals_peft_at_more_rows_than_a_chunk(kind):
    """Our sparse draw takes torch.rand in chunks of rows (bounded memory); PEFT draws B in one call. With
    max_dim = 1100 (> two chunks, not a multiple) PEFT's own ``_init_randlora_A_randlora_B_sparse`` gives the same
    bits."""
    import math
    from types import SimpleNamespace

    from peft import RandLoraConfig
    from peft.tuners.randlora.model import RandLoraModel

    out_dim, in_dim, r, seed = 1100, 70, 6, 17
    fake = SimpleNamespace(_find_dim=lambda config: (out_dim, in_dim))
    config = RandLoraConfig(r=r, projection_prng_key=seed)
    RandLoraModel._init_randlora_A_randlora_B_sparse(
        fake, config, "default", sparsity=3 if kind == "sparse" else math.sqrt(in_dim))
    A, B = peft_bases_raw(GeneratorSpec(name="peft", kind=kind, seed=seed, draw_dtype="float32"), r, in_dim, out_dim)
    assert B.shape == fake.randlora_B["default"].shape and B.shape[0] > 2 * 512
    assert torch.equal(A.view(torch.int32), fake.randlora_A["default"].view(torch.int32))
    assert torch.equal(B.view(torch.int32), fake.randlora_B["default"].view(torch.int32))
