"""sources/: one door per input kind. Detecting a path's kind reads its header once (a file's safetensors header,
a directory's adapter_config.json), and opening it reuses what detection read; every kind module implements the
same interface, and the registry lists each once."""

from __future__ import annotations

import builtins
import io
import os
from collections import Counter
from pathlib import Path

import pytest
from conftest import run_cli
from tiny_models import peft_lora, peft_randlora, peft_vera, tiny_llama

from randlora_io.checkpoint.base_model import base_info_from_checkpoint
from randlora_io.checkpoint.directory import open_checkpoint
from randlora_io.sources import interface, registry
from randlora_io.sources.registry import KINDS, detect, open_source


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One input of every kind for a tiny Llama: a PEFT RandLoRA dir, a PEFT LoRA dir, our file, a dense delta."""
    root = tmp_path_factory.mktemp("kinds")
    tiny_llama().save_pretrained(root / "base")
    peft_randlora(tiny_llama(), r=4).save_pretrained(root / "peft-randlora")
    peft_lora(tiny_llama()).save_pretrained(root / "peft-lora")
    peft_vera(tiny_llama()).save_pretrained(root / "peft-vera")
    run_cli("convert", root / "peft-randlora", root / "a.randlora.safetensors", "--to", "randlora",
            "--base", root / "base")
    run_cli("convert", root / "peft-lora", root / "d.safetensors", "--to", "dense", "--base", root / "base")
    return {"base": root / "base", "peft-randlora": root / "peft-randlora", "peft-lora": root / "peft-lora",
            "peft-vera": root / "peft-vera", "randlora": root / "a.randlora.safetensors", "dense": root / "d.safetensors"}


@pytest.fixture
def opened(monkeypatch):
    """Counts every Python-level open() of a file, by resolved path (safetensors' own Rust reader of tensor data and
    the positional reads of lazy_tensors do not go through it: they read data, not headers)."""
    counts: Counter = Counter()
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            counts[Path(file).resolve()] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)  # Path.read_text / Path.open
    return counts


def _header_file(path: Path) -> Path:
    return (path / "adapter_config.json" if path.is_dir() else path).resolve()


@pytest.mark.parametrize("kind", ["randlora", "dense", "peft-randlora", "peft-lora", "peft-vera"])
def test_detecting_a_kind_reads_its_header_once(inputs, opened, kind):
    path = inputs[kind]
    probe = detect(path)
    assert probe.kind == kind
    assert opened[_header_file(path)] == 1, dict(opened)
    if path.is_dir():  # the weights are not touched to tell the kind
        assert opened[(path / "adapter_model.safetensors").resolve()] == 0, dict(opened)
    assert sum(opened.values()) == 1, dict(opened)


@pytest.mark.parametrize("kind", ["randlora", "dense", "peft-randlora", "peft-lora", "peft-vera"])
def test_opening_reuses_the_header_detection_read(inputs, opened, kind):
    """detect + load together: the header (or adapter_config.json) once; a dir's weights file once."""
    base = base_info_from_checkpoint(open_checkpoint(inputs["base"]))
    opened.clear()
    path = inputs[kind]
    source = open_source(path, base=base)
    assert source.kind == kind and source.keys()
    assert opened[_header_file(path)] == 1, dict(opened)
    if path.is_dir():
        assert opened[(path / "adapter_model.safetensors").resolve()] == 1, dict(opened)


def test_a_probe_from_detect_is_not_read_again(inputs, opened):
    probe = detect(inputs["randlora"])
    open_source(probe)
    open_source(probe)  # keymap's retry under transformers' names opens a source twice: the header stays read
    assert opened[_header_file(inputs["randlora"])] == 1, dict(opened)


def test_every_kind_module_implements_the_interface():
    assert KINDS == ("randlora", "dense", "peft-randlora", "peft-lora", "peft-vera", "finetuned")
    for module in registry._KINDS:
        for name in ("KIND", "matches", "load", "describe", "validate"):
            assert hasattr(module, name), (module.__name__, name)
        assert module.__doc__ and module.KIND in module.__doc__, module.__name__
    assert "load(probe, options)" in interface.__doc__


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "no such file or directory"),
    (lambda p: (p.mkdir(), p)[1], "a directory without adapter_config.json .an adapter. or model weights"),
    (lambda p: (p.with_suffix(".bin").write_bytes(b"x"), p.with_suffix(".bin"))[1], "pickle files are refused"),
])
def test_detect_refuses_what_is_no_input(tmp_path, make, message):
    from randlora_io.errors import RandloraError

    with pytest.raises(RandloraError, match=message):
        detect(make(tmp_path / "thing"))


def test_detect_names_a_safetensors_file_that_is_no_adapter(inputs, tmp_path):
    from randlora_io.errors import SourceFormatError

    weights = next(inputs["base"].glob("*.safetensors"))
    with pytest.raises(SourceFormatError, match="without randlora or dense-delta metadata"):
        detect(weights)
