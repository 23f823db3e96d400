"""Train RandLoRA without PEFT and write the randlora format: ``attach`` → train λ, γ → ``handle.save``."""

from .attach import AttachHandle, attach, base_fingerprint, load_into
from .config import RandloraConfig
from .function import randlora_linear, randlora_linear_reference
from .layer import RandloraLayer, SharedBases

__all__ = ["AttachHandle", "RandloraConfig", "RandloraLayer", "RandloraTrainer", "SharedBases", "attach",
           "base_fingerprint", "load_into", "randlora_linear", "randlora_linear_reference"]


def __getattr__(name: str):
    """``RandloraTrainer`` needs transformers (an extra): imported on first use only."""
    if name == "RandloraTrainer":
        from .hf_trainer import RandloraTrainer

        return RandloraTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
