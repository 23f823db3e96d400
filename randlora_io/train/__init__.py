"""Train RandLoRA without PEFT and write the randlora format: ``attach`` → train λ, γ → ``handle.save``."""

from .attach import AttachHandle, attach, base_fingerprint, load_into
from .config import RandloraConfig
from .function import randlora_linear, randlora_linear_reference
from .layer import RandloraLayer, SharedBases

__all__ = ["AttachHandle", "RandloraConfig", "RandloraLayer", "SharedBases", "attach", "base_fingerprint",
           "load_into", "randlora_linear", "randlora_linear_reference"]
