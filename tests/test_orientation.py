"""Each layer's orientation and PEFT's target selection come from the base model, as PEFT decides them when it loads
an adapter dir (issue #14 item 1, issue #16): never from the config's single ``fan_in_fan_out``. The oracle is PEFT's
``merge_and_unload`` of the dir loaded with ``PeftModel.from_pretrained`` (what a user gets from PEFT)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file, save_file
from test_merge import _compare, _load_state
from tiny_archs import ARCHS, bert2gpt2, untied_gpt2
from tiny_models import peft_lora, peft_randlora, tiny_llama

from randlora_io.format.adapter import read_adapter, write_adapter


def _peft_loaded_merge(make_model, adapter_dir) -> dict[str, torch.Tensor]:
    """What PEFT does with the dir as saved on disk: load it onto a fresh base, merge_and_unload."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(make_model(), adapter_dir).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _edit_config(adapter_dir: Path, **changes) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _merge_equals_peft(tmp_path, base, adapter_dir, make_model, dtype=torch.float32):
    expected = _peft_loaded_merge(make_model, adapter_dir)
    run_cli("merge", base, adapter_dir, "-o", tmp_path / "out")
    ours = _load_state(tmp_path / "out")
    _compare(ours, expected, dtype, _load_state(base))
    return ours


# ------------------------------------------------------------------------------------ item 1: per-layer orientation


GPT2_MIXED = [["attn.c_proj", "lm_head"], ["c_proj", "lm_head"], ["c_attn", "mlp.c_fc", "lm_head"]]


@pytest.mark.parametrize("targets", GPT2_MIXED, ids=["square-conv1d", "conv1d-wide", "conv1d-fused"])
@pytest.mark.parametrize("method", ["randlora", "lora"])
def test_gpt2_conv1d_and_linear_layers_in_one_adapter_equal_peft(tmp_path, method, targets):
    """PEFT saves one fan_in_fan_out (here False, from lm_head) for Conv1D and Linear layers alike."""
    base = tmp_path / "base"
    untied_gpt2().save_pretrained(base)
    pm = (peft_randlora(untied_gpt2(), r=6, seed=3, targets=targets) if method == "randlora"
          else peft_lora(untied_gpt2(), r=4, targets=targets))
    pm.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    _merge_equals_peft(tmp_path, base, tmp_path / "peft", untied_gpt2)
    if method == "randlora":  # bases regenerated at PEFT's size: (out, in) of Conv1D read as PEFT's _find_dim does
        run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
        header = read_adapter(tmp_path / "a.safetensors").header
        assert (header.rank, 1, header.min_dim) == tuple(pm.base_model.randlora_A["default"].shape)
        assert header.max_dim == pm.base_model.randlora_B["default"].shape[0]


@pytest.mark.parametrize("method", ["randlora", "lora"])
def test_gpt2_saved_projection_and_lora_to_dense_take_orientation_from_the_base(tmp_path, method):
    base = tmp_path / "base"
    untied_gpt2().save_pretrained(base)
    targets = ["c_proj", "lm_head"]
    pm = (peft_randlora(untied_gpt2(), r=6, seed=4, targets=targets, save_projection=True) if method == "randlora"
          else peft_lora(untied_gpt2(), r=4, targets=targets))
    pm.save_pretrained(tmp_path / "peft")
    from tiny_models import peft_layer_deltas

    from randlora_io.sources.dense import read_dense

    expected = peft_layer_deltas(pm)
    run_cli("convert", tmp_path / "peft", tmp_path / "d.safetensors", "--to", "dense", "--base", base)
    deltas = read_dense(tmp_path / "d.safetensors")
    for key, want in expected.items():
        assert deltas[key].shape == want.shape and torch.allclose(deltas[key], want, rtol=1e-5, atol=1e-7), key


