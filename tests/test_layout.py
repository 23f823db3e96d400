"""The package layout ARCHITECTURE.md describes, checked against the code: at most 8 top-level modules, no module
over ~400 lines, imports that only point down the layer table, a public API of documented top-level names, and a
README library example that uses only those (and randlora_io.train)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import randlora_io

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "randlora_io"


def _layers() -> dict[str, int]:
    """``{top-level name: layer}`` from ARCHITECTURE.md's map (rows like "| 5 | `merge/` | ...")."""
    layers = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| (\d+|—) \| (.+?) \|", line)
        if match:
            for name in re.findall(r"`([\w_]+)(?:/|\.py)`", match.group(2)):
                layers[name] = -1 if match.group(1) == "—" else int(match.group(1))
    return layers


def _imports(path: Path) -> list[str]:
    """The package-internal modules ``path`` imports (module level and inside functions), as dotted names."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = list(rel[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            found.append(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("randlora_io"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("randlora_io")]
    return found


def test_top_level_holds_at_most_eight_modules():
    modules = sorted(p.name for p in PKG.glob("*.py"))
    assert len(modules) <= 8, modules


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, long


def test_every_subpackage_and_top_level_module_has_a_layer():
    layers = _layers()
    names = {p.stem for p in PKG.glob("*.py")} | {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert names - {"__init__", "__main__"} <= set(layers), names - set(layers)


def test_imports_point_down_the_layer_table():
    layers = _layers()
    wrong = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("").parts
        if rel[0] in ("__init__", "__main__"):
            continue
        own = rel[0]
        for module in _imports(path):
            parts = module.split(".")
            if len(parts) < 2 or parts[1] == own:
                continue
            if layers[parts[1]] >= layers[own] and layers[parts[1]] != -1:
                wrong.append(f"{path.relative_to(ROOT)} (layer {layers[own]}) imports {module} "
                             f"(layer {layers[parts[1]]})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", randlora_io.__all__)
def test_public_names_import_from_the_top_level_with_a_docstring(name):
    obj = getattr(randlora_io, name)
    assert (obj.__doc__ or "").strip(), f"randlora_io.{name} has no docstring"
    assert obj.__doc__ != type(obj).__doc__ or isinstance(obj, type), name


def test_the_public_api_covers_what_users_call():
    expected = {"merge", "merge_into_state_dict", "apply_adapter", "remove_adapter", "read_adapter", "write_adapter",
                "build_adapter", "GeneratorSpec", "RandloraAdapter", "Bases", "convert", "push_to_hub",
                "load_from_hub", "open_source", "describe", "validate"}
    assert expected <= set(randlora_io.__all__), expected - set(randlora_io.__all__)
    assert len(set(randlora_io.__all__)) == len(randlora_io.__all__)


def test_readme_library_example_uses_only_top_level_names():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Library", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))
    imports = re.findall(r"^\s*from (randlora_io[\w.]*) import (.+)$", code, re.M)
    assert imports, "no randlora_io import in the README's library example"
    for module, names in imports:
        assert module in ("randlora_io", "randlora_io.train"), module
        if module == "randlora_io":
            for name in (n.strip() for n in names.split(",")):
                assert name in randlora_io.__all__, name
