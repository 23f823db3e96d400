"""Which layers a PEFT ``adapter_config.json`` targets, decided as PEFT 0.21.2 decides it when it loads the dir.

PEFT matches each module name of the model against the config (``check_target_module_exists`` in
``peft/tuners/tuners_utils.py``): ``exclude_modules``, ``modules_to_save``, ``target_modules`` (a regex matched in
full, or a list of names matched exactly or as a dotted suffix), then ``layers_to_transform`` / ``layers_pattern``.
It loads only the saved weights of matched modules (others are ignored) and sizes RandLoRA's shared bases from the
matched modules. This module reproduces that decision on the adapter's module names and the base's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..checkpoint.base_model import BaseModelInfo
from ..errors import SourceFormatError

ALL_LINEAR = "all-linear"


def weight_module(weight_key: str) -> str:
    """A base checkpoint weight key → its module name (``a.b.weight`` → ``a.b``)."""
    return weight_key.removesuffix(".weight")


def _str_list(value, name: str, source: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise SourceFormatError(f"{source}: adapter_config.json {name} must be a string or a list of strings, "
                            f"got {value!r}")


def _compile(pattern: str, name: str, source: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError) as exc:
        raise SourceFormatError(f"{source}: adapter_config.json {name} {pattern!r} is not a valid regex ({exc})") from None


@dataclass(frozen=True)
class TargetRule:
    """The targeting part of a PEFT config, validated once (see :func:`target_rule`)."""

    targets: re.Pattern | tuple[str, ...] | None  # None: "all-linear" (every saved layer)
    exclude: re.Pattern | tuple[str, ...] = ()
    modules_to_save: tuple[re.Pattern, ...] = ()
    layer_indexes: int | tuple[int, ...] | None = None
    layers_patterns: tuple[str, ...] = ()

    def matches(self, module: str) -> bool:
        """PEFT's ``check_target_module_exists(config, module)`` as a bool (an excluded module is not targeted)."""
        if isinstance(self.exclude, re.Pattern):
            if self.exclude.fullmatch(module):
                return False
        elif module in self.exclude or any(module.endswith(f".{e}") for e in self.exclude):
            return False
        if any(p.match(module) for p in self.modules_to_save):
            return False
        if self.targets is None:
            return True
        if isinstance(self.targets, re.Pattern):
            return self.targets.fullmatch(module) is not None
        if module in self.targets:
            return True
        if not any(module.endswith(f".{t}") for t in self.targets):
            return False
        if self.layer_indexes is None:
            return True
        index = self._layer_index(module)
        if index is None:
            return False
        return index == self.layer_indexes if isinstance(self.layer_indexes, int) else index in self.layer_indexes

    def _layer_index(self, module: str) -> int | None:
        if not self.layers_patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            match = None
            for pattern in self.layers_patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
                if match is not None:
                    break
        return int(match.group("idx")) if match else None


def target_rule(config: dict, source: str) -> TargetRule:
    """The :class:`TargetRule` of a PEFT config dict; malformed fields are a :class:`SourceFormatError`."""
    raw = config.get("target_modules")
    if raw is None:
        if config.get("target_parameters"):
            raise SourceFormatError(f"{source}: target_parameters adapters (PEFT ParamWrapper on raw parameters, e.g. "
                                    "fused MoE experts) are not supported")
        raise SourceFormatError(f"{source}: adapter_config.json has no target_modules; PEFT fills it in when it "
                                "saves an adapter: re-save it with PEFT")
    if isinstance(raw, str):
        targets = None if raw.lower() == ALL_LINEAR else _compile(raw, "target_modules", source)
    else:
        targets = tuple(_str_list(raw, "target_modules", source) or ())
    exclude_raw = config.get("exclude_modules")
    exclude = (_compile(exclude_raw, "exclude_modules", source) if isinstance(exclude_raw, str)
               else tuple(_str_list(exclude_raw, "exclude_modules", source) or ()))
    saved = tuple(_compile(rf"(^|.*\.){m}($|\..*)", "modules_to_save", source)
                  for m in _str_list(config.get("modules_to_save"), "modules_to_save", source) or ())
    indexes = config.get("layers_to_transform")
    if isinstance(indexes, bool) or not (indexes is None or isinstance(indexes, int) or
                                         (isinstance(indexes, list) and all(isinstance(i, int) for i in indexes))):
        raise SourceFormatError(f"{source}: adapter_config.json layers_to_transform must be an int or a list of ints, "
                                f"got {indexes!r}")
    if isinstance(indexes, list):
        indexes = tuple(indexes) if indexes else None
    patterns = tuple(_str_list(config.get("layers_pattern"), "layers_pattern", source) or ())
    for pattern in patterns:
        _compile(pattern, "layers_pattern", source)
    return TargetRule(targets=targets, exclude=exclude, modules_to_save=saved, layer_indexes=indexes,
                      layers_patterns=patterns)


@dataclass(frozen=True)
class Targeting:
    """PEFT's view of a saved adapter: ``loaded`` modules (saved and targeted), ``ignored`` ones (saved but not
    targeted: PEFT skips their weights) and ``unsaved`` ones (base modules the config targets without saved weights:
    PEFT adapts them from a fresh init, a zero ΔW by default, and for RandLoRA counts their shapes in the bases)."""

    loaded: list[str]
    ignored: list[str]
    unsaved: list[str]


def select_targeted(config: dict, saved_modules: Iterable[str], base_modules: Iterable[str] | None,
                    source: str) -> Targeting:
    """Split the adapter's saved modules as PEFT does when it loads the dir (see :class:`Targeting`).

    ``base_modules``: the base model's module names that hold a 2-D ``weight`` (None if unknown). Refuses a config
    that targets none of the saved modules (PEFT would load nothing).
    """
    rule = target_rule(config, source)
    saved = list(saved_modules)
    loaded = [m for m in saved if rule.matches(m)]
    kept = set(loaded)
    ignored = [m for m in saved if m not in kept]
    unsaved = []
    if base_modules is not None and rule.targets is not None:
        have = set(saved)
        unsaved = sorted(m for m in base_modules if m not in have and rule.matches(m))
    if not loaded:
        raise SourceFormatError(
            f"{source}: adapter_config.json targets none of the {len(saved)} saved layer(s) (e.g. {saved[0]!r}); "
            "PEFT would load nothing: config and weights disagree" if saved else
            f"{source}: the adapter holds no layer weights")
    return Targeting(loaded=loaded, ignored=ignored, unsaved=unsaved)


def matrix_modules(base: BaseModelInfo) -> list[str]:
    """The base's module names that hold a 2-D ``weight`` (candidates for PEFT's target matching)."""
    return [k.removesuffix(".weight") for k, shape in base.shapes.items() if k.endswith(".weight") and len(shape) == 2]


def targeted_layers(config: dict, saved_keys: list[str], base: BaseModelInfo | None, source: str,
                    on_note: Callable[[str], None] | None = None) -> tuple[list[str], list[str]]:
    """(loaded weight keys, unsaved targeted weight keys) of a PEFT dir, as PEFT's loader decides (peft_targets);
    saved layers the config does not target are dropped, with a note, as PEFT drops them."""
    targeting = select_targeted(config, [weight_module(k) for k in saved_keys],
                                matrix_modules(base) if base is not None else None, source)
    if targeting.ignored and on_note is not None:
        on_note(f"{source}: ignored {len(targeting.ignored)} saved layer(s) that adapter_config.json does not "
                f"target (e.g. {targeting.ignored[0]!r}), as PEFT does when it loads the dir")
    return [m + ".weight" for m in targeting.loaded], [m + ".weight" for m in targeting.unsaved]
