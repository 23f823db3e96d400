"""transformers' ``save_pretrained`` / ``load_state_dict`` on a model with RandLoRA attached.

Attached, a targeted layer's weight lives at ``<module>.base_layer.weight`` beside the trained tensors
(``randlora_lambda/gamma``, or ``vera_lambda_b/d``): saved as is, ``from_pretrained`` would report the targeted layers
missing and re-initialise them (a silently broken model). So while attached, ``model.save_pretrained`` writes the
merged model (W + ΔW under the base's own key names, no trained tensors) without changing the model in memory, and
``model.load_state_dict`` of such a merged state dict (a plain ``Trainer`` resuming from its checkpoint) is refused
instead of leaving the adapter untrained.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterStateError

AttachHandle = Any   # .handle.AttachHandle (not imported: handle imports this module)
_ATTR = "save_pretrained"


@torch.no_grad()
def merged_state_dict(handle: AttachHandle, state_dict: Mapping[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """``state_dict`` (default: the model's) with every targeted layer merged: ``<m>.base_layer.weight`` becomes
    ``<m>.weight`` = W + ΔW (float32 add, one rounding to W's dtype; W as is when the handle already merged),
    ``<m>.base_layer.<x>`` becomes ``<m>.<x>``, λ and γ are dropped. The model itself is not changed."""
    source = dict(handle.model.state_dict() if state_dict is None else state_dict)
    out: dict[str, torch.Tensor] = {}
    renamed = {}
    for key, layer in handle.layers.items():
        name = handle.module_names[key]
        renamed[f"{name}.base_layer."] = f"{name}."
        for scale in layer.SCALE_NAMES:
            source.pop(f"{name}.{scale}", None)
    for k, v in source.items():
        for old, new in renamed.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    if not handle.merged:
        for key, layer in handle.layers.items():
            w = out[key]
            out[key] = (w.float() + layer.delta().to(w.device)).to(w.dtype)
    return out


def _save_merged(handle: AttachHandle, original, save_directory, *args, state_dict=None, **kwargs):
    return original(save_directory, *args, state_dict=merged_state_dict(handle, state_dict), **kwargs)


def _refuse_merged_keys(handle: AttachHandle, module, state_dict, prefix, *args) -> None:
    for name in handle.module_names.values():
        if f"{prefix}{name}.weight" in state_dict and f"{prefix}{name}.base_layer.weight" not in state_dict:
            raise AdapterStateError(
                f"{name}: this state dict holds a merged model (as save_pretrained of an attached model writes it), "
                "not the adapter's trained tensors; load it into the base model without the adapter attached, or resume training "
                "from an adapter checkpoint (randlora_io.train.RandloraTrainer writes them)")


def install(handle: AttachHandle) -> None:
    """While attached: ``model.save_pretrained`` writes the merged model; a merged state dict is refused on load."""
    model = handle.model
    original = getattr(type(model), _ATTR, None)
    if callable(original):
        setattr(model, _ATTR, functools.partial(_save_merged, handle, original.__get__(model)))
    hook = model.register_load_state_dict_pre_hook(functools.partial(_refuse_merged_keys, handle))
    handle._hooks = [hook]


def uninstall(handle: AttachHandle) -> None:
    """Undo :func:`install` (on detach)."""
    model = handle.model
    if isinstance(model.__dict__.get(_ATTR), functools.partial):
        del model.__dict__[_ATTR]
    for hook in getattr(handle, "_hooks", []):
        hook.remove()
    handle._hooks = []
