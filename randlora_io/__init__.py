"""randlora-io: a compact, bit-exact file format for RandLoRA adapters, and the tools around it."""

from .adapter import RandloraAdapter, build_adapter, read_adapter, write_adapter
from .basis import Bases, generate_bases
from .delta import reference_delta
from .errors import RandloraError
from .merge import merge, merge_into_state_dict
from .spec import AdapterHeader, GeneratorSpec, LayerSpec

__all__ = [
    "AdapterHeader", "Bases", "GeneratorSpec", "LayerSpec", "RandloraAdapter", "RandloraError", "build_adapter",
    "generate_bases", "merge", "merge_into_state_dict", "read_adapter", "reference_delta", "write_adapter",
]
__version__ = "0.1.0"
