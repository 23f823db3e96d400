"""randlora-io: a compact, bit-exact file format for RandLoRA adapters, and the tools around it."""

from .format.adapter import RandloraAdapter, build_adapter, read_adapter, write_adapter
from .format.basis import Bases, generate_bases
from .format.delta import reference_delta
from .errors import RandloraError
from .merge.plan import merge, merge_into_state_dict
from .format.spec import AdapterHeader, GeneratorSpec, LayerSpec
from .merge.swap import apply_adapter, remove_adapter

__all__ = [
    "AdapterHeader", "Bases", "GeneratorSpec", "LayerSpec", "RandloraAdapter", "RandloraError", "apply_adapter",
    "build_adapter", "generate_bases", "merge", "merge_into_state_dict", "read_adapter", "reference_delta",
    "remove_adapter", "write_adapter",
]
__version__ = "0.1.0"
