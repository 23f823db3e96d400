"""Hub push/pull through the real ``huggingface_hub`` client against a loopback fake Hub (tests/fake_hub.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from randlora_io import write_adapter
from randlora_io.errors import HubError
from randlora_io.hub import load_from_hub, model_card, parse_hub_source, push_to_hub

from conftest import assert_one_line_error, run_cli
from fake_hub import FakeHub
from test_format import make_adapter


def cli(*args):
    return run_cli(*args, check=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hub on loopback, the client pointed at it (HF_ENDPOINT), a fresh cache, online, token hf_good."""
    import huggingface_hub.constants as constants

    with FakeHub(tokens={"hf_good": "alice"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_good")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield server


def go_offline(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def adapter_file(tmp_path):
    path = tmp_path / "my-adapter.randlora.safetensors"
    write_adapter(make_adapter(seed=5, base_model={"id": "tiny/llama", "revision": None, "fingerprint": None}), path)
    return path


def test_push_then_pull_is_bit_identical_with_a_model_card(hub, adapter_file, tmp_path):
    before = sha256(adapter_file)
    result = push_to_hub(adapter_file, "alice/ad")
    assert result.files == [adapter_file.name, "README.md"]
    assert sha256(adapter_file) == before  # input untouched
    pulled = load_from_hub("alice/ad")
    assert pulled.read_bytes() == adapter_file.read_bytes()
    card = hub.repos["alice/ad"].commits[hub.repos["alice/ad"].branches["main"]]["README.md"].decode()
    head = card.split("---")[1]
    assert "library_name: randlora-io" in head and "base_model: tiny/llama" in head and "- randlora" in head
    assert "randlora-io merge" in card and "| seed | 5 |" in card
    # -o DIR copies the verified files out of the cache
    out = load_from_hub("alice/ad", output_dir=tmp_path / "dl")
    assert out == tmp_path / "dl" / adapter_file.name and out.read_bytes() == adapter_file.read_bytes()
    assert (tmp_path / "dl" / "README.md").exists()


def test_card_is_kept_when_the_folder_has_one_and_revisions_are_branches(hub, tmp_path):
    from randlora_io.convert.peft_randlora import adapter_to_peft_randlora

    peft_dir = tmp_path / "peft"
    adapter_to_peft_randlora(make_adapter(seed=1, generator="peft"), peft_dir)
    (peft_dir / "README.md").write_text("---\nlibrary_name: peft\n---\nmine\n")
    push_to_hub(peft_dir, "alice/p", revision="v1")
    repo = hub.repos["alice/p"]
    assert set(repo.branches) == {"main", "v1"}
    assert repo.commits[repo.branches["v1"]]["README.md"] == b"---\nlibrary_name: peft\n---\nmine\n"
    assert "adapter_config.json" not in repo.commits[repo.branches["main"]]
    pulled = load_from_hub("alice/p", revision="v1")
    assert pulled.is_dir() and (pulled / "adapter_config.json").read_bytes() == (peft_dir / "adapter_config.json").read_bytes()


def test_a_pushed_peft_dir_loads_in_peft_from_the_hub(hub, tmp_path):
    """PEFT users can PeftModel.from_pretrained(repo) on what `convert --to peft-randlora` + push uploaded."""
    from randlora_io.convert.run import convert

    from tiny_models import peft_randlora, tiny_llama

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    peft_model = peft_randlora(tiny_llama(), r=4, seed=3)
    src = tmp_path / "src"
    peft_model.save_pretrained(src)
    ours = tmp_path / "ours.randlora.safetensors"
    convert(src, ours, "randlora", base=base_dir)
    convert(ours, tmp_path / "peft_out", "peft-randlora")
    push_to_hub(tmp_path / "peft_out", "alice/for-peft")
    # PEFT reads HF_ENDPOINT when huggingface_hub is imported: load in a fresh process, as a user would
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); from tiny_models import tiny_llama\n"
        "from peft import PeftModel\n"
        "model = PeftModel.from_pretrained(tiny_llama(), 'alice/for-peft')\n"
        "ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))\n"
        "with torch.no_grad(): torch.save(model(ids).logits, sys.argv[2])\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "pcache")}
    proc = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path / "logits.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected, rtol=1e-5, atol=1e-5)


def test_offline_with_a_warm_cache_works_and_a_cold_cache_says_so(hub, adapter_file, monkeypatch, tmp_path):
    push_to_hub(adapter_file, "alice/ad")
    online = load_from_hub("alice/ad")
    go_offline(monkeypatch)
    served_before = len(hub.requests)
    assert load_from_hub("alice/ad").read_bytes() == online.read_bytes()
    assert len(hub.requests) == served_before  # nothing asked of the server
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cold"))
    with pytest.raises(HubError, match="not in the local cache"):
        load_from_hub("alice/ad")


def test_merge_and_convert_accept_hub_sources(hub, tmp_path):
    from randlora_io.convert.run import convert
    from randlora_io.merge.plan import merge

    from tiny_models import tiny_llama

    model = tiny_llama()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    shapes = {k: (tuple(v.shape), False) for k, v in model.state_dict().items()
              if k.endswith(("q_proj.weight", "down_proj.weight"))}
    local = tmp_path / "a.randlora.safetensors"
    write_adapter(make_adapter(seed=2, shapes=shapes), local)
    push_to_hub(local, "alice/m")
    merge(base_dir, ["hub:alice/m@main"], tmp_path / "from_hub")
    merge(base_dir, [local], tmp_path / "from_disk")
    for name in ("model.safetensors",):
        assert (tmp_path / "from_hub" / name).read_bytes() == (tmp_path / "from_disk" / name).read_bytes()
    convert("hub:alice/m", tmp_path / "dense.safetensors", "dense")
    assert (tmp_path / "dense.safetensors").exists()
    result = cli(*["merge", str(base_dir), "hub:alice/m", "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output


def test_cli_push_and_pull(hub, adapter_file, tmp_path):
    result = cli(*["push", str(adapter_file), "alice/cli", "--private"])
    assert result.exit_code == 0, result.output
    assert hub.repos["alice/cli"].private
    result = cli(*["pull", "alice/cli", "-o", str(tmp_path / "got")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "got" / adapter_file.name).read_bytes() == adapter_file.read_bytes()
    assert str(tmp_path / "got" / adapter_file.name) in result.output
    # an existing -o is refused, and left as it was
    result = cli(*["pull", "alice/cli", "-o", str(tmp_path / "got")])
    assert_one_line_error(result, "exists")


def test_missing_repo_rejected_token_and_corrupted_download_are_one_line(hub, adapter_file, tmp_path, monkeypatch):
    result = cli(*["pull", "alice/nope"])
    assert_one_line_error(result, "repository not found")
    result = cli(*["pull", "alice/nope", "--revision", "v9"])
    assert_one_line_error(result, "not found")

    result = cli(*["push", str(adapter_file), "alice/x", "--token", "hf_bad"])
    assert_one_line_error(result, "token was rejected")
    assert "alice/x" not in hub.repos
    monkeypatch.setenv("HF_TOKEN", "hf_bad")
    result = cli(*["pull", "alice/x"])
    assert_one_line_error(result, "token was rejected")
    monkeypatch.setenv("HF_TOKEN", "hf_good")

    push_to_hub(adapter_file, "alice/ad")
    data = bytearray(adapter_file.read_bytes())
    data[-3] ^= 0x40  # same size, one flipped bit in the tensor data
    hub.corrupt[adapter_file.name] = bytes(data)
    result = cli(*["pull", "alice/ad", "-o", str(tmp_path / "dl")])
    assert_one_line_error(result, "corrupted")
    assert not (tmp_path / "dl").exists()
    hub.corrupt.clear()  # the bad copy was dropped from the cache: a retry succeeds
    assert load_from_hub("alice/ad").read_bytes() == adapter_file.read_bytes()

    hub.corrupt[adapter_file.name] = adapter_file.read_bytes()[:100]  # truncated body
    with pytest.raises(HubError, match="corrupted|pull again"):
        load_from_hub("alice/ad", cache_dir=tmp_path / "other-cache")


def test_push_refuses_an_invalid_adapter_without_creating_the_repo(hub, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    result = cli(*["push", str(bad), "alice/bad"])
    assert result.exit_code == 1 and "alice/bad" not in hub.repos
    assert_one_line_error(result, "bad.safetensors")


def test_model_card_and_hub_references(adapter_file):
    card = model_card(adapter_file, "org/name")
    assert card.startswith("---\nlibrary_name: randlora-io\n") and "pull org/name" in card
    assert parse_hub_source("hub:org/name@dev") == ("org/name", "dev")
    assert parse_hub_source("hub:org/name") == ("org/name", None)
    with pytest.raises(HubError, match="not a Hub reference"):
        parse_hub_source("hub:")
    json.dumps(card)  # plain text


def test_a_vera_file_pushes_pulls_and_merges_from_the_hub(hub, tmp_path):
    from tiny_models import LLAMA_TARGETS, tiny_llama

    from randlora_io.train import RandloraConfig, attach

    tiny_llama().save_pretrained(tmp_path / "base")
    model = tiny_llama()
    handle = attach(model, RandloraConfig(method="vera", r=8, target_modules=LLAMA_TARGETS, seed=3))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    local = tmp_path / "v.randlora.safetensors"
    handle.save(local)
    push_to_hub(local, "alice/vera")
    card = hub.repos["alice/vera"].commits[hub.repos["alice/vera"].branches["main"]]["README.md"].decode()
    assert "vera" in card.lower() and "| seed | 3 |" in card
    assert load_from_hub("alice/vera").read_bytes() == local.read_bytes()
    assert cli("merge", str(tmp_path / "base"), "hub:alice/vera", "-o", str(tmp_path / "hub_out")).exit_code == 0
    assert cli("merge", str(tmp_path / "base"), str(local), "-o", str(tmp_path / "local_out")).exit_code == 0
    assert (tmp_path / "hub_out" / "model.safetensors").read_bytes() == \
        (tmp_path / "local_out" / "model.safetensors").read_bytes()
