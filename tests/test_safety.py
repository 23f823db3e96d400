"""Never lose a user's file, never merge silently wrong: outputs against inputs, concurrent and replaced outputs,
what is copied into OUT, bad weights, base fingerprints, ambiguous bases, overflowing casts, archive bombs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file, save_file
from tiny_models import peft_randlora, tiny_llama

KEY = "model.layers.0.self_attn.q_proj.weight"


def _digest(path):
    h = hashlib.sha256()
    items = sorted(path.rglob("*")) if path.is_dir() else [path]
    for f in items:
        if f.is_file():
            h.update(str(f.relative_to(path.parent)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def models(tmp_path):
    """models/base (a tiny Llama), models/a.safetensors (a randlora adapter for it), models/peft (its PEFT dir)."""
    root = tmp_path / "models"
    tiny_llama().save_pretrained(root / "base")
    peft_randlora(tiny_llama(), r=6, seed=3).save_pretrained(root / "peft")
    run_cli("convert", root / "peft", root / "a.safetensors", "--to", "randlora", "--base", root / "base")
    return root


def _assert_refused(result, root, before, *fragments):
    assert_one_line_error(result, *fragments)
    assert _digest(root) == before


# ------------------------------------------------------------------------------------ outputs never touch inputs


def test_merge_out_that_contains_or_is_an_input_is_refused_even_with_overwrite(models):
    before = _digest(models)
    for out in (models, models / "a.safetensors", models / "base", models / "base" / "sub", models / "peft"):
        adapters = [models / "a.safetensors"] if out != models / "peft" else [models / "peft"]
        result = run_cli("merge", models / "base", *adapters, "-o", out, "--overwrite", check=False)
        _assert_refused(result, models, before, "input")


def test_merge_out_through_a_symlink_to_an_input_is_refused(models, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(models / "base", target_is_directory=True)
    before = _digest(models)
    result = run_cli("merge", models / "base", models / "a.safetensors", "-o", link, "--overwrite", check=False)
    _assert_refused(result, models, before, "input")
    assert link.is_symlink()


def test_convert_out_that_contains_src_or_base_is_refused(models, tmp_path):
    (models / "unrelated.txt").write_text("keep me")
    before = _digest(models)
    result = run_cli("convert", models / "a.safetensors", models, "--to", "peft-randlora", "--overwrite", check=False)
    _assert_refused(result, models, before, "input")
    result = run_cli("convert", models / "peft", models / "base", "--to", "randlora", "--base", models / "base",
                     "--overwrite", check=False)
    _assert_refused(result, models, before, "input")
    result = run_cli("convert", models / "a.safetensors", models / "a.safetensors", "--to", "dense", "--overwrite",
                     check=False)
    _assert_refused(result, models, before, "input")


def test_out_that_appears_during_the_merge_is_never_replaced(models, tmp_path, monkeypatch):
    """Two merges into one OUT without --overwrite: the second to finish fails and the first's OUT stays."""
    import sys

    merge_mod = sys.modules["randlora_io.merge.plan"]  # the package exports the function under the module's name
    out = tmp_path / "out"
    real = merge_mod.stream_rewrite

    def racing(*args, **kwargs):
        real(*args, **kwargs)
        if not out.exists():  # another process finishes its OUT while we are still writing
            out.mkdir()
            (out / "theirs").write_text("first")

    monkeypatch.setattr(merge_mod, "stream_rewrite", racing)
    result = run_cli("merge", models / "base", models / "a.safetensors", "-o", out, check=False)
    assert_one_line_error(result, "appeared")
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_overwrite_swaps_in_one_step(models, tmp_path, monkeypatch):
    """With --overwrite there is no moment without OUT: the old one is never moved away before the new one is in."""
    from randlora_io.checkpoint import atomic

    out = tmp_path / "out"
    run_cli("merge", models / "base", models / "a.safetensors", "-o", out)
    (out / "old-marker").write_text("old")
    moves = []
    real_replace, real_rename = os.replace, os.rename

    def watch(fn):
        def moved(src, dst, *a, **k):
            moves.append((str(src), str(dst)))
            assert os.path.exists(out), "OUT was absent during the swap"
            return fn(src, dst, *a, **k)
        return moved

    monkeypatch.setattr(atomic.os, "replace", watch(real_replace))
    monkeypatch.setattr(atomic.os, "rename", watch(real_rename))
    run_cli("merge", models / "base", models / "a.safetensors", "-o", out, "--overwrite")
    assert not (out / "old-marker").exists() and (out / "config.json").is_file()
    assert all(dst != str(out) and src != str(out) for src, dst in moves), moves  # no remove-then-rename of OUT
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_out_inside_base_is_refused_and_single_file_base_copies_only_checkpoint_files(models, tmp_path):
    before = _digest(models)
    result = run_cli("merge", models / "base", models / "a.safetensors", "-o", models / "base" / "merged", check=False)
    _assert_refused(result, models, before, "input")

    folder = tmp_path / "x"
    shutil.copytree(models / "base", folder)
    (folder / "my.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (folder / "model.safetensors").unlink()
    (folder / "datasets").mkdir()
    (folder / "datasets" / "big.jsonl").write_text("{}\n")
    (folder / "other-model.safetensors").write_bytes(b"not ours")
    (folder / "pytorch_model.bin").write_bytes(b"stale")
    (folder / "tokenizer_config.json").write_text("{}")
    run_cli("merge", folder / "my.safetensors", models / "a.safetensors", "-o", tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(["config.json", "generation_config.json", "my.safetensors", "tokenizer_config.json"]), names


def test_stale_temp_folders_of_dead_processes_are_removed(models, tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.randlora-io-{dead.pid}-abc.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".out.randlora-io-{os.getppid()}-abc.tmp"  # a live process's temp dir is left alone
    live.mkdir()
    foreign = tmp_path / ".out.something-else.tmp"  # and so is anything this tool did not name
    foreign.mkdir()
    run_cli("merge", models / "base", models / "a.safetensors", "-o", tmp_path / "out")
    assert not stale.exists() and live.exists() and foreign.exists()


# ------------------------------------------------------------------------------------- silently wrong results


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e39"])
def test_non_finite_or_out_of_range_weight_is_refused(models, tmp_path, weight):
    result = run_cli("merge", models / "base", models / "a.safetensors", "-o", tmp_path / "out", "--weight", weight,
                     check=False)
    assert_one_line_error(result, "--weight")
    assert not (tmp_path / "out").exists()


def _trained_adapter(tmp_path, model):
    from randlora_io.train import RandloraConfig
    from randlora_io.train import attach

    handle = attach(model, RandloraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(0.05)
    path = tmp_path / "trained.safetensors"
    handle.save(path)
    handle.detach()
    return path


def test_base_fingerprint_is_checked_on_merge(tmp_path):
    right, other = tmp_path / "right", tmp_path / "other"
    tiny_llama(seed=0).save_pretrained(right)
    tiny_llama(seed=1).save_pretrained(other)  # same shapes, other weights
    adapter = _trained_adapter(tmp_path, tiny_llama(seed=0))
    result = run_cli("merge", other, adapter, "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "fingerprint", "--ignore-base-fingerprint")
    assert not (tmp_path / "out").exists()
    run_cli("merge", other, adapter, "-o", tmp_path / "forced", "--ignore-base-fingerprint")
    run_cli("merge", right, adapter, "-o", tmp_path / "ok")
    (tmp_path / "bf").mkdir()  # trained on the bf16-loaded model, merged into its fp32 checkpoint: accepted
    run_cli("merge", right, _trained_adapter(tmp_path / "bf", tiny_llama(seed=0, dtype=torch.bfloat16)), "-o",
            tmp_path / "ok-bf16")


def test_stale_single_file_beside_shards_is_refused(tmp_path, models):
    from randlora_io.checkpoint.directory import open_checkpoint

    sharded = tmp_path / "sharded"
    tiny_llama().save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    shutil.copy(models / "base" / "model.safetensors", sharded / "model.safetensors")
    before = _digest(sharded)
    result = run_cli("merge", sharded, models / "a.safetensors", "-o", tmp_path / "out", check=False)
    _assert_refused(result, sharded, before, "ambiguous")
    with pytest.raises(ValueError):
        open_checkpoint(sharded)


def test_dtype_float16_never_turns_an_untouched_tensor_into_inf(models, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models / "base", base)
    state = load_file(base / "model.safetensors")
    state["model.embed_tokens.weight"][0, 0] = 1e5  # finite in float32, beyond float16's 65504
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    result = run_cli("merge", base, models / "a.safetensors", "-o", tmp_path / "out", "--dtype", "float16",
                     check=False)
    assert_one_line_error(result, "model.embed_tokens.weight", "float16")
    assert not (tmp_path / "out").exists()


def test_convert_to_dense_never_writes_inf(tmp_path):
    from randlora_io.format.adapter import read_adapter, write_adapter

    path = tmp_path / "a.safetensors"
    peft_randlora(tiny_llama(), r=6, seed=3).save_pretrained(tmp_path / "peft")
    tiny_llama().save_pretrained(tmp_path / "base")
    run_cli("convert", tmp_path / "peft", path, "--to", "randlora", "--base", tmp_path / "base")
    adapter = read_adapter(path)
    for key in adapter.lambdas:
        adapter.lambdas[key].fill_(3e38)  # finite scales whose product overflows float32
    huge = tmp_path / "huge.safetensors"
    write_adapter(adapter, huge)
    result = run_cli("convert", huge, tmp_path / "d.safetensors", "--to", "dense", check=False)
    assert_one_line_error(result, "inf")
    assert not (tmp_path / "d.safetensors").exists()


def test_zero_size_dense_delta_is_refused(tmp_path):
    from randlora_io.sources.dense import METADATA_KEY

    path = tmp_path / "z.safetensors"
    save_file({KEY: torch.zeros(0, 45000)}, str(path), metadata={METADATA_KEY: json.dumps({"format_version": "1.0"})})
    result = run_cli("convert", path, tmp_path / "out.safetensors", "--to", "randlora", "--rank", "1", check=False)
    assert_one_line_error(result, "empty")


def test_zip_bomb_adapter_bin_is_refused_before_inflating(tmp_path):
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["q_proj"]}))
    buf = io.BytesIO()  # a real torch archive whose 64 MiB tensor is deflated to ~64 KB: torch.load inflates it
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4096, 4096)}, buf)
    plain = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(peft / "adapter_model.bin", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info in plain.infolist():
            archive.writestr(info.filename, plain.read(info.filename))
    assert (peft / "adapter_model.bin").stat().st_size < 1024 * 1024
    result = run_cli("inspect", peft, check=False)
    assert_one_line_error(result, "adapter_model.bin", "bomb")


# --------------------------------------------------------------------------------- one clean line per refusal


def _raw_safetensors(header: dict | bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw


@pytest.mark.parametrize("name, header, fragment", [
    ("nested", b"[" * 100000 + b"]" * 100000, "nested"),
    ("dtype-list", {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, "dtype"),
    ("metadata-zero", {"__metadata__": 0}, "__metadata__"),
])
def test_hostile_headers_give_one_line_naming_the_file(tmp_path, name, header, fragment):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(_raw_safetensors(header) + b"\0" * 4)
    result = run_cli("inspect", path, check=False)
    assert_one_line_error(result, path.name, fragment)


def test_config_json_syntax_error_names_the_file(models, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models / "base", base)
    (base / "config.json").write_text("{not json")
    result = run_cli("merge", base, models / "a.safetensors", "-o", tmp_path / "out", "--dtype", "bfloat16",
                     check=False)
    assert_one_line_error(result, "config.json")
    assert not (tmp_path / "out").exists()


def test_full_disk_during_convert_names_the_output(models, tmp_path):
    """A file-size limit (EFBIG, like ENOSPC) while safetensors writes: one line naming the output, nothing left."""
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    for to in ("dense", "peft-randlora"):
        dst = tmp_path / f"out-{to}"
        proc = subprocess.run([sys.executable, "-m", "randlora_io", "convert", str(models / "a.safetensors"), str(dst),
                               "--to", to], preexec_fn=limit, capture_output=True, text=True)
        assert proc.returncode == 1, proc.stderr
        err = proc.stderr.strip()
        assert len(err.splitlines()) == 1 and str(dst) in err and "internal error" not in err, err
        assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".{dst.name}")]


def test_library_warnings_do_not_add_lines_to_a_refusal(models, tmp_path, monkeypatch):
    """A warning raised by torch or transformers on the way to a refusal stays off stderr (shown with --debug)."""
    import sys
    import warnings

    from randlora_io.errors import SourceFormatError

    merge_mod = sys.modules["randlora_io.merge.plan"]

    def noisy(path, *args, **kwargs):
        warnings.warn("The given buffer is not writable", UserWarning)
        raise SourceFormatError(f"{path}: refused for the test")

    monkeypatch.setattr(merge_mod, "open_checkpoint", noisy)
    monkeypatch.setattr(warnings, "showwarning", lambda message, category, filename, lineno, file=None, line=None:
                        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno)))  # as outside pytest
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        result = run_cli("merge", models / "base", models / "a.safetensors", "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "refused for the test")


@pytest.mark.parametrize("key, value, fragment", [
    ("alpha_pattern", 1, "alpha_pattern"),
    ("alpha_pattern", {"q_proj": "8"}, "alpha_pattern"),
    ("rank_pattern", {"q_proj[": 4}, "regular expression"),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern"),
    ("r", True, "'r'"),
    ("lora_alpha", "16", "lora_alpha"),
    ("target_modules", [1, 2], "target_modules"),
    ("fan_in_fan_out", "yes", "fan_in_fan_out"),
])
def test_bad_peft_config_values_give_one_line(tmp_path, key, value, fragment):
    from tiny_models import peft_lora

    folder = tmp_path / "lora"
    peft_lora(tiny_llama(), r=2, targets=["q_proj"]).save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    before = _digest(folder)
    for args in (("inspect", folder), ("convert", folder, tmp_path / "d.safetensors", "--to", "dense")):
        result = run_cli(*args, check=False)
        assert_one_line_error(result, "adapter_config.json", fragment)
    assert _digest(folder) == before


def test_projection_prng_key_true_is_refused(tmp_path, models):
    folder = tmp_path / "peft"
    shutil.copytree(models / "peft", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["projection_prng_key"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config))
    result = run_cli("merge", models / "base", folder, "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "projection_prng_key")


@pytest.mark.parametrize("to", ["randlora", "dense"])
def test_convert_never_replaces_a_file_that_appeared_meanwhile(models, tmp_path, monkeypatch, to):
    from randlora_io.checkpoint import atomic

    dst = tmp_path / f"{to}.safetensors"
    real = atomic._install_new

    def racing(tmp, target):
        target.write_text("another process's output")
        return real(tmp, target)

    monkeypatch.setattr(atomic, "_install_new", racing)
    src = models / "a.safetensors" if to == "dense" else models / "peft"
    extra = () if to == "dense" else ("--base", models / "base")
    result = run_cli("convert", src, dst, "--to", to, *extra, check=False)
    assert_one_line_error(result, "appeared")
    assert dst.read_text() == "another process's output"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{dst.name}")]


def test_lora_factors_declaring_a_huge_layer_are_refused_before_allocating(tmp_path):
    """A 2.4 MB LoRA dir whose factors imply a 300000×300000 ΔW (360 GB): one line, no allocation."""
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                                                            "target_modules": ["q_proj"]}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.ones(1, 300000), f"{prefix}.lora_B.weight": torch.ones(300000, 1)},
              str(folder / "adapter_model.safetensors"))
    for to in ("dense", "randlora", "peft-lora"):
        result = run_cli("convert", folder, tmp_path / f"{to}.out", "--to", to, "--rank", "1", check=False)
        assert_one_line_error(result, "RANDLORA_IO_MAX_LAYER_BYTES", "300000x300000")


