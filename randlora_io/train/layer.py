"""The module that wraps a frozen Linear / Conv1D with trainable RandLoRA scales, and the shared bases it slices."""

from __future__ import annotations

import torch
from torch import nn

from ..format.basis import Bases, generate_bases
from ..format.delta import reference_delta
from ..format.spec import GeneratorSpec, LayerSpec
from .function import randlora_linear, randlora_update


class SharedBases:
    """The model-wide bases A (r, min_dim) and B (max_dim, N·r), float32: generated once, one copy per device."""

    def __init__(self, generator: GeneratorSpec, rank: int, min_dim: int, max_dim: int, bases: Bases | None = None):
        """``bases``: already generated (and verified) bases to reuse instead of drawing them again."""
        self.generator, self.rank, self.min_dim, self.max_dim = generator, rank, min_dim, max_dim
        self._by_device: dict[str, Bases] = {} if bases is None else {str(bases.A.device): bases}

    def on(self, device: torch.device | str) -> Bases:
        key = str(torch.device(device))
        if key not in self._by_device:
            if self._by_device:
                first = next(iter(self._by_device.values()))
                bases = Bases(A=first.A.to(device), B=first.B.to(device))
            else:
                bases = self._draw()
                bases = Bases(A=bases.A.to(device), B=bases.B.to(device))
            self._by_device[key] = bases
        return self._by_device[key]

    def _draw(self) -> Bases:
        return generate_bases(self.generator, self.rank, self.min_dim, self.max_dim)

    def any(self) -> Bases:
        """The bases on a device that already holds them (CPU when none does yet)."""
        return next(iter(self._by_device.values())) if self._by_device else self.on("cpu")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class WrappedLayer(nn.Module):
    """A frozen ``base_layer`` (nn.Linear or Conv1D) wrapped with trainable adapter scales: what every adapter
    method's training layer shares. It exposes what the wrapped layer exposes (``weight``, ``bias``,
    ``in_features``, ``out_features``, and any other attribute of ``base_layer``), as PEFT's wrappers do: model code
    such as T5's ``DenseActDense`` reads ``self.wo.weight``. ``merged``: ΔW is in the base weight (the forward is the
    base layer's); ``disabled``: the adapter is off (the forward is the base layer's). The handle sets both.

    Subclasses name their two trained tensors in ``SCALE_NAMES`` (the parameter names, as PEFT names them) and give
    :meth:`scale_shapes` and :meth:`spec_delta`, which is all the handle needs to save, merge and unmerge them."""

    SCALE_NAMES: tuple[str, str] = ("", "")

    def __init__(self, base_layer: nn.Module, key: str, dropout: float = 0.0):
        super().__init__()
        weight = base_layer.weight
        self.base_layer = base_layer
        self.key = key
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.stored_shape = (int(weight.shape[0]), int(weight.shape[1]))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self._base_type = type(base_layer)
        for p in base_layer.parameters():
            p.requires_grad_(False)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (stored orientation; merged weights once the handle merged)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def out_in(self) -> tuple[int, int]:
        """(out_features, in_features) of the base layer."""
        rows, cols = self.stored_shape
        return (cols, rows) if self.fan_in_fan_out else (rows, cols)

    @property
    def in_features(self) -> int:
        return self.out_in[1]

    @property
    def out_features(self) -> int:
        return self.out_in[0]

    def weight_outin(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def scales(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The two trained tensors, in ``SCALE_NAMES`` order."""
        return tuple(getattr(self, n) for n in self.SCALE_NAMES)

    def scale_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def spec_delta(self, first: torch.Tensor, second: torch.Tensor, bases: Bases) -> torch.Tensor:
        """ΔW of trained tensors ``first``, ``second`` (``SCALE_NAMES`` order) with this layer's shape, stored
        orientation, float32, on the bases' device."""
        raise NotImplementedError

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """ΔW of the current scales in the base weight's stored orientation, float32 (the format's reference)."""
        first, second = self.scales()
        return self.spec_delta(first, second, self.shared.on(first.device))

    def adapter_forward(self, x: torch.Tensor, xd: torch.Tensor) -> torch.Tensor:
        """y = base(x) + the adapter path on xd, in one memory-efficient autograd Function."""
        raise NotImplementedError

    def adapter_update(self, xd: torch.Tensor) -> torch.Tensor:
        """The adapter path alone on xd, float32 (for a base that must be called as a module)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if type(self.base_layer) is not self._base_type:
            # the base was wrapped after attach (FSDP1 wrapping the Linear on its own, as FSDP advises): its weight
            # exists only inside its own forward, so call it and add the adapter path
            y = self.base_layer(x)
            update = self.adapter_update(self.dropout(x))
            return (y.to(update.dtype) + update).to(y.dtype)
        return self.adapter_forward(x, self.dropout(x))


class RandloraLayer(WrappedLayer):
    """A frozen ``base_layer`` plus trainable ``randlora_lambda`` (r, n) and ``randlora_gamma`` (n, D), float32,
    initialised as PEFT does: λ = 0 (so ΔW = 0), γ = 1 / max(n, D)."""

    SCALE_NAMES = ("randlora_lambda", "randlora_gamma")

    def __init__(self, base_layer: nn.Module, key: str, shared: SharedBases, scaling: float, dropout: float = 0.0):
        super().__init__(base_layer, key, dropout)
        r = shared.rank
        shape = self.stored_shape
        self.spec = LayerSpec(key=key, shape=shape, fan_in_fan_out=self.fan_in_fan_out,
                              num_bases=-(-min(shape) // r), dtype="float32")
        self.shared, self.scaling = shared, float(scaling)
        n, D = self.spec.num_bases, self.spec.min_dim
        device = base_layer.weight.device
        self.randlora_lambda = nn.Parameter(torch.zeros(r, n, device=device))
        self.randlora_gamma = nn.Parameter(torch.full((n, D), 1.0 / max(n, D), device=device))

    def scale_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.shared.rank, self.spec.num_bases), (self.spec.num_bases, self.spec.min_dim)

    def layer_bases(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's A (r, D) and U_B (M, r·n) slices of the shared bases on ``device``."""
        return self.shared.on(device).for_layer(self.spec.min_dim, self.spec.max_dim, self.spec.num_bases)

    def adapter_forward(self, x: torch.Tensor, xd: torch.Tensor) -> torch.Tensor:
        A, U_B = self.layer_bases(x.device)
        return randlora_linear(x, xd, self.weight_outin(), self.bias, self.randlora_lambda, self.randlora_gamma, A,
                               U_B, self.scaling)

    def adapter_update(self, xd: torch.Tensor) -> torch.Tensor:
        A, U_B = self.layer_bases(xd.device)
        return randlora_update(xd, self.randlora_lambda, self.randlora_gamma, A, U_B, self.scaling,
                               (self.spec.out_features, self.spec.in_features))

    @torch.no_grad()
    def spec_delta(self, lam: torch.Tensor, gam: torch.Tensor, bases: Bases) -> torch.Tensor:
        """ΔW of scales ``lam`` (r, n), ``gam`` (n, D) with this layer's shape and scaling, stored orientation, fp32."""
        return reference_delta(self.spec, lam, gam, bases.A, bases.B, self.scaling)
