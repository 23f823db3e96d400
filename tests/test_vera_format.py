"""VeRA in the randlora file (SPEC §2.1, format 1.2): PEFT VeRA dir → file losslessly (seed + vectors), the file
merged equals PEFT's merge_and_unload, file → PEFT VeRA dir loads in PEFT with identical outputs, the philox
option, header rules, and 1.1 readers refusing VeRA files as a newer method. On the code before 1.2 there was no
VeRA file: every convert here was refused (unsupported peft_type 'VERA'), and a VeRA header was not readable."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, assert_one_line_error, run_cli
from randlora_io.errors import HeaderError
from randlora_io.format.adapter import read_adapter
from randlora_io.format.spec import GeneratorSpec
from randlora_io.format.vera import VeraLayer, kaiming_bound, philox_vera_bases
from randlora_io.format.vera_file import build_vera_adapter, read_any_adapter, read_vera_adapter, write_vera_adapter
from randlora_io.checkpoint.safetensors_io import read_header
from test_peft_vera import GPT2_TARGETS, assert_merges_like_peft, make_vera, peft_merged
from tiny_models import LLAMA_TARGETS, tiny_gpt2, tiny_llama

CASES = {  # name: (model, r, seed, save_projection, base dtype, saved dtype)
    "saved projection": (tiny_llama, 8, 0, True, None, None),
    "regenerated, key 2^63+5": (tiny_llama, 8, 2**63 + 5, False, None, None),
    "regenerated onto bf16 (cast recorded)": (tiny_llama, 8, -7, False, torch.bfloat16, None),
    "saved fp32 projection onto bf16": (tiny_llama, 8, 7, True, torch.bfloat16, None),
    "vectors and projections saved in bf16": (tiny_llama, 8, 5, True, torch.bfloat16, torch.bfloat16),
    "gpt2 Conv1D, r above some dims": (tiny_gpt2, 64, 11, True, None, None),
}


def _header(path) -> dict:
    return json.loads(read_header(path).metadata["randlora"])


@pytest.mark.parametrize("case", list(CASES))
def test_peft_vera_dir_to_file_is_lossless_and_merges_like_peft(tmp_path, case):
    model_fn, r, seed, save_projection, base_dtype, saved_dtype = CASES[case]
    targets = GPT2_TARGETS if model_fn is tiny_gpt2 else LLAMA_TARGETS
    base, adapter = make_vera(tmp_path, model_fn(), r=r, seed=seed, save_projection=save_projection,
                              targets=targets, base_dtype=base_dtype, saved_dtype=saved_dtype)
    file = tmp_path / "a.safetensors"
    run_cli("convert", adapter, file, "--to", "randlora", "--base", base)
    header = _header(file)
    assert header["format_version"] == "1.2" and header["generator"]["method"] == "vera"
    assert header["seed"] == (seed + 2**64 if seed < 0 else seed) and "stored" not in header["bases"]
    assert header["generator"].get("cast_dtype") == ("bfloat16" if case.startswith("regenerated onto bf16")
                                                     else "bfloat16" if saved_dtype
                                                     else "float32" if base_dtype else None)  # unrounded on bf16
    assert not any(k.startswith("__bases__") for k in read_header(file).tensors)  # the seed gives them
    assert_merges_like_peft(tmp_path, base, file, targets, peft_dir=adapter)


def test_saved_projections_the_seed_does_not_give_need_keep_bases(tmp_path):
    base, adapter = make_vera(tmp_path, tiny_llama(), save_projection=True, targets=["q_proj", "down_proj"])
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.vera_B"] = tensors["base_model.vera_B"] * 2
    save_file(tensors, str(weights))
    result = run_cli("convert", adapter, tmp_path / "a.safetensors", "--to", "randlora", "--base", base, check=False)
    assert_one_line_error(result, "not the float32 draw", "--keep-bases")
    assert not (tmp_path / "a.safetensors").exists()
    run_cli("convert", adapter, tmp_path / "a.safetensors", "--to", "randlora", "--base", base, "--keep-bases")
    assert _header(tmp_path / "a.safetensors")["bases"]["stored"] is True
    assert_merges_like_peft(tmp_path, base, tmp_path / "a.safetensors", ["q_proj", "down_proj"], peft_dir=adapter)


@pytest.mark.parametrize("save_projection", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_file_to_peft_vera_dir_loads_in_peft_with_identical_outputs(tmp_path, arch, save_projection):
    from peft import PeftModel

    model_fn, targets = (tiny_gpt2, GPT2_TARGETS) if arch == "gpt2" else (tiny_llama, LLAMA_TARGETS)
    base, adapter = make_vera(tmp_path, model_fn(), seed=2**63 + 1, save_projection=False, targets=targets)
    run_cli("convert", adapter, tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
    args = ["--save-projection"] if save_projection else []
    run_cli("convert", tmp_path / "a.safetensors", tmp_path / "again", "--to", "peft-vera", *args)
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["save_projection"] is save_projection
    ids = torch.arange(12).view(1, -1)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(model_fn(), adapter).eval()(ids).logits
        got = PeftModel.from_pretrained(model_fn(), tmp_path / "again").eval()(ids).logits
    assert torch.equal(got, expected)


def _philox_adapter(seed=3, rank=5):
    layers = {"m.q.weight": VeraLayer((6, 4)), "m.o.weight": VeraLayer((4, 6)), "h.c.weight": VeraLayer((4, 9), True)}
    gen = torch.Generator().manual_seed(0)
    lam_b = {k: torch.randn(v.out_in[0], generator=gen) for k, v in layers.items()}
    lam_d = {k: torch.randn(rank, generator=gen) for k in layers}
    return build_vera_adapter(generator=GeneratorSpec(name="philox", kind="dense", seed=seed, method="vera"),
                              rank=rank, layers=layers, lambda_b=lam_b, lambda_d=lam_d)


def test_philox_vera_file_round_trips_and_its_delta_is_the_formula(tmp_path):
    adapter = _philox_adapter()
    write_vera_adapter(adapter, tmp_path / "p.safetensors")
    again = read_vera_adapter(tmp_path / "p.safetensors")
    assert again.header.to_json() == adapter.header.to_json() and (again.header.max_out, again.header.max_in) == (9, 6)
    bases = philox_vera_bases(3, 5, 9, 6)
    assert bases.A.abs().max() < kaiming_bound(6) and bases.B.abs().max() < kaiming_bound(5)
    for key, layer in adapter.layers.items():
        out_f, in_f = layer.out_in
        ref = (adapter.lambda_b[key].double()[:, None] * bases.B[:out_f].double()) @ \
            (adapter.lambda_d[key].double()[:, None] * bases.A[:, :in_f].double())
        ref = ref.T if layer.fan_in_fan_out else ref
        torch.testing.assert_close(again.delta(key).double(), ref, rtol=1e-6, atol=1e-7)


def test_philox_vera_file_exports_to_peft_with_its_bases(tmp_path):
    """PEFT cannot regenerate philox bases: --to peft-vera saves them whatever --save-projection says."""
    from peft import PeftModel

    from tiny_models import peft_layer_deltas

    model = tiny_llama()
    keys = {f"model.layers.{i}.self_attn.{p}.weight": w.shape for i in range(2) for p in ("q_proj", "k_proj")
            for w in [model.get_submodule(f"model.layers.{i}.self_attn.{p}").weight]}
    layers = {k: VeraLayer(tuple(s)) for k, s in keys.items()}
    lam_b = {k: torch.randn(v.shape[0]) for k, v in layers.items()}
    lam_d = {k: torch.randn(6) for k in layers}
    adapter = build_vera_adapter(generator=GeneratorSpec(name="philox", kind="dense", seed=9, method="vera"), rank=6,
                                 layers=layers, lambda_b=lam_b, lambda_d=lam_d)
    write_vera_adapter(adapter, tmp_path / "p.safetensors")
    run_cli("convert", tmp_path / "p.safetensors", tmp_path / "dir", "--to", "peft-vera")
    deltas = peft_layer_deltas(PeftModel.from_pretrained(model, tmp_path / "dir"))
    assert deltas.keys() == keys.keys()
    assert all(torch.equal(deltas[k], adapter.delta(k)) for k in keys)


def _one_point_one_spec():
    """randlora_io.format.spec as of 3b12d1e (format 1.1), from git, loaded beside the package."""
    try:
        text = subprocess.run(["git", "-C", str(ROOT), "show", "3b12d1e:randlora_io/format/spec.py"],
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git history with the 1.1 reader is not available")
    name = "randlora_io.format._spec_1_1"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up
    try:
        exec(compile(text, "spec_1_1.py", "exec"), module.__dict__)
    finally:
        del sys.modules[name]
    return module


@pytest.mark.parametrize("generator", ["peft", "philox"])
def test_a_1_1_reader_refuses_vera_files_as_newer(tmp_path, generator):
    if generator == "peft":
        base, adapter = make_vera(tmp_path, tiny_llama(), save_projection=False, targets=["q_proj"])
        run_cli("convert", adapter, tmp_path / "a.safetensors", "--to", "randlora", "--base", base)
    else:
        write_vera_adapter(_philox_adapter(), tmp_path / "a.safetensors")
    text = read_header(tmp_path / "a.safetensors").metadata["randlora"]
    old = _one_point_one_spec()
    # refused, never read as RandLoRA: 1.1 requires a numeric alpha and min_dim / max_dim / num_bases, which a VeRA
    # header has not, and refuses the generator parameter `method`; the 1.1 code stops at the first, alpha, and
    # shows the text VeRA writers put there (SPEC §2.1): it names the newer method and what to do
    with pytest.raises(ValueError, match=r"'alpha' must be a finite number, got 'none: a VeRA adapter \(SPEC 1.2 "
                                         r"generator method vera\), a newer adapter method than a 1.1 reader knows; "
                                         r"upgrade randlora-io'"):
        old.parse_header(text)
    header = json.loads(text)  # were it given RandLoRA's fields, the generator check would still refuse it
    header.update(alpha=1.0, bases={"min_dim": 9, "max_dim": 9})
    with pytest.raises(ValueError, match="takes no parameter 'method'.*a newer randlora-io may read this file"):
        old.parse_header(json.dumps(header))
    with pytest.raises(HeaderError, match="a VeRA header"):  # this library's RandLoRA-only entry point says what
        read_adapter(tmp_path / "a.safetensors")
    assert read_any_adapter(tmp_path / "a.safetensors").header.generator.method == "vera"


def test_a_vera_header_without_alpha_from_the_first_1_2_writer_still_reads(tmp_path):
    assert _rewrite(tmp_path, lambda h: h.pop("alpha")).exit_code == 0     # validate
    adapter = read_vera_adapter(tmp_path / "b.safetensors")
    assert adapter.header.generator.method == "vera"
    write_vera_adapter(adapter, tmp_path / "c.safetensors")   # rewritten with the text 1.1 readers show
    assert json.loads(read_header(tmp_path / "c.safetensors").metadata["randlora"])["alpha"].startswith("none: a VeRA")


def _rewrite(tmp_path, edit) -> object:
    write_vera_adapter(_philox_adapter(), tmp_path / "a.safetensors")
    st = read_header(tmp_path / "a.safetensors")
    header = json.loads(st.metadata["randlora"])
    edit(header)
    tensors = load_file(str(tmp_path / "a.safetensors"))
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"randlora": json.dumps(header)})
    return run_cli("validate", tmp_path / "b.safetensors", check=False)


@pytest.mark.parametrize("edit, fragment", [
    (lambda h: h["generator"].update(method="dora"), "method 'dora' is a newer adapter method"),
    (lambda h: h.update(alpha=1.0), "has no numeric 'alpha'"),
    (lambda h: h.update(alpha="none"), "has no numeric 'alpha'"),
    (lambda h: h["layers"]["m.q.weight"].update(num_bases=2), "has no 'num_bases'"),
    (lambda h: h["bases"].update(max_in=10), "the layers imply (9, 6)"),
    (lambda h: h["bases"].update(min_dim=6), "not randlora's min_dim"),
    (lambda h: h["generator"].update(kind="sparse"), "vera's bases are dense"),
    (lambda h: h["generator"].update(name="peft", draw_dtype="bfloat16"), "draw_dtype"),
    (lambda h: h["bases"].update(sha256="0" * 64), "checksum"),
    (lambda h: h.update(format_version="2.0"), "format version 2.0 is not supported"),
])
def test_bad_vera_headers_are_refused_in_one_line(tmp_path, edit, fragment):
    assert_one_line_error(_rewrite(tmp_path, edit), "b.safetensors", fragment)


def test_vera_file_inspect_and_validate(tmp_path):
    write_vera_adapter(_philox_adapter(), tmp_path / "a.safetensors")
    info = json.loads(run_cli("inspect", tmp_path / "a.safetensors", "--json").output)
    assert info["method"] == "vera" and info["bases"] == {"max_out": 9, "max_in": 6, "sha256": info["bases"]["sha256"],
                                                          "stored": False}
    assert "VeRA, 3 layers, bases checksum verified" in run_cli("validate", tmp_path / "a.safetensors").output


def test_merge_of_a_vera_file_and_peft_dirs_of_every_kind_together(tmp_path):
    """One merge takes our VeRA file, a PEFT VeRA dir and a PEFT LoRA dir: W + ΣΔW in float32, rounded once."""
    from peft import LoraConfig, get_peft_model

    from tiny_models import peft_layer_deltas

    base, vera = make_vera(tmp_path, tiny_llama(), save_projection=False, targets=["q_proj", "up_proj"])
    run_cli("convert", vera, tmp_path / "v.safetensors", "--to", "randlora", "--base", base)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    once = peft_merged(base, vera)
    before = load_file(str(base / "model.safetensors"))
    expected = {k: before[k] + 2 * (once[k] - before[k]) for k in before}
    for key, delta in peft_layer_deltas(lora).items():
        expected[key] = expected[key] + delta
    run_cli("merge", base, tmp_path / "v.safetensors", vera, tmp_path / "lora", "-o", tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_push_and_pull_a_vera_file_and_a_peft_vera_dir(tmp_path, monkeypatch):
    """hub push / pull move VeRA files and PEFT VeRA dirs bit for bit; a file's card tags it vera (a PEFT dir keeps
    the card PEFT wrote)."""
    from fake_hub import FakeHub
    from randlora_io.hub import load_from_hub, push_to_hub
    import huggingface_hub.constants as constants

    base, adapter = make_vera(tmp_path, tiny_llama(), save_projection=False, targets=["q_proj"])
    run_cli("convert", adapter, tmp_path / "v.safetensors", "--to", "randlora", "--base", base)
    with FakeHub(tokens={"hf_good": "alice"}) as server:
        for name, value in (("HF_ENDPOINT", server.url), ("HF_HUB_CACHE", str(tmp_path / "cache")),
                            ("HF_HUB_OFFLINE", "0"), ("HF_TOKEN", "hf_good"), ("HF_HUB_DISABLE_TELEMETRY", "1")):
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        for repo, path in (("alice/vfile", tmp_path / "v.safetensors"), ("alice/vdir", adapter)):
            push_to_hub(path, repo)
            card = server.repos[repo].commits[server.repos[repo].branches["main"]]["README.md"].decode()
            assert path.is_dir() or "- vera" in card.split("---")[1], card
            pulled = load_from_hub(repo, output_dir=tmp_path / repo.split("/")[1])
            pairs = [(path, pulled)] if path.is_file() else [(p, pulled / p.name) for p in path.iterdir()]
            assert all(a.read_bytes() == b.read_bytes() for a, b in pairs)


def test_conversions_without_an_exact_form_are_refused_in_one_line(tmp_path):
    """A VeRA file has no exact RandLoRA form (a fit needs --rank, and says what is exact); a non-VeRA adapter has no
    VeRA form. Nothing is written."""
    from peft import LoraConfig, get_peft_model

    write_vera_adapter(_philox_adapter(), tmp_path / "v.safetensors")
    result = run_cli("convert", tmp_path / "v.safetensors", tmp_path / "x", "--to", "peft-randlora", check=False)
    assert_one_line_error(result, "fitting a vera adapter to randlora needs --rank", "--to peft-vera")
    tiny_llama().save_pretrained(tmp_path / "base")
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    result = run_cli("convert", tmp_path / "lora", tmp_path / "y", "--to", "peft-vera", "--base", tmp_path / "base",
                     check=False)
    assert_one_line_error(result, "is not vera and has no exact vera form")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
