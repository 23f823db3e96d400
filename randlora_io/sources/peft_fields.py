"""Every field of PEFT 0.21.2's ``LoraConfig``, ``RandLoraConfig`` and ``VeraConfig``, classified: what each means for a merge.

Each field is one of:

- ``HANDLED``: read, and reproduced exactly as PEFT's ``merge_and_unload`` applies it (tested against PEFT);
- ``NO_EFFECT``: cannot change the merged weights once the adapter is saved (metadata, dropout, an init whose
  result is the saved weights, runtime placement), with the reason;
- ``REFUSED``: a non-default value makes PEFT's model something ``W + ΔW`` written by this merge is not (a variant
  layer with its own forward, a changed base, a changed model structure): refused in one line naming the field,
  its value, why, and what to do.

:func:`check_peft_fields` applies the table to a parsed ``adapter_config.json``. A field the table does not know
(a newer PEFT) passes when its value is a default-looking one (null, false, empty, the same as absent) and is
refused otherwise: an option this code never read could change the weights. ``tests/test_peft_fields.py`` fails
when the installed PEFT has a field the table does not classify.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SourceFormatError

HANDLED, NO_EFFECT, REFUSED = "handled", "no effect", "refused"


@dataclass(frozen=True)
class Field:
    """One config field: its class, why, and (refused fields) when its value counts as set and what to do."""

    kind: str
    why: str
    is_set: Callable[[object], bool] = lambda value: value not in (None, False, [], {}, "")
    fix: str = ""


def _variant(name: str) -> Field:
    return Field(REFUSED, f"a LoRA variant ({name}) whose layer computes more than W + s·B·A, so no merged weight "
                 "written here equals it", fix="merge it with PEFT (if PEFT can) or serve the adapter unmerged")


# init_lora_weights values with which PEFT changes the base weights themselves at init (W − B₀A₀, a residual or a
# quantized base): the saved ΔW is relative to that changed base, unless PEFT converted it at save time
# (path_initial_model_for_weight_conversion, which saves init_lora_weights=true)
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def _changes_base(value: object) -> bool:
    return isinstance(value, str) and value.lower().startswith(_BASE_CHANGING_INITS)


_COMMON: dict[str, Field] = {
    "task_type": Field(NO_EFFECT, "the model head class PEFT wraps, not a weight"),
    "peft_type": Field(HANDLED, "selects the reader (LORA, RANDLORA or VERA)"),
    "auto_mapping": Field(NO_EFFECT, "the class names PEFT loads with"),
    "peft_version": Field(NO_EFFECT, "metadata"),
    "base_model_name_or_path": Field(NO_EFFECT, "metadata (used only to find a local base when none is given)"),
    "revision": Field(NO_EFFECT, "metadata"),
    "inference_mode": Field(NO_EFFECT, "whether the adapter trains"),
    "r": Field(HANDLED, "the rank"),
    "target_modules": Field(HANDLED, "which layers PEFT adapts (peft_targets.py)"),
    "exclude_modules": Field(HANDLED, "which layers PEFT leaves out (peft_targets.py)"),
    "fan_in_fan_out": Field(HANDLED, "ignored as PEFT does per layer: orientation comes from each layer's type"),
    "bias": Field(HANDLED, "trained biases are saved and written over the base's"),
    "modules_to_save": Field(HANDLED, "trained copies written over the base's (ties.py for tied weights)"),
    "layers_to_transform": Field(HANDLED, "which layer indices PEFT adapts (peft_targets.py)"),
    "layers_pattern": Field(HANDLED, "where the layer index is (peft_targets.py)"),
}

LORA_FIELDS: dict[str, Field] = {
    **_COMMON,
    "lora_alpha": Field(HANDLED, "the scaling α/r (α/√r with use_rslora)"),
    "lora_dropout": Field(NO_EFFECT, "dropout is off in eval and never merged"),
    "use_rslora": Field(HANDLED, "the scaling α/√r"),
    "init_lora_weights": Field(
        REFUSED, "PEFT changed the base weights themselves at init (W − B₀A₀), so this adapter's ΔW is relative to "
        "that changed base, not to BASE", is_set=_changes_base,
        fix="save it with PEFT's path_initial_model_for_weight_conversion (a plain LoRA on the original base), or "
        "merge into the base saved after PEFT's init"),
    "rank_pattern": Field(HANDLED, "per-layer ranks"),
    "alpha_pattern": Field(HANDLED, "per-layer alphas"),
    "megatron_config": Field(REFUSED, "Megatron tensor-parallel LoRA layers, whose weights are sharded across ranks",
                             fix="merge it with PEFT inside Megatron"),
    "megatron_core": Field(NO_EFFECT, "the module name used with megatron_config (refused on its own)"),
    "trainable_token_indices": Field(REFUSED, "trained rows of the embedding matrix (TrainableTokensLayer), not a "
                                     "LoRA update", fix="merge it with PEFT's merge_and_unload"),
    "loftq_config": Field(NO_EFFECT, "LoftQ's settings; LoftQ itself is init_lora_weights='loftq' (refused)"),
    "eva_config": Field(NO_EFFECT, "EVA's init settings: EVA does not change the base; the result is the saved A"),
    "corda_config": Field(NO_EFFECT, "CorDA's settings; CorDA itself is init_lora_weights='corda' (refused)"),
    "lora_ga_config": Field(NO_EFFECT, "LoRA-GA's settings; LoRA-GA itself is init_lora_weights='lora_ga' (refused)"),
    "use_dora": Field(HANDLED, "DoRA: m·(W + ΔW)/‖W + ΔW‖ (merge/dora.py)"),
    "velora_config": Field(HANDLED, "VeLoRA compresses activations for training only: PEFT merges it as W + s·B·A "
                           "(its saved lora_velora_embed is not part of ΔW)"),
    "alora_invocation_tokens": Field(
        REFUSED, "activated LoRA applies its update only after the invocation tokens, so no merged weight equals "
        "it (PEFT refuses to merge it too)", fix="serve the adapter unmerged"),
    "use_qalora": Field(REFUSED, "QA-LoRA pools the layer input in groups before lora_A, so its ΔW is not B·A",
                        fix="merge it with PEFT's merge_and_unload"),
    "qalora_group_size": Field(NO_EFFECT, "QA-LoRA's group size (use_qalora is refused)"),
    "monteclora_config": Field(HANDLED, "MonteCLoRA samples only while training: PEFT merges it as W + s·B·A "
                               "(its saved lora_monteclora_sampler tensors are not part of ΔW)"),
    "layer_replication": Field(REFUSED, "PEFT duplicates base layers in memory, so the model has layers the "
                               "checkpoint does not", fix="merge it with PEFT and save_pretrained the result"),
    "runtime_config": Field(NO_EFFECT, "where PEFT computes at run time (ephemeral GPU offload)"),
    "lora_bias": Field(REFUSED, "lora_B has a bias of its own, an extra term on the layer's bias",
                       fix="merge it with PEFT's merge_and_unload, or train with lora_bias=False"),
    "target_parameters": Field(HANDLED, "LoRA on raw parameters (fused MoE experts: fused_params.py)"),
    "use_bdlora": _variant("BD-LoRA, block-diagonal factors sharded for serving"),
    "arrow_config": _variant("Arrow, routing among several LoRA experts per token"),
    "kasa_config": _variant("KaSA, singular-value adaptation"),
    "ensure_weight_tying": Field(HANDLED, "one trained copy for both sides of a tie (ties.py)"),
}

RANDLORA_FIELDS: dict[str, Field] = {
    **_COMMON,
    "projection_prng_key": Field(HANDLED, "the seed of the shared bases"),
    "save_projection": Field(HANDLED, "whether the bases are saved (regenerated from the seed when not)"),
    "sparse": Field(HANDLED, "ternary bases, density 1/3"),
    "very_sparse": Field(HANDLED, "ternary bases, density 1/√min_dim"),
    "randlora_dropout": Field(NO_EFFECT, "dropout is off in eval and never merged"),
    "randlora_alpha": Field(HANDLED, "the scaling α/r"),
    "init_weights": Field(NO_EFFECT, "the init of λ/γ; the merge uses the saved ones (targets without saved "
                          "scales are decided in peft_targets.py)"),
}

VERA_FIELDS: dict[str, Field] = {
    **_COMMON,
    "projection_prng_key": Field(HANDLED, "the seed of the shared vera_A / vera_B (a negative key is 2^64 + key)"),
    "save_projection": Field(HANDLED, "true: vera_A / vera_B used as saved (missing: refused, as PEFT does); false: "
                                      "regenerated, saved ones ignored as PEFT ignores them"),
    "vera_dropout": Field(NO_EFFECT, "dropout is off in eval and never merged"),
    "d_initial": Field(NO_EFFECT, "the init value of λ_d; the merge uses the saved λ_d"),
    "init_weights": Field(NO_EFFECT, "the init of λ_b / λ_d; the merge uses the saved ones (targets without saved "
                          "vectors are decided in peft_vera.py)"),
}

_TABLES = {"LORA": LORA_FIELDS, "RANDLORA": RANDLORA_FIELDS, "VERA": VERA_FIELDS}


def check_peft_fields(config: dict, path: str | Path) -> None:
    """Refuse, in one :class:`SourceFormatError`, the first field of ``config`` (``adapter_config.json`` at ``path``)
    that the table refuses with a set value, or that the table does not know and is set. Peft types without a table
    are left to their reader."""
    table = _TABLES.get(str(config.get("peft_type", "")).upper())
    if table is None:
        return
    for name, value in config.items():
        field = table.get(name)
        if field is None:
            if Field(REFUSED, "").is_set(value):
                raise SourceFormatError(
                    f"{path}: adapter_config.json {name}={value!r}: an option PEFT 0.21.2 does not have (a newer "
                    "PEFT?), which could change the merged weights in a way this merge does not know; merge with "
                    "the PEFT that wrote it, or remove the key if it is at its default")
            continue
        if field.kind == REFUSED and field.is_set(value):
            raise SourceFormatError(f"{path}: adapter_config.json {name}={value!r}: {field.why}; {field.fix}")