@pytest.mark.parametrize("renameat2", [True, False])
def test_atomic_outputs_with_and_without_renameat2(tmp_path, monkeypatch, renameat2):
    """Where the file system lacks renameat2 (old kernels, some network file systems) the fallbacks keep the same
    promises: a new entry never replaces one that appeared, --overwrite replaces, failures leave nothing."""
    from randlora_io.checkpoint import atomic
    from randlora_io.errors import OutputExistsError

    if not renameat2:
        monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flags: False)
    out = tmp_path / "out"
    with atomic.atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with atomic.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    with pytest.raises(OutputExistsError):
        with atomic.atomic_directory(tmp_path / "raced") as tmp:
            (tmp_path / "raced").mkdir()
            (tmp_path / "raced" / "theirs").write_text("x")
    assert [p.name for p in (tmp_path / "raced").iterdir()] == ["theirs"]
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(tmp_path / "f.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert not (tmp_path / "f.bin").exists()
    with atomic.atomic_file(tmp_path / "f.bin") as tmp:
        tmp.write_bytes(b"one")
    with pytest.raises(OutputExistsError):
        with atomic.atomic_file(tmp_path / "f.bin", overwrite=False) as tmp:
            tmp.write_bytes(b"two")
    with atomic.atomic_file(tmp_path / "f.bin", overwrite=True) as tmp:
        tmp.write_bytes(b"three")
    assert (tmp_path / "f.bin").read_bytes() == b"three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin", "out", "raced"]


