"""Memory budgets checked before allocating what an input's shapes ask for, so a small file cannot make a command
allocate without bound: a dense ΔW computed from factors (LoRA A·B, RandLoRA scales) is only as large as the shapes
the file declares, not its size.

``RANDLORA_IO_MAX_LAYER_BYTES`` (default 16 GiB, a float32 128k-vocabulary × 16k layer with room to spare) bounds
one layer's float32 ΔW; the shared bases have their own budget (``RANDLORA_IO_MAX_BASES_BYTES``, ``basis.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from ..errors import LayerTooLargeError

LAYER_BUDGET_ENV = "RANDLORA_IO_MAX_LAYER_BYTES"
DEFAULT_MAX_LAYER_BYTES = 16 * 2**30


def max_layer_bytes() -> int:
    """The per-layer ΔW budget in bytes: ``$RANDLORA_IO_MAX_LAYER_BYTES`` when set to a positive integer."""
    value = os.environ.get(LAYER_BUDGET_ENV, "")
    try:
        return int(value) if int(value) > 0 else DEFAULT_MAX_LAYER_BYTES
    except ValueError:
        return DEFAULT_MAX_LAYER_BYTES


def check_layer_budget(source: str, layers: Iterable[tuple[str, tuple[int, ...]]]) -> None:
    """Refuse, before anything is allocated, a layer of ``source`` whose float32 ΔW would exceed the budget."""
    limit = max_layer_bytes()
    for key, shape in layers:
        nbytes = 4 * math.prod(shape)
        if nbytes > limit:
            raise LayerTooLargeError(
                f"{source}: layer {key!r} declares a {'x'.join(map(str, shape))} weight, a {nbytes / 2**30:.1f} GiB "
                f"float32 ΔW, over the {limit / 2**30:.1f} GiB budget (a damaged file?); if it is real, raise "
                f"{LAYER_BUDGET_ENV}")
