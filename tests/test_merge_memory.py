"""What a merge holds in memory: a randlora file's scales are read layer by layer (lazy_tensors.FileTensors), so
reading and merging an adapter does not hold all its λ/γ, yet the adapter still behaves as a dict of tensors (edits
persist, a file replaced after reading changes nothing); and only the prefix of the shared bases the layers read is
kept (``RandloraAdapter.layer_bases``)."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import torch

from randlora_io.format.adapter import build_adapter, read_adapter, write_adapter
from randlora_io.format.delta import reference_delta
from randlora_io.checkpoint.lazy_tensors import FileTensors
from randlora_io.merge.layer import Workspace, add_delta_
from randlora_io.sources.randlora_file import RandloraSource
from randlora_io.format.spec import GeneratorSpec, num_bases

LAYERS = {"a.weight": ((24, 40), False), "b.weight": ((40, 24), False), "c.weight": ((17, 30), True)}


def _adapter(scale: float = 1.0, layers=LAYERS, r: int = 4):
    gen = torch.Generator().manual_seed(2)
    lambdas, gammas = {}, {}
    for key, (shape, _) in layers.items():
        n = num_bases(min(shape), r)
        lambdas[key] = torch.randn(r, n, generator=gen) * scale
        gammas[key] = torch.randn(n, min(shape), generator=gen)
    return build_adapter(generator=GeneratorSpec(name="philox", kind="dense", seed=5), rank=r, alpha=8.0,
                         layers=layers, lambdas=lambdas, gammas=gammas)


def _delta(adapter, key):
    layer = adapter.layers[key]
    shape = (layer.in_features, layer.out_features) if layer.fan_in_fan_out else (layer.out_features,
                                                                                    layer.in_features)
    w = torch.zeros(shape)
    add_delta_(w, RandloraSource(adapter), key, 1.0, "auto", Workspace(), "fp32")
    return w


def test_scales_are_read_on_demand_and_kept_only_when_indexed(tmp_path):
    original = _adapter()
    write_adapter(original, tmp_path / "a.safetensors")
    adapter = read_adapter(tmp_path / "a.safetensors")
    assert isinstance(adapter.lambdas, FileTensors) and isinstance(adapter.gammas, FileTensors)
    assert sorted(adapter.lambdas) == sorted(LAYERS) and len(adapter.gammas) == 3
    for key in LAYERS:  # merging looks without keeping
        assert torch.equal(_delta(adapter, key), _delta(original, key))
    assert adapter.lambdas._kept == {} and adapter.gammas._kept == {}
    lam = adapter.lambdas["a.weight"]
    assert adapter.lambdas["a.weight"] is lam and torch.equal(lam, original.lambdas["a.weight"])
    assert adapter.trainable_parameters() == original.trainable_parameters()
    adapter.lambdas["b.weight"] = torch.zeros(1)  # an assigned tensor is counted as it is now
    assert adapter.trainable_parameters() == original.trainable_parameters() - original.lambdas["b.weight"].numel() + 1


def test_in_place_edits_and_assignments_reach_the_merge(tmp_path):
    """``adapter.lambdas[k].mul_(2)`` on a file-backed adapter must change what is merged, as on a dict."""
    write_adapter(_adapter(), tmp_path / "a.safetensors")
    adapter = read_adapter(tmp_path / "a.safetensors")
    adapter.lambdas["a.weight"].mul_(2.0)
    adapter.gammas["b.weight"] = adapter.gammas["b.weight"] * 3.0
    doubled = _adapter()
    doubled.lambdas["a.weight"].mul_(2.0)
    doubled.gammas["b.weight"] = doubled.gammas["b.weight"] * 3.0
    for key in LAYERS:
        assert torch.equal(_delta(adapter, key), _delta(doubled, key)), key
    path = tmp_path / "edited.safetensors"
    write_adapter(adapter, path)  # written back with the edits
    again = read_adapter(path)
    assert torch.equal(again.lambdas["a.weight"], doubled.lambdas["a.weight"])
    assert torch.equal(again.gammas["b.weight"], doubled.gammas["b.weight"])


def test_a_file_replaced_after_reading_changes_nothing(tmp_path):
    """The scales come from the file that was validated: an atomic replace of the path afterwards (another run
    writing there) is not read."""
    path = tmp_path / "a.safetensors"
    write_adapter(_adapter(), path)
    adapter = read_adapter(path)
    write_adapter(_adapter(scale=100.0), tmp_path / "other.safetensors")
    os.replace(tmp_path / "other.safetensors", path)
    assert torch.equal(adapter.lambdas.peek("a.weight"), _adapter().lambdas["a.weight"])


def test_copies_and_pickles_are_plain_dicts(tmp_path):
    write_adapter(_adapter(), tmp_path / "a.safetensors")
    adapter = read_adapter(tmp_path / "a.safetensors")
    for copied in (copy.copy(adapter.lambdas), copy.deepcopy(adapter.lambdas),
                   pickle.loads(pickle.dumps(adapter.lambdas))):
        assert type(copied) is dict and sorted(copied) == sorted(LAYERS)
        assert all(torch.equal(copied[k], _adapter().lambdas[k]) for k in LAYERS)
    del adapter.lambdas["c.weight"]
    assert "c.weight" not in adapter.lambdas and len(adapter.lambdas) == 2


def test_reading_and_merging_does_not_hold_every_layers_scales(tmp_path):
    """Peak RSS while reading (validating) and merging every layer of an adapter with ~64 MB of scales grows by far
    less than the scales' size (the whole file was mapped and touched before)."""
    r, shape = 8, (512, 512)
    layers = {f"l{i}.weight": (shape, False) for i in range(480)}
    n = num_bases(min(shape), r)
    gen = torch.Generator().manual_seed(0)
    adapter = build_adapter(generator=GeneratorSpec(name="philox", kind="dense", seed=5), rank=r, alpha=8.0,
                            layers=layers, lambdas={k: torch.randn(r, n, generator=gen) for k in layers},
                            gammas={k: torch.randn(n, min(shape), generator=gen) for k in layers})
    path = tmp_path / "big.safetensors"
    write_adapter(adapter, path)
    assert path.stat().st_size > 60e6
    script = textwrap.dedent(f"""
        import torch
        from randlora_io.format.adapter import read_adapter
        from randlora_io.checkpoint.lazy_tensors import peek
        from randlora_io.merge.layer import Workspace, add_delta_
        from randlora_io.sources.randlora_file import RandloraSource
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        adapter = read_adapter({str(path)!r}, verify_bases=False)
        source, ws, w = RandloraSource(adapter), Workspace(), torch.zeros({shape})
        add_delta_(w, source, "l0.weight", 1.0, "auto", ws, "fp32")  # bases, buffers, torch's own pools
        before = hwm()
        for key in adapter.layers:
            add_delta_(w, source, key, 1.0, "auto", ws, "fp32")
        print(hwm() - before)
    """)
    # the read happens before `before`: measure it too, against a process that only imports and builds the bases
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout.split()[-1])
    assert grown < 16e6, grown
    read_script = textwrap.dedent(f"""
        from randlora_io.format.adapter import read_adapter
        def rss_file():
            for line in open("/proc/self/status"):
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024
        before = rss_file()
        adapter = read_adapter({str(path)!r}, verify_bases=False)
        print(rss_file() - before)
    """)
    mapped = int(subprocess.run([sys.executable, "-c", read_script], capture_output=True, text=True, check=True,
                                env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout.split()[-1])
    assert mapped < 16e6, mapped  # the file is not mapped and touched as a whole by the read


def test_layer_bases_keep_only_the_prefix_the_layers_read():
    """PEFT-sized bases (min_dim = max_dim = the elementwise max of the shapes, 40 here) for layers of D ≤ 24: the
    merge keeps A[:, :24] and B[:40, :n·r] only, equal to the full bases' prefix; ``bases()`` still gives the full
    ones afterwards (regenerated and verified), and ΔW is unchanged."""
    adapter = _adapter()
    full = adapter.bases()
    full_A, full_B = full.A.clone(), full.B.clone()
    deltas = {key: reference_delta(adapter.layers[key], adapter.lambdas[key], adapter.gammas[key], full_A, full_B,
                                   adapter.header.scaling) for key in LAYERS}
    assert adapter.header.min_dim == 40 and full_A.shape == (4, 40)
    cut = adapter.layer_bases()
    assert cut.A.shape == (4, 24) and cut.B.shape == (40, num_bases(24, 4) * 4)
    assert cut.A.is_contiguous() and cut.B.is_contiguous()
    assert torch.equal(cut.A, full_A[:, :24]) and torch.equal(cut.B, full_B[:40, : cut.B.shape[1]])
    for key in LAYERS:
        torch.testing.assert_close(_delta(adapter, key), deltas[key], rtol=1e-5, atol=1e-5)
    again = adapter.bases()
    assert torch.equal(again.A, full_A) and torch.equal(again.B, full_B)


def test_hosts_without_positional_reads_load_the_file_whole(tmp_path, monkeypatch):
    """Where the lazy read is not available (no os.preadv, a big-endian host) the scales are loaded as plain dicts
    and merge to the same ΔW."""
    from randlora_io.format import adapter as adapter_module

    write_adapter(_adapter(), tmp_path / "a.safetensors")
    lazy = read_adapter(tmp_path / "a.safetensors")
    monkeypatch.setattr(adapter_module, "can_read_lazily", lambda header, names: False)
    eager = read_adapter(tmp_path / "a.safetensors")
    assert type(eager.lambdas) is dict and isinstance(lazy.lambdas, FileTensors)
    for key in LAYERS:
        assert torch.equal(_delta(eager, key), _delta(lazy, key))
