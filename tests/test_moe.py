"""PEFT LoRA ``target_parameters`` adapters (``ParamWrapper``) on fused MoE experts merge equal to PEFT 0.21.2's
``merge_and_unload``: the fused 3-D ΔW (Mixtral / Qwen2-MoE ``mlp.experts.gate_up_proj`` (E, 2I, h),
``down_proj`` (E, h, I)) is split onto the per-expert checkpoint tensors transformers saves
(``block_sparse_moe.experts.N.w1/w3/w2``, ``mlp.experts.N.gate_proj/up_proj/down_proj``). Compared in checkpoint
keys (PEFT's merged model saved by save_pretrained), and by logits; float32 within 1e-5 relative, bfloat16 within
PEFT's own rounding (it rounds ΔW to bf16, then the sum)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_cli
from test_merge import _compare, _load_state
from tiny_models import randomize_trainable, tiny_gpt_oss, tiny_mixtral, tiny_qwen2_moe

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
CASES = {
    # (model, target_modules, target_parameters, extra LoraConfig kwargs)
    "mixtral-both": (tiny_mixtral, ["q_proj", "v_proj"], EXPERTS, {}),
    # a bare parameter name, matched as PEFT does (any module's parameter of that name)
    "mixtral-gate_up-rslora": (tiny_mixtral, None, ["gate_up_proj"], {"use_rslora": True}),
    "qwen2_moe-down-shared": (tiny_qwen2_moe, ["q_proj", "down_proj"], ["mlp.experts.down_proj"],
                              {"rank_pattern": {"down_proj": 2}, "bias": "all"}),  # + trained q/k/v biases
    # experts stored (E, in, out) in memory and on disk (is_transposed); a 2-D weight adapted as a raw parameter
    "gpt_oss-transposed": (tiny_gpt_oss, ["q_proj"], EXPERTS, {}),
    "mixtral-2d-param": (tiny_mixtral, ["q_proj"], ["self_attn.o_proj.weight"], {}),
}


def _adapter(model, targets, params, extra):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, target_parameters=params, **extra)
    return randomize_trainable(get_peft_model(model, config))


def _logits(model, vocab=64):
    ids = torch.arange(12).reshape(2, 6) % vocab
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_target_parameters_on_experts_merge_like_peft(tmp_path, case, dtype):
    build, targets, params, extra = CASES[case]
    build(dtype=dtype).save_pretrained(tmp_path / "base")
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    peft_model = _adapter(build(dtype=dtype), targets, params, extra)
    peft_model.save_pretrained(tmp_path / "adapter")
    want_logits = _logits(peft_model)
    peft_model.merge_and_unload().save_pretrained(tmp_path / "peft_merged")
    expected = load_file(str(tmp_path / "peft_merged" / "model.safetensors"))

    run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(merged) == set(expected) == set(base)
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    # exactly the adapted tensors moved: each expert's gate and up (w1, w3) for gate_up_proj, its down (w2) for
    # down_proj, the fused tensors where the checkpoint stores them fused, and the module targets
    moved = {"gate_up_proj": ("w1", "w3", "gate_proj", "up_proj", "gate_up_proj"), "down_proj": ("w2", "down_proj"),
             "o_proj.weight": ("o_proj",)}
    leaves = {leaf for p, names in moved.items() if any(q.endswith(p) for q in params) for leaf in names}
    for key in base:
        parts = key.removesuffix(".weight").split(".")
        in_experts = ".experts." in key
        adapted = ((in_experts and parts[-1] in leaves) or ("o_proj" in leaves and parts[-1] == "o_proj")
                   or (not in_experts and parts[-1] in (targets or []))
                   or (extra.get("bias") == "all" and key.endswith(".bias")))
        assert (key in changed) == adapted, key
    _compare(merged, expected, dtype, base)
    if dtype == torch.float32:
        got = type(build()).from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(_logits(got), want_logits, rtol=1e-4, atol=1e-4)


def test_target_parameters_adapter_is_refused_where_keys_cannot_be_mapped(tmp_path):
    """Without the base's config.json nothing tells how transformers stores the experts: one line, no output."""
    tiny_mixtral().save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "config.json").unlink()
    _adapter(tiny_mixtral(), ["q_proj"], EXPERTS, {}).save_pretrained(tmp_path / "adapter")
    result = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "target_parameters", "model.layers.0.mlp.experts")
    assert not (tmp_path / "out").exists()


def test_convert_of_target_parameters_adapter_is_refused_not_dropped(tmp_path):
    """convert has no base checkpoint to map the experts onto: refused in one line, never a file without them."""
    _adapter(tiny_mixtral(), ["q_proj"], EXPERTS, {}).save_pretrained(tmp_path / "adapter")
    result = run_cli("convert", tmp_path / "adapter", tmp_path / "d.safetensors", "--to", "dense", check=False)
    assert_one_line_error(result, "target_parameters", "merge")
    assert not (tmp_path / "d.safetensors").exists()


def test_wrappers_that_disagree_with_target_parameters_are_refused(tmp_path):
    """Which parameter a saved wrapper adapts follows from its nesting depth and target_parameters: a config naming
    fewer parameters than the file has wrappers cannot be assigned exactly, so it is refused, naming the module."""
    import json

    tiny_mixtral().save_pretrained(tmp_path / "base")
    _adapter(tiny_mixtral(), ["q_proj"], EXPERTS, {}).save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_parameters"] = ["mlp.experts.gate_up_proj"]
    config_path.write_text(json.dumps(config))
    result = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "model.layers.0.mlp.experts", "disagree")
    assert not (tmp_path / "out").exists()


def test_experts_split_across_shards_merge_like_peft(tmp_path):
    """A sharded base: one fused parameter's per-expert tensors lie in several shards, merged shard by shard."""
    tiny_mixtral().save_pretrained(tmp_path / "base", max_shard_size="16KB")
    assert len(list((tmp_path / "base").glob("*.safetensors"))) > 3
    peft_model = _adapter(tiny_mixtral(), ["q_proj"], EXPERTS, {})
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "peft_merged")
    run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")
    expected, merged = _load_state(tmp_path / "peft_merged"), _load_state(tmp_path / "out")
    assert set(merged) == set(expected)
    _compare(merged, expected, torch.float32)


def test_inspect_and_validate_list_target_parameters_wrappers(tmp_path):
    """inspect counts the expert wrappers' parameters and validate accepts the dir (both refused or under-reported
    them: validate raised 'adapts raw parameters')."""
    from conftest import run_cli
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_mixtral

    model = get_peft_model(tiny_mixtral(), LoraConfig(r=2, target_parameters=["mlp.experts.down_proj"],
                                                      init_lora_weights=False))
    model.save_pretrained(tmp_path / "moe")
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    import json

    info = json.loads(run_cli("inspect", tmp_path / "moe", "--json").stdout)
    assert info["trainable_params"] == trainable
    assert "target_parameters" in run_cli("validate", tmp_path / "moe").stdout