def test_without_the_base_config_a_mixed_gpt2_adapter_is_refused(tmp_path):
    """No config.json: which layers are Conv1D cannot be told, and fan_in_fan_out=False would be a guess."""
    pm = peft_lora(untied_gpt2(), r=4, targets=["c_attn", "lm_head"])
    pm.save_pretrained(tmp_path / "peft")
    result = run_cli("convert", tmp_path / "peft", tmp_path / "d.safetensors", "--to", "dense", check=False)
    assert_one_line_error(result, "c_attn", "Conv1D", "--base")
    assert not (tmp_path / "d.safetensors").exists()
    base = tmp_path / "base"
    untied_gpt2().save_pretrained(base)
    (base / "config.json").unlink()
    result = run_cli("merge", base, tmp_path / "peft", "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "no config.json")
    assert not (tmp_path / "out").exists()


def test_inspect_and_validate_of_mixed_gpt2_dirs(tmp_path):
    """inspect describes a dir without needing its layer types; validate reads the local base named in the config."""
    pm = peft_lora(untied_gpt2(), r=4, targets=["c_attn", "lm_head"])
    pm.save_pretrained(tmp_path / "lora")
    assert "c_attn" in run_cli("inspect", tmp_path / "lora").output
    base = tmp_path / "base"
    untied_gpt2().save_pretrained(base)
    peft_randlora(untied_gpt2(), r=6, seed=3, targets=["c_proj", "lm_head"]).save_pretrained(tmp_path / "rl")
    _edit_config(tmp_path / "rl", base_model_name_or_path=str(base))
    assert "checked against its local base" in run_cli("validate", tmp_path / "rl").output


def test_gpt_bigcode_layers_named_like_gpt2_are_linear(tmp_path):
    """GPTBigCode's c_attn / c_proj / c_fc are nn.Linear: the model type, not the name, decides."""
    arch = ARCHS["gpt_bigcode"]
    base = tmp_path / "base"
    arch.model().save_pretrained(base)
    pm = peft_randlora(arch.model(), r=4, seed=2, targets=arch.targets, fan_in_fan_out=True)
    pm.save_pretrained(tmp_path / "peft")
    _edit_config(tmp_path / "peft", fan_in_fan_out=True)  # a wrong flag: PEFT fixes it per layer type on load
    _merge_equals_peft(tmp_path, base, tmp_path / "peft", arch.model)


@pytest.mark.parametrize("method", ["randlora", "lora"])
def test_composite_model_takes_each_part_layer_types_from_its_nested_config(tmp_path, method):
    """A BERT encoder with a GPT-2 decoder: config.json's model_type is "encoder-decoder"; the decoder's Conv1D layers
    are told by the nested decoder config, the encoder's Linear ones by the encoder's."""
    base = tmp_path / "base"
    bert2gpt2().save_pretrained(base)
    targets = ["attn.c_proj", "crossattention.q_attn", "query", "attention.output.dense"]
    pm = (peft_randlora(bert2gpt2(), r=6, seed=3, targets=targets) if method == "randlora"
          else peft_lora(bert2gpt2(), r=4, targets=targets))
    pm.save_pretrained(tmp_path / "peft")
    _merge_equals_peft(tmp_path, base, tmp_path / "peft", bert2gpt2)


def test_randlora_file_with_a_wrong_orientation_is_refused(tmp_path):
    """A file converted before orientation came from the base may say Linear for a square Conv1D layer."""
    base = tmp_path / "base"
    untied_gpt2().save_pretrained(base)
    peft_randlora(untied_gpt2(), r=6, seed=3, targets=["attn.c_proj"]).save_pretrained(tmp_path / "peft")
    run_cli("convert", tmp_path / "peft", tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
    adapter = read_adapter(tmp_path / "a.safetensors")
    from randlora_io.format.adapter import build_adapter

    wrong = build_adapter(generator=adapter.header.generator, rank=adapter.header.rank, alpha=adapter.header.alpha,
                          layers={k: (l.shape, False) for k, l in adapter.layers.items()}, lambdas=adapter.lambdas,
                          gammas=adapter.gammas)
    write_adapter(wrong, tmp_path / "wrong.safetensors")
    result = run_cli("merge", base, tmp_path / "wrong.safetensors", "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "fan_in_fan_out=false", "Conv1D", "convert the file again")


def test_conv1d_table_covers_every_transformers_architecture_that_builds_conv1d():
    """CONV1D_LAYERS is the only place orientation knowledge lives: it must name every model whose modeling code
    builds a Conv1D, with exactly the leaf names it builds them under."""
    import transformers

    from randlora_io.checkpoint.base_model import CONV1D_LAYERS

    models = Path(transformers.__file__).parent / "models"
    users = {}
    for path in models.glob("*/modeling_*.py"):
        names = set(re.findall(r"self\.(\w+)\s*=\s*Conv1D\(", path.read_text(encoding="utf-8")))
        if names:
            users[path.parent.name] = names
    model_types = {"openai": "openai-gpt"}
    assert {model_types.get(d, d): n for d, n in users.items()} == {t: set(n) for t, n in CONV1D_LAYERS.items()}
    from transformers.pytorch_utils import Conv1D

    model = untied_gpt2()  # and the names are those of real Conv1D modules
    conv = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert conv == {"c_attn", "c_proj", "c_fc"} <= CONV1D_LAYERS[model.config.model_type]


# ------------------------------------------------------------------- issue #16: config and weights disagree


def _llama_dir(tmp_path, method, **kwargs):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    pm = (peft_randlora(tiny_llama(), r=6, seed=9, **kwargs) if method == "randlora"
          else peft_lora(tiny_llama(), r=4, **kwargs))
    pm.save_pretrained(tmp_path / "peft")
    return base, tmp_path / "peft"


@pytest.mark.parametrize("method", ["randlora", "lora"])
def test_target_modules_narrower_than_the_weights_loads_only_the_targeted_layers(tmp_path, method):
    base, peft_dir = _llama_dir(tmp_path, method)
    _edit_config(peft_dir, target_modules=["q_proj", "v_proj"])  # RandLoRA: PEFT's bases shrink to (64, 64)
    ours = _merge_equals_peft(tmp_path, base, peft_dir, tiny_llama)
    base_state = _load_state(base)
    assert torch.equal(ours["model.layers.0.mlp.down_proj.weight"], base_state["model.layers.0.mlp.down_proj.weight"])
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"],
                           base_state["model.layers.0.self_attn.q_proj.weight"])
    result = run_cli("convert", peft_dir, tmp_path / "d.safetensors", "--to", "dense", "--base", base)
    assert "ignored 10 saved layer(s) that adapter_config.json does not target" in result.stderr


@pytest.mark.parametrize("method", ["randlora", "lora"])
@pytest.mark.parametrize("changes", [{"layers_to_transform": [1]}, {"layers_to_transform": 0, "layers_pattern": "layers"},
                                     {"exclude_modules": ["model.layers.0.mlp.gate_proj"]},
                                     {"target_modules": r".*layers\.1\..*(q_proj|down_proj)"}],
                         ids=["layers_to_transform", "layers_pattern", "exclude_modules", "regex"])
def test_layers_to_transform_pattern_and_exclusions_as_peft_loads_them(tmp_path, method, changes):
    base, peft_dir = _llama_dir(tmp_path, method)
    _edit_config(peft_dir, **changes)
    _merge_equals_peft(tmp_path, base, peft_dir, tiny_llama)


@pytest.mark.parametrize("method", ["randlora", "lora"])
def test_wrong_fan_in_fan_out_for_linear_layers_is_fixed_per_layer_as_peft_does(tmp_path, method):
    base, peft_dir = _llama_dir(tmp_path, method)
    _edit_config(peft_dir, fan_in_fan_out=True)
    _merge_equals_peft(tmp_path, base, peft_dir, tiny_llama)
    arch = ARCHS["gpt2"]  # and Conv1D layers with a False flag
    gpt2_base = tmp_path / "gpt2_base"
    arch.model().save_pretrained(gpt2_base)
    targets = ["c_attn", "c_proj", "c_fc"]
    pm = peft_randlora(arch.model(), r=4, seed=2, targets=targets) if method == "randlora" else \
        peft_lora(arch.model(), r=4, targets=targets)
    pm.save_pretrained(tmp_path / "gpt2_peft")
    _edit_config(tmp_path / "gpt2_peft", fan_in_fan_out=False)
    (tmp_path / "out").rename(tmp_path / "out_llama")
    _merge_equals_peft(tmp_path, gpt2_base, tmp_path / "gpt2_peft", arch.model)


def test_a_targeted_layer_without_saved_weights(tmp_path):
    """PEFT adapts it from its init (λ = 0: no change) and sizes the bases with it: exact while it does not grow them,
    refused when it would."""
    base, peft_dir = _llama_dir(tmp_path, "randlora")
    weights = peft_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if ".k_proj." not in k}, weights)  # (32, 64): within the bases
    _merge_equals_peft(tmp_path, base, peft_dir, tiny_llama)
    save_file({k: v for k, v in tensors.items() if ".mlp." not in k}, weights)  # (96, 64) and (64, 96): the largest
    result = run_cli("merge", base, peft_dir, "-o", tmp_path / "out2", check=False)
    assert_one_line_error(result, ".mlp.", "config and weights disagree")
    assert not (tmp_path / "out2").exists()


