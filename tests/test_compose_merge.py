"""``merge --method``: TIES / DARE / breadcrumbs / task arithmetic of real PEFT adapters (RandLoRA dense, RandLoRA
sparse, LoRA) and fine-tuned checkpoints, streamed, against mergekit 0.1.5 itself.

The oracle: each input's task vector from PEFT (``get_delta_weight`` per module, float32) or W_ft − W_base, fed to
mergekit's ``merge_tensors`` (with DARE's ``torch.bernoulli`` replaced by the SPEC.md keep masks, which
tests/test_compose.py and the golden vectors pin down), added to the float32 base. Elements whose fate float32
rounding decides (|τ| at a trimming cut, Σwτ ≈ 0 at the sign election) are left out of the comparison and counted.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_cli
from tiny_models import peft_layer_deltas, peft_lora, peft_randlora, tiny_gpt2, tiny_llama

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")
WEIGHTS = (1.0, 0.6, -0.4)
DENSITIES = (0.5, 0.7, 0.3)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """BASE (tiny Llama, fp32) and three PEFT adapters on it, with their PEFT task vectors."""
    root = tmp_path_factory.mktemp("compose")
    tiny_llama().save_pretrained(root / "base")
    models = {
        "dense": peft_randlora(tiny_llama(), r=8, seed=0),
        "sparse": peft_randlora(tiny_llama(), r=6, seed=5, sparse=True,
                                targets=["q_proj", "k_proj", "v_proj", "o_proj"], scale_seed=4),
        "lora": peft_lora(tiny_llama(), targets=["q_proj", "gate_proj", "down_proj"]),
    }
    taus = []
    for name, model in models.items():
        model.save_pretrained(root / name)
        taus.append(peft_layer_deltas(model))
    return root, [root / n for n in models], taus


def _cuts(mags: torch.Tensor, ranks: list[int]) -> list[float]:
    """|τ| values at the given descending ranks (0 = largest), those that exist."""
    ordered = torch.sort(mags, descending=True).values
    return [float(ordered[r]) for r in ranks if 0 <= r < len(ordered)]


def _undecided(taus: list[torch.Tensor | None], method: str, densities, weights) -> torch.Tensor:
    """Elements whose result float32 rounding of τ (ours vs PEFT's, ~1e-6 relative) can flip: |τᵢ| within 1e-4
    (relative) of a trimming cut, or the elected sign of Σ wᵢτᵢ within 1e-4 of the Σ |wᵢτᵢ|."""
    shape = next(t.shape for t in taus if t is not None)
    near = torch.zeros(shape, dtype=torch.bool)
    for tau, d in zip(taus, densities):
        if tau is None or d >= 1 or method in ("task_arithmetic", "dare_linear", "dare_ties"):
            continue
        n, mags = tau.numel(), tau.abs().reshape(-1)
        if method == "ties":
            k = max(1, int(d * n))
            cuts = _cuts(mags, [k - 1, k])
        else:
            target, n_top = int(d * n), int(0.01 * n)
            n_bot = max(0, n - target - n_top)
            top = n - n_bot  # descending ranks kept: [top - target, top)
            cuts = _cuts(mags, [top - target - 1, top - target, top - 1, top])
        for cut in cuts:
            near |= ((tau.abs() - cut).abs() <= 1e-4 * cut)
    if method in ("ties", "dare_ties", "breadcrumbs_ties"):
        wt = [w * t for w, t in zip(weights, taus) if t is not None]
        near |= sum(wt).abs() <= 1e-4 * sum(x.abs() for x in wt)
    return near


def _mergekit(taus: list[torch.Tensor | None], method: str, densities, weights, lambda_, monkeypatch, key,
              seed=0, normalize=None) -> torch.Tensor:
    """mergekit 0.1.5's merged delta of one tensor (base 0), τ = 0 for inputs not touching it; DARE masks: SPEC's."""
    ms = pytest.importorskip("mergekit.sparsify")
    api = pytest.importorskip("mergekit.merge_methods.api")
    from randlora_io.merge.compose import dare_keep_mask

    shape = next(t.shape for t in taus if t is not None)
    queue = [dare_keep_mask(seed, i, key, tuple(shape), d) for i, d in enumerate(densities) if d < 1]

    def bernoulli(tensor, density, rescale_norm=None):
        return tensor if density >= 1 else ms.rescaled_masked_tensor(tensor, queue.pop(0).float(), rescale_norm)

    monkeypatch.setattr(ms, "bernoulli", bernoulli)
    inputs = [torch.zeros(shape)] + [t if t is not None else torch.zeros(shape) for t in taus]
    params = {"weight": list(weights), "lambda": lambda_}
    if method != "task_arithmetic":
        params["density"] = list(densities)
    if normalize is not None:
        params["normalize"] = normalize
    out = api.merge_tensors(inputs, method, base_index=0, parameters=params)
    assert not queue or "dare" not in method
    return out


def _check_against_mergekit(out_dir: Path, base_dir: Path, taus, method, densities, weights, lambda_, monkeypatch,
                            seed=0, normalize=None) -> None:
    merged = load_file(str(out_dir / "model.safetensors"))
    base = load_file(str(base_dir / "model.safetensors"))
    touched = set().union(*(t.keys() for t in taus))
    undecided_total = compared = 0
    for key, tensor in merged.items():
        if key not in touched:
            assert torch.equal(tensor, base[key]), key  # untouched: the base's bytes
            continue
        per_input = [t.get(key) for t in taus]
        expected = base[key] + _mergekit(per_input, method, densities, weights, lambda_, monkeypatch, key, seed,
                                         normalize)
        skip = _undecided(per_input, method, densities, weights)
        undecided_total += int(skip.sum())
        compared += skip.numel()
        torch.testing.assert_close(tensor[~skip], expected[~skip], rtol=2e-5, atol=2e-6, msg=key)
        assert not torch.equal(tensor, base[key]), key
    assert undecided_total <= 0.01 * compared, (undecided_total, compared)  # mostly the elements at each cut


@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_mergekit(three, method, tmp_path, monkeypatch):
    root, adapters, taus = three
    args = ["merge", root / "base", *adapters, "-o", tmp_path / "out", "--method", method, "--lambda", "0.9"]
    for w in WEIGHTS:
        args += ["--weight", str(w)]
    if method != "task_arithmetic":
        for d in DENSITIES:
            args += ["--density", str(d)]
    result = run_cli(*args)
    assert f"composed by {method}" in result.output
    densities = DENSITIES if method != "task_arithmetic" else (1.0, 1.0, 1.0)
    _check_against_mergekit(tmp_path / "out", root / "base", taus, method, densities, WEIGHTS, 0.9, monkeypatch)


def test_ties_normalize_off_and_one_density_for_all(three, tmp_path, monkeypatch):
    root, adapters, taus = three
    run_cli("merge", root / "base", *adapters, "-o", tmp_path / "out", "--method", "ties", "--density", "0.4",
            "--no-normalize")
    _check_against_mergekit(tmp_path / "out", root / "base", taus, "ties", (0.4,) * 3, (1.0,) * 3, 1.0,
                            monkeypatch, normalize=False)


def test_finetuned_checkpoints_compose_with_adapters(three, tmp_path, monkeypatch):
    root, adapters, taus = three
    base = load_file(str(root / "base" / "model.safetensors"))
    model = tiny_llama()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    model.save_pretrained(tmp_path / "ft")
    ft = load_file(str(tmp_path / "ft" / "model.safetensors"))
    ft_tau = {k: ft[k] - base[k] for k in ft}
    run_cli("merge", root / "base", tmp_path / "ft", adapters[2], "-o", tmp_path / "out", "--method", "dare_ties",
            "--density", "0.6", "--density", "0.8", "--seed", "7")
    _check_against_mergekit(tmp_path / "out", root / "base", [ft_tau, taus[2]], "dare_ties", (0.6, 0.8),
                            (1.0, 1.0), 1.0, monkeypatch, seed=7)


def _digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir()) if f.is_file()}


def test_default_method_is_todays_task_arithmetic(three, tmp_path):
    root, adapters, _ = three
    run_cli("merge", root / "base", *adapters, "-o", tmp_path / "plain", "--weight", "1", "--weight", "0.5",
            "--weight", "2")
    run_cli("merge", root / "base", *adapters, "-o", tmp_path / "ta", "--weight", "1", "--weight", "0.5",
            "--weight", "2", "--method", "task_arithmetic", "--lambda", "1")
    assert _digest(tmp_path / "plain") == _digest(tmp_path / "ta")


def test_dare_is_reproducible_and_the_seed_matters(three, tmp_path):
    root, adapters, _ = three
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        run_cli("merge", root / "base", *adapters, "-o", tmp_path / name, "--method", "dare_linear",
                "--density", "0.5", "--seed", seed)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_dare_torchrun_writes_the_same_bytes(tmp_path):
    tiny_llama(layers=3).save_pretrained(tmp_path / "base", max_shard_size="60KB")
    peft_randlora(tiny_llama(layers=3), r=6, seed=3).save_pretrained(tmp_path / "a")
    peft_lora(tiny_llama(layers=3), targets=["q_proj", "down_proj"]).save_pretrained(tmp_path / "b")
    assert len(list((tmp_path / "base").glob("*.safetensors"))) >= 4
    args = ["merge", str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "b"), "--method", "dare_ties",
            "--density", "0.5", "--seed", "9"]
    run_cli(*args, "-o", tmp_path / "single")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "randlora_io", *args, "-o", str(tmp_path / "shared")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _digest(tmp_path / "shared") == _digest(tmp_path / "single")
    assert proc.stdout.count("composed by dare_ties") == 1, proc.stdout


def test_yaml_config_gives_the_same_bytes_as_the_flags(three, tmp_path):
    root, adapters, _ = three
    config = tmp_path / "merge.yml"
    config.write_text(
        "merge_method: breadcrumbs_ties\n"
        f"base_model: {root / 'base'}\n"
        "models:\n"
        f"  - model: {root / 'base'}\n"  # mergekit lists the base among the models: skipped
        f"  - model: {root / 'base'}\n    parameters: {{weight: 0.3}}\n"  # its parameters too, as mergekit ignores them
        + "".join(f"  - model: {a}\n    parameters:\n      weight: {w}\n      density: {d}\n"
                  for a, w, d in zip(adapters, WEIGHTS, DENSITIES))
        + "parameters:\n  lambda: 0.7\n  normalize: true\n"
        "dtype: bfloat16\n")
    run_cli("merge", "--config", config, "-o", tmp_path / "yaml")
    args = ["merge", root / "base", *adapters, "-o", tmp_path / "flags", "--method", "breadcrumbs_ties",
            "--lambda", "0.7", "--normalize", "--dtype", "bfloat16"]
    for w, d in zip(WEIGHTS, DENSITIES):
        args += ["--weight", str(w), "--density", str(d)]
    run_cli(*args)
    assert _digest(tmp_path / "yaml") == _digest(tmp_path / "flags")
    assert load_file(str(tmp_path / "yaml" / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16


def test_to_delta_then_one_servable_lora(three, tmp_path):
    root, adapters, _ = three
    run_cli("merge", root / "base", *adapters, "-o", tmp_path / "merged", "--method", "ties", "--density", "0.5")
    run_cli("merge", root / "base", *adapters, "--to-delta", tmp_path / "delta.safetensors", "--method", "ties",
            "--density", "0.5")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(root / "base" / "model.safetensors"))
    delta = load_file(str(tmp_path / "delta.safetensors"))
    assert set(delta) == {k for k in merged if not torch.equal(merged[k], base[k])}
    for key, d in delta.items():
        assert torch.equal(base[key] + d, merged[key]), key  # the file holds exactly what merge adds
    run_cli("convert", tmp_path / "delta.safetensors", tmp_path / "lora", "--to", "peft-lora", "--rank", "32",
            "--base", root / "base")
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora")).merge_and_unload()
    for key, value in model.state_dict().items():
        if key in delta:  # PEFT's LoRA carries the best rank-32 approximation of the composed update (float64 SVD)
            u, s, vh = torch.linalg.svd(delta[key].double(), full_matrices=False)
            best = (u[:, :32] * s[:32]) @ vh[:32]
            err = (value.double() - base[key].double() - best).norm() / best.norm()
            assert err < 1e-5, (key, float(err))


def test_merge_into_state_dict_composes_as_merge(three, tmp_path):
    from randlora_io import merge_into_state_dict

    root, adapters, _ = three
    run_cli("merge", root / "base", *adapters, "-o", tmp_path / "out", "--method", "dare_ties", "--density", "0.5",
            "--seed", "2", "--weight", "1", "--weight", "0.5", "--weight", "0.5")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    state = load_file(str(root / "base" / "model.safetensors"))
    ours = merge_into_state_dict(state, [str(a) for a in adapters], [1.0, 0.5, 0.5], method="dare_ties",
                                 density=0.5, seed=2, model_config=tiny_llama().config.to_dict())
    for key, value in merged.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties"])
def test_merge_into_state_dict_composes_a_tied_tensor_once(method, tmp_path, monkeypatch):
    """A live tied model: lm_head and embed_tokens are one tensor under two names. One input adapts lm_head (LoRA),
    another embed_tokens (dense delta): the composition trims, elects signs and normalises over the one tensor, as
    the streaming merge of the saved (stored once) base does, and as mergekit does on that tensor."""
    import json

    from safetensors.torch import save_file

    from randlora_io import merge_into_state_dict
    from tiny_models import tiny_tied_llama

    tiny_tied_llama().save_pretrained(tmp_path / "base")
    lora = peft_lora(tiny_tied_llama(), targets=["lm_head", "q_proj"], scale_seed=2)
    lora.save_pretrained(tmp_path / "a")
    g = torch.Generator().manual_seed(9)
    key = "model.embed_tokens.weight"
    dense = {key: torch.randn(64, 32, generator=g) * 0.01,
             "model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32, generator=g) * 0.01}
    save_file(dense, str(tmp_path / "b.safetensors"),
              metadata={"randlora_dense_delta": json.dumps({"format_version": "1.0"})})
    inputs = [tmp_path / "a", tmp_path / "b.safetensors"]
    run_cli("merge", tmp_path / "base", *inputs, "-o", tmp_path / "out", "--method", method, "--density", "0.5")
    streamed = load_file(str(tmp_path / "out" / "model.safetensors"))
    model = tiny_tied_llama()
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state[key].data_ptr()
    ours = merge_into_state_dict(state, [str(p) for p in inputs], [1.0, 1.0], method=method, density=0.5,
                                 model_config=model.config.to_dict())
    assert torch.equal(ours["lm_head.weight"], ours[key])
    for name, value in streamed.items():
        assert torch.equal(ours[name], value), name
    taus = [peft_layer_deltas(lora)["lm_head.weight"], dense[key]]
    expected = state[key] + _mergekit(taus, method, [0.5, 0.5], [1.0, 1.0], 1.0, monkeypatch, key)
    skip = _undecided(taus, method, [0.5, 0.5], [1.0, 1.0])
    torch.testing.assert_close(ours[key][~skip], expected[~skip], rtol=2e-5, atol=2e-6)


def test_to_delta_on_gpt2_records_conv1d_so_the_lora_export_needs_no_base(tmp_path):
    """--to-delta on a GPT-2 base writes Conv1D weights (in, out), as stored, and records it: the LoRA exported from
    the file without --base equals PEFT's merge of the composed inputs (before: transposed, exit 0)."""
    from peft import PeftModel

    tiny_gpt2().save_pretrained(tmp_path / "base")
    a = peft_lora(tiny_gpt2(), r=4, targets=["c_attn", "c_proj"], fan_in_fan_out=True, scale_seed=1)
    b = peft_lora(tiny_gpt2(), r=4, targets=["c_proj", "c_fc"], fan_in_fan_out=True, scale_seed=2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    run_cli("merge", tmp_path / "base", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    run_cli("merge", tmp_path / "base", tmp_path / "a", tmp_path / "b", "--to-delta", tmp_path / "d.safetensors")
    run_cli("convert", tmp_path / "d.safetensors", tmp_path / "lora", "--to", "peft-lora", "--max-error", "1e-6")
    served = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "lora")).merge_and_unload().state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(served[key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_to_delta_refuses_a_fine_tuned_input_that_changes_norms(three, tmp_path):
    """A fine-tuned checkpoint changes 1-D tensors (norms) a dense delta / LoRA cannot hold: refused up front, not a
    file nothing reads back (before: exit 0, then every reader refused it)."""
    root, adapters, _ = three
    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ft")
    result = run_cli("merge", root / "base", tmp_path / "ft", adapters[2], "--to-delta", tmp_path / "d.safetensors",
                     check=False)
    assert_one_line_error(result, "not a 2-D weight", "merge into BASE")
    assert not (tmp_path / "d.safetensors").exists()


# --- refusals: one line, non-zero exit, nothing written ------------------------------------------------------------

def _refused(tmp_path, *args, fragments=()):
    result = run_cli(*args, check=False)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists() and not (tmp_path / "d.safetensors").exists()
    return result.stderr.strip()


def test_bad_options_are_refused_in_one_line(three, tmp_path):
    root, adapters, _ = three
    base, a, b = root / "base", adapters[0], adapters[2]
    out = ["-o", tmp_path / "out"]
    _refused(tmp_path, "merge", base, a, b, *out, "--method", "ties", "--density", "0", fragments=["(0, 1]", str(a)])
    _refused(tmp_path, "merge", base, a, b, *out, "--method", "ties", "--density", "0.5", "--density", "1.5",
             fragments=["--density 1.5", "input 2", str(b)])
    _refused(tmp_path, "merge", base, a, b, *out, "--method", "ties", "--density", "0.5", "--density", "0.5",
             "--density", "0.5", fragments=["3 --density values for 2 inputs"])
    _refused(tmp_path, "merge", base, a, b, *out, "--method", "ties", "--weight", "1",
             fragments=["1 --weight values for 2 adapters"])
    _refused(tmp_path, "merge", base, a, b, *out, "--density", "0.5", fragments=["no effect with --method task_ar"])
    _refused(tmp_path, "merge", base, a, b, *out, "--method", "ties", "--seed", "3", fragments=["--seed", "DARE"])
    _refused(tmp_path, "merge", base, a, b, *out, "--method", "ties", "--lambda", "inf", fragments=["--lambda"])
    _refused(tmp_path, "merge", base, a, b, *out, "--method", "ties", "--subtract", fragments=["cannot be undone"])
    _refused(tmp_path, "merge", base, a, *out, "--to-delta", tmp_path / "d.safetensors", fragments=["exactly one"])
    _refused(tmp_path, "merge", base, *out, "--method", "ties", fragments=["at least one ADAPTER"])


def test_unknown_method_is_one_line_from_the_console_script(three, tmp_path):
    root, adapters, _ = three
    proc = subprocess.run([sys.executable, "-m", "randlora_io", "merge", str(root / "base"), str(adapters[0]),
                           "-o", str(tmp_path / "out"), "--method", "magic"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("randlora-io: error: Invalid value for '--method'"), proc.stderr
    assert "see 'randlora-io merge --help'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_non_additive_adapters_and_foreign_checkpoints_are_refused_under_a_method(three, tmp_path):
    from peft import LoraConfig, get_peft_model

    root, adapters, _ = three
    dora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                   init_lora_weights=False))
    dora.save_pretrained(tmp_path / "dora")
    head = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head.save_pretrained(tmp_path / "head")
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    base = root / "base"
    out = ["-o", tmp_path / "out"]
    _refused(tmp_path, "merge", base, adapters[0], tmp_path / "dora", *out, "--method", "ties",
             fragments=["DoRA", "cannot compose", str(tmp_path / "dora")])
    _refused(tmp_path, "merge", base, adapters[0], tmp_path / "head", *out, "--method", "dare_linear",
             fragments=["lm_head", "cannot compose", str(tmp_path / "head")])
    _refused(tmp_path, "merge", base, adapters[0], tmp_path / "gpt2", *out, "--method", "ties",
             fragments=["another architecture", str(tmp_path / "gpt2")])


@pytest.mark.parametrize("text, fragments", [
    ("merge_method: ties\nbase_model: B\nmodels:\n  - model: A\n    parameters: {weight: 1, densty: 0.5}\n",
     ["unknown key 'densty'", "models[0].parameters"]),
    ("merge_method: slerp\nbase_model: B\nmodels:\n  - model: A\n    parameters: {weight: 1}\n",
     ["merge_method 'slerp'"]),
    ("merge_method: ties\nmodels:\n  - model: A\n    parameters: {weight: 1}\n", ["base_model is missing"]),
    ("merge_method: ties\nbase_model: B\nmodels:\n  - model: A\n", ["no parameters.weight"]),
    ("merge_method: ties\nbase_model: B\ntokenizer_source: union\nmodels:\n  - model: A\n    parameters: {weight: 1}\n",
     ["unknown key 'tokenizer_source'"]),
    ("merge_method: ties\nbase_model: B\nmodels:\n  - model: A\n    parameters: {weight: [0, 1]}\n",
     ["models[0].parameters.weight", "gradient"]),
    ("merge_method: ties\nbase_model: B\nmodels: [\n", ["not valid YAML"]),
    ("merge_method: ties\nbase_model: B\nmodels:\n  - model: A\n    parameters: {weight: 1, density: 2}\n",
     ["--density 2", "(0, 1]"]),
    ("!!python/object/apply:os.system ['echo hi']\n", ["not valid YAML"]),
])
def test_bad_configs_are_refused_in_one_line(three, tmp_path, text, fragments):
    root, adapters, _ = three
    text = text.replace("base_model: B", f"base_model: {root / 'base'}").replace("model: A", f"model: {adapters[0]}")
    (tmp_path / "m.yml").write_text(text)
    _refused(tmp_path, "merge", "--config", tmp_path / "m.yml", "-o", tmp_path / "out", fragments=fragments)


def test_a_config_dtype_with_to_delta_names_the_config(three, tmp_path):
    root, adapters, _ = three
    (tmp_path / "m.yml").write_text(f"merge_method: ties\nbase_model: {root / 'base'}\ndtype: bfloat16\nmodels:\n"
                                    f"  - model: {adapters[0]}\n    parameters: {{weight: 1, density: 0.5}}\n")
    _refused(tmp_path, "merge", "--config", tmp_path / "m.yml", "--to-delta", tmp_path / "d.safetensors",
             fragments=["drop the dtype: bfloat16 in", "m.yml"])


def test_config_and_flags_together_are_refused(three, tmp_path):
    root, adapters, _ = three
    (tmp_path / "m.yml").write_text(f"merge_method: ties\nbase_model: {root / 'base'}\nmodels:\n"
                                    f"  - model: {adapters[0]}\n    parameters: {{weight: 1}}\n")
    _refused(tmp_path, "merge", "--config", tmp_path / "m.yml", "-o", tmp_path / "out", "--method", "ties",
             fragments=["drop --method"])


def test_a_nan_the_trimming_would_drop_is_refused(three, tmp_path):
    root, adapters, _ = three
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3, 5] = float("nan")  # one element of one fine-tuned weight
    model.save_pretrained(tmp_path / "ft")
    # NaN ranks largest: breadcrumbs drops it with the top 1 % outliers, and the merged weight would look finite
    _refused(tmp_path, "merge", root / "base", adapters[0], tmp_path / "ft", "-o", tmp_path / "out",
             "--method", "breadcrumbs", "--density", "0.5", fragments=["NaN or Inf", "task vector", "q_proj"])
