"""randlora-io: a compact, bit-exact file format for RandLoRA adapters, and the tools around it."""

import os as _os

# MKL's float32 GEMM sums in an order that depends on the thread count unless its strict reproducibility mode is on
# (measured: 1 vs 2 threads changed ~60 % of a merged 64×64 weight's bits at 1e-7, at no cost in speed with it on), so
# a merge under torchrun (1 thread a process) would not write the bytes of the same merge in one process. MKL reads
# this when it first runs, so it is set before torch is imported here; a value the user set is kept.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

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