def test_lora_targeted_layer_without_saved_weights_and_random_init_is_refused(tmp_path):
    base, peft_dir = _llama_dir(tmp_path, "lora")  # the test adapters say init_lora_weights=False: PEFT draws them
    weights = peft_dir / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if ".k_proj." not in k}, weights)
    result = run_cli("merge", base, peft_dir, "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "k_proj", "init_lora_weights", "config and weights disagree")


def test_a_config_that_targets_none_of_the_weights_is_refused(tmp_path):
    base, peft_dir = _llama_dir(tmp_path, "lora")
    _edit_config(peft_dir, target_modules=["no_such_layer"])
    result = run_cli("merge", base, peft_dir, "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "targets none", "config and weights disagree")


def test_mixed_conv1d_and_linear_adapter_converts_to_peft_lora(tmp_path):
    """PEFT writes one fan_in_fan_out and fixes it per layer type on load: a mixed adapter converts, not refused."""
    from peft import PeftModel
    from tiny_models import peft_layer_deltas

    base = tmp_path / "base"
    untied_gpt2().save_pretrained(base)
    pm = peft_randlora(untied_gpt2(), r=6, seed=3, targets=["c_proj", "lm_head"])
    pm.save_pretrained(tmp_path / "peft")
    run_cli("convert", tmp_path / "peft", tmp_path / "lora", "--to", "peft-lora", "--rank", "48", "--base", base)
    reloaded = PeftModel.from_pretrained(untied_gpt2(), tmp_path / "lora")
    expected = peft_layer_deltas(pm)
    for key, delta in peft_layer_deltas(reloaded).items():
        assert delta.shape == expected[key].shape
        assert float((delta - expected[key]).norm() / expected[key].norm()) <= 1e-5, key


def test_dense_delta_fitted_with_the_base_records_peft_orientation_and_exports_to_peft(tmp_path):
    """A fit of a GPT-2 dense delta records each layer's type from --base: the PEFT dir it exports has PEFT's bases
    size, PEFT loads it with the fitted ΔW, and merging the fitted file is not mistaken for a wrong orientation."""
    from peft import PeftModel
    from tiny_models import peft_layer_deltas

    base = tmp_path / "base"
    untied_gpt2().save_pretrained(base)
    pm = peft_lora(untied_gpt2(), r=2, targets=["attn.c_proj", "c_fc"])
    pm.save_pretrained(tmp_path / "lora")
    run_cli("convert", tmp_path / "lora", tmp_path / "d.safetensors", "--to", "dense", "--base", base)
    run_cli("convert", tmp_path / "d.safetensors", tmp_path / "fit.safetensors", "--to", "randlora", "--rank", "8",
            "--generator", "peft", "--base", base)
    fitted = read_adapter(tmp_path / "fit.safetensors")
    assert all(layer.fan_in_fan_out for layer in fitted.layers.values())
    run_cli("convert", tmp_path / "fit.safetensors", tmp_path / "peft", "--to", "peft-randlora")
    reloaded = PeftModel.from_pretrained(untied_gpt2(), tmp_path / "peft")
    for key, delta in peft_layer_deltas(reloaded).items():
        assert float((delta - fitted.delta(key)).norm() / fitted.delta(key).norm()) <= 1e-5, key
    run_cli("merge", base, tmp_path / "fit.safetensors", "-o", tmp_path / "out")
    run_cli("convert", tmp_path / "d.safetensors", tmp_path / "philox.safetensors", "--to", "randlora", "--rank", "8")
    run_cli("merge", base, tmp_path / "philox.safetensors", "-o", tmp_path / "out2")
