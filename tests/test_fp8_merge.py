"""Merging into FP8 block-quantized bases (#28) against PEFT: a tiny Llama quantized in the test (fp8_models.py),
PEFT's merge_and_unload on its dequantized float32 twin as ΔW's oracle, and requant(dequant(W) + ΔW) from the tests'
own float64 quantizer as the expected file; partial blocks on both axes, an all-zero block, a sharded base with a
pair split across shards, untouched tensors byte-identical, the plain --dtype output, and each refusal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, merge_refusal, run_cli
from fp8_models import dequant64, fp8_llama, quantize64
from safetensors import safe_open
from tiny_models import LLAMA_TARGETS, peft_lora, peft_randlora, tiny_llama

FP8_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]  # all quantized (down_proj: one bf16)
TOL = 2e-4  # in units of W'/scale_inv: float32's error on W' (relative to the block's amax, ≤ ~7·2⁻²⁴·448)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _peft_merged(pm) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in pm.merge_and_unload().state_dict().items()}


def _assert_requantized(key: str, codes: torch.Tensor, scale: torch.Tensor, merged: torch.Tensor, block) -> None:
    """Our (codes, scale) against the tests' quantizer of PEFT's float32 W': scales within float32's last bits, codes
    equal except where W'/scale_inv lies within TOL of the midpoint between the two (float32 cannot decide there)."""
    want_q, want_s = quantize64(merged, block)
    assert torch.allclose(scale, want_s, rtol=1e-6, atol=0), key
    x = merged.double() / dequant64(torch.ones_like(merged).to(torch.float8_e4m3fn), want_s, block)
    got, want = codes.double(), want_q.double()
    differ = got != want
    assert int(differ.sum()) <= max(2, merged.numel() // 100), (key, int(differ.sum()))
    assert bool(((x - (got + want) / 2).abs()[differ] <= TOL).all()), key


@pytest.fixture(scope="module")
def fp8_sharded(tmp_path_factory):
    """A 3-shard FP8 tiny Llama (blocks 16 × 16, dims 40 / 20 / 72: partial blocks on both axes) whose layer-1
    q_proj has its scale in another shard than its weight; PEFT LoRA (all 7 projections, one of them bf16, the block
    of the zero-block weight kept zero) and RandLoRA (the 6 fp8 projections) adapters; PEFT's merged float32 states."""
    root = tmp_path_factory.mktemp("fp8")
    model, pairs = fp8_llama(root / "base", shards=3, split_pair="model.layers.1.self_attn.q_proj.weight")
    lora = peft_lora(model, r=4)
    with torch.no_grad():
        lora.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight[:16] = 0
    lora.save_pretrained(root / "lora")
    merged = {"lora": _peft_merged(lora)}
    model, _ = fp8_llama(root / "again", shards=3)
    rand = peft_randlora(model, r=6, seed=3, targets=FP8_TARGETS)
    rand.save_pretrained(root / "randlora")
    merged["randlora"] = _peft_merged(rand)
    return root, pairs, merged


@pytest.mark.parametrize("method", ["lora", "randlora"])
def test_merge_into_fp8_is_requantized_peft(fp8_sharded, tmp_path, method):
    root, pairs, merged = fp8_sharded
    base = root / "base"
    run_cli("merge", base, root / method, "-o", tmp_path / "out")
    out, before = _tensors(tmp_path / "out"), _tensors(base)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in base.iterdir())
    assert (tmp_path / "out" / "config.json").read_bytes() == (base / "config.json").read_bytes()
    index = "model.safetensors.index.json"  # rewritten (same content) by every merge
    assert json.loads((tmp_path / "out" / index).read_text()) == json.loads((base / index).read_text())
    targets = LLAMA_TARGETS if method == "lora" else FP8_TARGETS
    adapted = {k for k in before if k.endswith(".weight") and k.split(".")[-2] in targets}
    block = (16, 16)
    for key in before:
        assert out[key].dtype == before[key].dtype and out[key].shape == before[key].shape, key
        scale_of = key.removesuffix("_scale_inv") if key.endswith("weight_scale_inv") else None
        if key in pairs and key in adapted:
            _assert_requantized(key, out[key], out[key.removesuffix(".weight") + ".weight_scale_inv"],
                                merged[method][key], block)
        elif key in adapted:  # the bf16 module (modules_to_not_convert): one rounding of W + ΔW
            want = merged[method][key]
            assert bool(((out[key].float() - want).abs() <= want.abs() * 2 ** -8 + 1e-30).all()), key
        elif scale_of not in adapted:
            assert _raw(out[key]) == _raw(before[key]), key  # untouched: byte-identical
    if method == "lora":  # base block and ΔW block both zero: a finite positive scale and zero codes
        key = "model.layers.0.self_attn.q_proj"
        assert float(out[key + ".weight_scale_inv"][0, 0]) == 1.0
        assert not bool(out[key + ".weight"][:16, :16].float().any())