def test_fingerprint_of_an_adapter_trained_under_in_memory_names_is_checked_in_checkpoint_names(tmp_path):
    """ViT (transformers ≥ 5): trained with attach/handle.save under module names (vit.layers.N...), merged into a
    checkpoint saved under others (vit.encoder.layer.N...): the right base passes, another is refused."""
    from tiny_models import tiny_vit_classifier

    from randlora_io.train import RandloraConfig
    from randlora_io.train import attach

    model = tiny_vit_classifier(seed=0)
    model.save_pretrained(tmp_path / "right")
    tiny_vit_classifier(seed=1).save_pretrained(tmp_path / "other")
    handle = attach(model, RandloraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(0.05)
    handle.save(tmp_path / "vit.safetensors")
    run_cli("merge", tmp_path / "right", tmp_path / "vit.safetensors", "-o", tmp_path / "ok")
    result = run_cli("merge", tmp_path / "other", tmp_path / "vit.safetensors", "-o", tmp_path / "bad", check=False)
    assert_one_line_error(result, "fingerprint")


def test_two_adapters_replacing_the_same_head_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, num_labels=3, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "base")
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model = get_peft_model(LlamaForSequenceClassification(config),
                               LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["score"],
                                          init_lora_weights=False))
        model.save_pretrained(tmp_path / name)
    result = run_cli("merge", tmp_path / "base", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "out", check=False)
    assert_one_line_error(result, "score", "and so does")
    assert not (tmp_path / "out").exists()


def test_train_out_inside_the_base_or_onto_the_data_is_refused(llama_dir, tmp_path):
    from test_train import write_pattern_data

    data = write_pattern_data(tmp_path / "d.jsonl", rows=4)
    before = _digest(llama_dir), data.read_bytes()
    for out in (llama_dir / "model.safetensors", llama_dir / "adapter.safetensors", data):
        result = run_cli("train", llama_dir, data, "-o", out, "--steps", "1", "--seq-len", "16", "--overwrite",
                         check=False)
        assert_one_line_error(result, "input")
    assert (_digest(llama_dir), data.read_bytes()) == before
