"""What a serving engine accepts of a PEFT LoRA dir (``convert --to peft-lora --for vllm|sglang``).

vLLM and SGLang serve PEFT LoRA adapters unmerged, with one rank per adapter padded to the server's
``--max-lora-rank``, and refuse what their kernels do not implement. Facts used here (vLLM's ``lora/peft_helper.py``
and ``config/lora.py``, SGLang's LoRA docs, read 2026-12):

- vLLM's ``max_lora_rank`` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (a pydantic literal; default 16), and every
  request pays for that padded rank. SGLang's ``--max-lora-rank`` is any integer; we cap both at 512.
- vLLM's ``PEFTHelper`` reads ``r``, ``lora_alpha``, ``target_modules``, ``bias``, ``modules_to_save``,
  ``use_rslora``, ``use_dora`` (newer releases also ``rank_pattern`` / ``alpha_pattern``, older ones ignore them, so a
  served dir has one r and no patterns); it refuses DoRA, ``modules_to_save`` and biases.
- Conservative refusals (their support differs between releases, or we could not confirm it): LoRA on embeddings
  and ``lm_head`` (vLLM's extra-vocab LoRA was removed in later releases), and GPT-2 style ``Conv1D`` layers
  (``fan_in_fan_out``: the engines' LoRA layers are their own (out, in) linears, and their GPT-2 models list no LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnservableError
from ..sources.interface import DeltaSource

MAX_RANK = 512
# leaf module names of embeddings and output heads in the architectures transformers ships most
_EMBEDDING_LEAVES = frozenset({"embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "embed_out",
                               "lm_head", "shared", "embeddings", "position_embeddings", "token_type_embeddings"})


@dataclass(frozen=True)
class Engine:
    """A serving engine's LoRA limits: ``ranks`` the ``--max-lora-rank`` values it accepts (None: any 1 … MAX_RANK),
    ``config_fields`` the ``adapter_config.json`` keys it reads (``peft_type`` is kept too: PEFT needs it)."""

    name: str
    ranks: tuple[int, ...] | None
    config_fields: tuple[str, ...] = ("peft_type", "r", "lora_alpha", "target_modules", "bias", "modules_to_save",
                                      "use_rslora", "use_dora")

    def uniform_rank(self, needed: int) -> int | None:
        """The one rank to write for an adapter whose layers need at most ``needed``: the smallest allowed rank
        ≥ needed (layers below it are zero-padded, never truncated), or None above ``MAX_RANK``."""
        if self.ranks is None:
            return max(needed, 1) if needed <= MAX_RANK else None
        return next((r for r in self.ranks if r >= needed), None)

    def flags(self, rank: int, modules: list[str]) -> list[str]:
        """The server flags (first) and an example command line for a dir written at ``rank``."""
        if self.name == "vllm":
            return [f"--enable-lora --max-lora-rank {rank}",
                    f"vllm serve BASE --enable-lora --max-lora-rank {rank} --lora-modules NAME=ADAPTER_DIR"]
        leaves = " ".join(sorted({m.rsplit(".", 1)[-1] for m in modules}))
        return [f"--enable-lora --max-lora-rank {rank} --lora-target-modules {leaves}",
                f"python -m sglang.launch_server --model-path BASE --enable-lora --max-lora-rank {rank} "
                f"--lora-target-modules {leaves} --lora-paths NAME=ADAPTER_DIR"]

    def config(self, full: dict) -> dict:
        """``full`` (a PEFT LoRA config) cut down to the fields this engine reads."""
        return {k: full[k] for k in self.config_fields if k in full}


ENGINES = {"vllm": Engine("vllm", (1, 8, 16, 32, 64, 128, 256, 320, 512)), "sglang": Engine("sglang", None)}


def engine_named(name: str) -> Engine:
    if name not in ENGINES:
        raise UnservableError(f"unknown serving engine {name!r}; choose one of {', '.join(ENGINES)}")
    return ENGINES[name]


def check_servable(source: DeltaSource, engine: Engine, rank: int | None) -> None:
    """Refuse, before any ΔW is computed, what ``engine`` cannot serve: trained tensors replacing the base's
    (modules_to_save, biases), DoRA, Conv1D layers, embedding / lm_head targets, a ``--rank`` it does not accept."""
    where = source.path
    if source.replacements:
        key = next(iter(source.replacements))
        raise UnservableError(
            f"{where}: carries trained tensors that replace the base's ({key!r}…: modules_to_save or trained biases), "
            f"which {engine.name} refuses in a LoRA adapter; merge the adapter into its base instead")
    for key in source.keys():
        if source.dora_magnitude(key) is not None:
            raise UnservableError(f"{where}: {key!r} is a DoRA layer, which {engine.name} does not serve; merge the "
                                  "adapter into its base instead")
        leaf = key.removesuffix(".weight").rsplit(".", 1)[-1]
        if leaf in _EMBEDDING_LEAVES:
            raise UnservableError(
                f"{where}: {key!r} is an embedding or output head; {engine.name}'s LoRA support there differs "
                "between releases, so it is not exported for serving: merge the adapter, or convert without --for")
        if source.fan_in_fan_out(key):
            raise UnservableError(
                f"{where}: {key!r} is a GPT-2 style Conv1D layer (weight stored (in, out)), which {engine.name} has "
                "no LoRA layer for; merge the adapter, or convert without --for")
    if rank is not None and engine.uniform_rank(rank) != rank:
        allowed = ", ".join(map(str, engine.ranks or ())) or f"1 … {MAX_RANK}"
        raise UnservableError(f"{where}: --rank {rank} is not a --max-lora-rank {engine.name} accepts ({allowed}); "
                              f"pass one of those, or --max-error E to choose it")