@pytest.mark.parametrize("config_as_written", ["full", "transformers defaults"])
def test_merge_into_fp8_with_128_blocks(tmp_path, config_as_written):
    """128 × 128 blocks; also with the config as transformers reads it (no weight_block_size: its default
    [128, 128]; activation_scheme in capitals, which it lowercases)."""
    model, pairs = fp8_llama(tmp_path / "base", block=(128, 128), hidden=160, intermediate=200, layers=1,
                             not_converted=(), zero_block="")
    if config_as_written != "full":
        config = json.loads((tmp_path / "base" / "config.json").read_text())
        del config["quantization_config"]["weight_block_size"]
        config["quantization_config"]["activation_scheme"] = "Dynamic"
        (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    pm = peft_lora(model, r=4)
    pm.save_pretrained(tmp_path / "lora")
    merged = _peft_merged(pm)
    run_cli("merge", tmp_path / "base", tmp_path / "lora", "-o", tmp_path / "out")
    out = _tensors(tmp_path / "out")
    assert tuple(out["model.layers.0.mlp.up_proj.weight_scale_inv"].shape) == (2, 2)
    for key in pairs:
        _assert_requantized(key, out[key], out[key.removesuffix(".weight") + ".weight_scale_inv"], merged[key],
                            (128, 128))


def test_dtype_bfloat16_writes_a_plain_checkpoint(fp8_sharded, tmp_path):
    root, pairs, merged = fp8_sharded
    run_cli("merge", root / "base", root / "lora", "-o", tmp_path / "out", "--dtype", "bfloat16")
    out = _tensors(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert not [k for k in out if "scale" in k] and set(index["weight_map"]) == set(out)
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    for key, want in merged["lora"].items():
        if key in out:  # dequant + ΔW in float32, one rounding: within half an ulp of PEFT's float32 W'
            assert bool(((out[key].float() - want).abs() <= want.abs() * 2 ** -8 + 1e-30).all()), key
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert not any(type(m).__name__.startswith("FP8") for m in plain.modules())


def test_dtype_bfloat16_dequantizes_untouched_fp8_weights_once(tmp_path):
    _, pairs = fp8_llama(tmp_path / "base", layers=1)
    pm = peft_lora(tiny_llama(hidden=40, intermediate=72, layers=1), r=2, targets=["q_proj"])
    pm.save_pretrained(tmp_path / "lora")
    run_cli("merge", tmp_path / "base", tmp_path / "lora", "-o", tmp_path / "out", "--dtype", "bfloat16")
    out = _tensors(tmp_path / "out")
    for key, (codes, scale) in pairs.items():
        if "q_proj" not in key:
            assert torch.equal(out[key], dequant64(codes, scale, (16, 16)).float().to(torch.bfloat16)), key


def _quantized_base(tmp_path: Path, quantization_config: dict, extra: dict | None = None) -> Path:
    base = tmp_path / "base"
    tiny_llama(hidden=32, intermediate=48, layers=1).save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (base / "config.json").write_text(json.dumps(config))
    if extra:
        from safetensors.torch import save_file

        state = _tensors(base)
        save_file({**state, **extra}, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base


@pytest.fixture
def lora_dir(tmp_path):
    peft_lora(tiny_llama(hidden=32, intermediate=48, layers=1), r=2, targets=["q_proj"]).save_pretrained(
        tmp_path / "lora")
    return tmp_path / "lora"


@pytest.mark.parametrize("config,named", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq (4-bit)"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "awq (4-bit)"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes 4-bit"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes 8-bit"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "compressed-tensors"),
    ({"quant_method": "mystery-quant"}, "mystery-quant"),
    ({"bits": 4}, "an unnamed method"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}, "scale_fmt 'ue8m0'"),
    ({"quant_method": "fp8", "weight_block_size": None}, "per-tensor scales"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt 'e5m2'"),
])
def test_other_quantized_bases_are_refused_by_name(tmp_path, lora_dir, config, named):
    base = _quantized_base(tmp_path, config)
    err = merge_refusal(base, lora_dir, tmp_path / "out")
    assert named in err and "config.json" in err, err
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_gptq_refusal_word_for_word(tmp_path, lora_dir):
    base = _quantized_base(tmp_path, {"quant_method": "gptq", "bits": 4})
    assert merge_refusal(base, lora_dir, tmp_path / "out") == (
        f"randlora-io: error: {base / 'config.json'}: the base is quantized with gptq (4-bit) (quantization_config); "
        "merging into its packed or scaled weights is not supported: merge into the unquantized base, then quantize "
        "the result")


def test_quantization_state_beside_a_weight_without_a_config_is_refused(tmp_path, lora_dir):
    base = tmp_path / "base"
    tiny_llama(hidden=32, intermediate=48, layers=1).save_pretrained(base)
    from safetensors.torch import save_file

    state = _tensors(base)
    state["model.layers.0.self_attn.q_proj.weight_scale"] = torch.ones(32, 1)
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    err = merge_refusal(base, lora_dir, tmp_path / "out")
    assert "model.layers.0.self_attn.q_proj.weight_scale" in err and "does not understand" in err, err


def test_a_delta_on_a_scale_tensor_is_refused(tmp_path):
    from safetensors.torch import save_file

    from randlora_io.sources.dense import METADATA_KEY

    fp8_llama(tmp_path / "base", layers=1)
    key = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    save_file({key: torch.ones(3, 3)}, str(tmp_path / "d.safetensors"),
              metadata={METADATA_KEY: json.dumps({"format_version": "1.0"})})
    err = merge_refusal(tmp_path / "base", tmp_path / "d.safetensors", tmp_path / "out")
    assert key in err and "quantization state" in err, err


def test_an_fp8_weight_without_its_scale_is_refused(tmp_path, lora_dir):
    from safetensors.torch import save_file

    fp8_llama(tmp_path / "base", hidden=32, intermediate=48, layers=1)
    state = _tensors(tmp_path / "base")
    del state["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    save_file(state, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    err = merge_refusal(tmp_path / "base", lora_dir, tmp_path / "out")
    assert "model.layers.0.self_attn.q_proj.weight" in err and "weight_scale_inv" in err, err


def test_two_processes_write_the_same_fp8_bytes_as_one(fp8_sharded, tmp_path):
    from test_distributed_merge import _files, _torchrun

    root, _, _ = fp8_sharded
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # as _torchrun: GEMMs differ by threads
    subprocess.run([sys.executable, "-m", "randlora_io", "merge", str(root / "base"), str(root / "randlora"), "-o",
                    str(tmp_path / "single")], env=env, check=True, capture_output=True, cwd=Path(__file__).parents[1])
    proc = _torchrun("merge", str(root / "base"), str(root / "randlora"), "-o", str(tmp_path / "shared"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(tmp_path / "shared") == _files(tmp_path / "single")


def test_base_is_untouched(fp8_sharded, tmp_path):
    root, _, _ = fp8_sharded
    before = {p.name: p.read_bytes() for p in (root / "base").iterdir()}
    run_cli("merge", root / "base", root / "lora", "-o", tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (root / "base").iterdir()} == before
    shutil.rmtree(tmp_path / "out")


def test_apply_adapter_on_an_fp8_checkpoint_loaded_on_the_cpu(tmp_path):
    """transformers dequantizes an FP8 checkpoint (full blocks) to bf16 nn.Linear on a CPU-only machine:
    apply_adapter works there as on any bf16 model; an FP8 weight in memory (FP8Linear on a GPU) is refused."""
    from transformers import AutoModelForCausalLM

    from randlora_io import apply_adapter
    from randlora_io.errors import BaseModelMismatchError

    model, _ = fp8_llama(tmp_path / "base", hidden=32, intermediate=48, layers=1, not_converted=(), zero_block="")
    peft_lora(model, r=2, targets=["q_proj"]).save_pretrained(tmp_path / "lora")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    q = loaded.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear" and q.weight.dtype == torch.bfloat16
    before = q.weight.detach().clone()
    apply_adapter(loaded, str(tmp_path / "lora"))
    assert not torch.equal(before, q.weight)
    q.weight.data = q.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(BaseModelMismatchError, match="FP8 layer"):
        apply_adapter(loaded, str(tmp_path / "lora"))


def test_a_dense_delta_and_an_unmerge_on_fp8(fp8_sharded, tmp_path):
    """Other adapter kinds take the same path: the LoRA as a dense delta file merges like the LoRA dir; --subtract
    re-quantizes dequant(W) − ΔW."""
    root, pairs, merged = fp8_sharded
    run_cli("convert", root / "lora", tmp_path / "d.safetensors", "--to", "dense", "--base", root / "base")
    run_cli("merge", root / "base", tmp_path / "d.safetensors", "-o", tmp_path / "dense")
    run_cli("merge", root / "base", root / "lora", "-o", tmp_path / "dir")
    dense, lora = _tensors(tmp_path / "dense"), _tensors(tmp_path / "dir")
    for key in pairs:
        _assert_requantized(key, dense[key], dense[key.removesuffix(".weight") + ".weight_scale_inv"],
                            merged["lora"][key], (16, 16))
    run_cli("merge", root / "base", root / "lora", "-o", tmp_path / "sub", "--subtract")
    sub, base = _tensors(tmp_path / "sub"), _tensors(root / "base")
    key = "model.layers.0.mlp.up_proj.weight"
    w = dequant64(*pairs[key], (16, 16)).float()
    _assert_requantized(key, sub[key], sub[key.removesuffix(".weight") + ".weight_scale_inv"],
                        w - (merged["lora"][key] - w), (16, 16))
    assert _raw(lora["model.norm.weight"]) == _raw(base["model.norm.weight"])


@pytest.mark.parametrize("method,extra", [("ties", ["--density", "0.5"]), ("dare_linear", ["--density", "0.7",
                                                                                            "--seed", "4"])])
def test_composition_methods_into_an_fp8_base(fp8_sharded, tmp_path, method, extra):
    """``--method`` composes the inputs' float32 τᵢ (PEFT's own ΔW here) and the sum is added to dequant(W) before
    re-quantizing: the same rule as one adapter, checked against the composition reference on PEFT's deltas."""
    from peft import PeftModel
    from tiny_models import peft_layer_deltas

    from randlora_io.merge.compose import compose, dare_keep_mask

    root, pairs, _ = fp8_sharded
    taus = []
    for i, name in enumerate(("lora", "randlora")):
        twin, _ = fp8_llama(tmp_path / f"twin{i}", shards=1)
        taus.append(peft_layer_deltas(PeftModel.from_pretrained(twin, root / name)))
    twin_state = {k: v.detach().float() for k, v in fp8_llama(tmp_path / "twin", shards=1)[0].state_dict().items()}
    run_cli("merge", root / "base", root / "lora", root / "randlora", "-o", tmp_path / "out", "--method", method,
            "--weight", "1", "--weight", "0.5", *extra)
    out, before = _tensors(tmp_path / "out"), _tensors(root / "base")
    density = float(extra[1])
    checked = 0
    for key in pairs:
        inputs = [taus[0][key], taus[1].get(key)]
        masks = [None if t is None or "--seed" not in extra else
                 dare_keep_mask(int(extra[-1]), i, key, tuple(t.shape), density) for i, t in enumerate(inputs)]
        want = twin_state[key] + compose(inputs, [1.0, 0.5], method, density=density, keep_masks=masks)
        _assert_requantized(key, out[key], out[key.removesuffix(".weight") + ".weight_scale_inv"], want, (16, 16))
        checked += 1
    assert checked == len(pairs)
    for key in before:
        if key not in pairs and not key.endswith("_scale_inv") and key.split(".")[-2] not in LLAMA_TARGETS:
            assert _raw(out[key]) == _raw(before[key]), key


@pytest.mark.parametrize("ft_kind", ["fp8", "bf16"])
def test_a_fine_tuned_checkpoint_into_an_fp8_base(tmp_path, ft_kind):
    """A fine-tuned checkpoint as input (DeepSeek-V3 → R1: both fp8; or a bf16 fine-tune of the dequantized base):
    τ = dequant(W_ft) − dequant(W_base) per fp8 pair, its scales no weights; merged alone, the fp8 output is
    requant(dequant(W_base) + τ), i.e. the fine-tune re-quantized. Before: refused ('another architecture'), or
    an internal error on the fp8 codes."""
    _, pairs = fp8_llama(tmp_path / "base", layers=1)
    if ft_kind == "fp8":
        ft_model, _ = fp8_llama(tmp_path / "ft", layers=1, seed=1)
    else:
        ft_model = tiny_llama(hidden=40, intermediate=72, layers=1, seed=1).to(torch.bfloat16)
        ft_model.save_pretrained(tmp_path / "ft")
    ft_state = {k: v.detach().float() for k, v in ft_model.state_dict().items()}
    run_cli("merge", tmp_path / "base", tmp_path / "ft", "-o", tmp_path / "out")
    out, base = _tensors(tmp_path / "out"), _tensors(tmp_path / "base")
    for key in pairs:
        w = dequant64(*pairs[key], (16, 16)).float()
        want = w + (ft_state[key] - w)  # the float32 sum the merge computes
        _assert_requantized(key, out[key], out[key.removesuffix(".weight") + ".weight_scale_inv"], want, (16, 16))
    for key, tensor in out.items():  # bf16 weights: the fine-tune's (one rounding of base + τ)
        if key not in pairs and not key.endswith("_scale_inv"):
            want = (base[key].float() + (ft_state[key] - base[key].float())).to(tensor.dtype)
            assert torch.equal(tensor, want), key
    run_cli("merge", tmp_path / "base", tmp_path / "ft", "-o", tmp_path / "plain", "--dtype", "bfloat16")
    plain = _tensors(tmp_path / "plain")
    assert not any(k.endswith("_scale_inv") for k in plain)
    for key in pairs:
        w = dequant64(*pairs[key], (16, 16)).float()
        assert torch.equal(plain[key], (w + (ft_state[key] - w)).bfloat16()), key


def test_fp8_codes_a_fine_tuned_checkpoint_cannot_dequantize_are_refused(tmp_path):
    """fp8 tensors in a fine-tuned checkpoint without a quantization_config: never silently left as the base's."""
    from safetensors.torch import load_file, save_file

    tiny_llama(hidden=40, intermediate=72, layers=1).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    fp8_llama(tmp_path / "ft", layers=1, seed=1)
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "ft" / "config.json").write_text(json.dumps(config))
    state = load_file(str(tmp_path / "ft" / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.endswith("_scale_inv")}, str(tmp_path / "ft" / "model.safetensors"))
    line = merge_refusal(tmp_path / "base", tmp_path / "ft", tmp_path / "out")
    assert "F8_E4M3" in line and "cannot read as a weight" in line, line


def test_dtype_float16_refuses_an_untouched_fp8_weight_beyond_float16(tmp_path):
    """--dtype float16 dequantizes every fp8 weight; one whose values exceed float16 (scale_inv 1000: up to 448 000)
    is refused as for a plain base, not written as Inf (before: exit 0, 544 Inf in an untouched v_proj)."""
    from safetensors.torch import load_file, save_file

    fp8_llama(tmp_path / "base", layers=1)
    path = tmp_path / "base" / "model.safetensors"
    state = load_file(str(path))
    key = "model.layers.0.self_attn.v_proj.weight_scale_inv"
    state[key] = torch.full_like(state[key], 1000.0)
    save_file(state, str(path), metadata={"format": "pt"})
    lora_dir = tmp_path / "lora"
    peft_lora(tiny_llama(hidden=40, intermediate=72, layers=1), r=2, targets=["q_proj"]).save_pretrained(lora_dir)
    result = run_cli("merge", tmp_path / "base", lora_dir, "-o", tmp_path / "out", "--dtype", "float16", check=False)
    assert_one_line_error(result, "v_proj.weight' has values beyond torch.float16")
    assert not (tmp_path / "out").exists()


def test_an_adapter_trained_on_the_cpu_loaded_fp8_model_merges_back_into_it(tmp_path):
    """transformers loads an FP8 checkpoint on a CPU as dequantized bf16; an adapter attached there records the
    fingerprint of those bf16 weights. Merging it back into the FP8 checkpoint is the same base (before: refused as
    'trained on another base'); a different base is still refused."""
    from transformers import AutoModelForCausalLM

    from randlora_io.train.attach import attach
    from randlora_io.train.config import RandloraConfig

    fp8_llama(tmp_path / "base", hidden=32, intermediate=48, layers=1, not_converted=(), zero_block="")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    handle = attach(loaded, RandloraConfig(r=4, seed=3, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
    handle.save(tmp_path / "a.safetensors")
    run_cli("merge", tmp_path / "base", tmp_path / "a.safetensors", "-o", tmp_path / "out")
    fp8_llama(tmp_path / "other", hidden=32, intermediate=48, layers=1, not_converted=(), zero_block="", seed=5)
    line = merge_refusal(tmp_path / "other", tmp_path / "a.safetensors", tmp_path / "out2")
    assert "was trained on another base" in line, line


def test_composition_stats_count_each_fp8_weight_once_whatever_the_sharding(tmp_path):
    """A weight whose scale sits in another shard is merged once per shard (the same result); the composition
    summary counts it once (before: a 3-shard base reported 50 880 elements composed for 26 880)."""
    from randlora_io import merge

    lora = [tmp_path / "l1", tmp_path / "l2"]
    for i, path in enumerate(lora):
        peft_lora(tiny_llama(hidden=40, intermediate=72, layers=2), r=4, scale_seed=i).save_pretrained(path)
    reports = {}
    for shards in (1, 3):
        fp8_llama(tmp_path / f"base{shards}", shards=shards, split_pair="model.layers.1.self_attn.q_proj.weight"
                  if shards > 1 else None)
        reports[shards] = merge(tmp_path / f"base{shards}", lora, tmp_path / f"out{shards}", method="ties",
                                density=0.5).compose_stats
    numel = sum(t.numel() for k, t in tiny_llama(hidden=40, intermediate=72, layers=2).state_dict().items()
                if k.split(".")[-2] in LLAMA_TARGETS)
    assert reports[1].elements == reports[3].elements == numel
    assert reports[1] == reports[3]
