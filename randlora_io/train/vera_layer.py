"""The module that wraps a frozen Linear / Conv1D with trainable VeRA vectors, and the shared VeRA bases it slices."""

from __future__ import annotations

import torch
from torch import nn

from ..format.basis import Bases
from ..format.spec import GeneratorSpec
from ..format.vera import VeraLayer, vera_bases, vera_delta
from .layer import SharedBases, WrappedLayer
from .vera_function import vera_linear, vera_update


class SharedVeraBases(SharedBases):
    """The model-wide VeRA bases A (r, max_in) and B (max_out, r), float32 (SPEC §2.1): drawn once, one copy per
    device. ``min_dim`` / ``max_dim`` hold max_out / max_in here (the handle records them as such)."""

    def __init__(self, generator: GeneratorSpec, rank: int, max_out: int, max_in: int, bases: Bases | None = None):
        super().__init__(generator, rank, max_out, max_in, bases)
        self.max_out, self.max_in = max_out, max_in

    def _draw(self) -> Bases:
        return vera_bases(self.generator, self.rank, self.max_out, self.max_in)


class VeraTrainLayer(WrappedLayer):
    """A frozen ``base_layer`` plus trainable ``vera_lambda_b`` (out,) and ``vera_lambda_d`` (r,), float32,
    initialised as PEFT 0.21.2's ``VeraLayer``: λ_b = 0 (so ΔW = 0), λ_d = ``d_initial``. The layer uses the prefix
    slices A[:, :in] and B[:out, :] of the shared bases; ΔW = diag(λ_b) B[:out] diag(λ_d) A[:, :in] (no scaling),
    stored transposed for a Conv1D."""

    SCALE_NAMES = ("vera_lambda_b", "vera_lambda_d")

    def __init__(self, base_layer: nn.Module, key: str, shared: SharedVeraBases, d_initial: float = 0.1,
                 dropout: float = 0.0):
        super().__init__(base_layer, key, dropout)
        self.shared = shared
        self.vera_spec = VeraLayer(shape=self.stored_shape, fan_in_fan_out=self.fan_in_fan_out)
        device = base_layer.weight.device
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))
        self.vera_lambda_d = nn.Parameter(torch.full((shared.rank,), float(d_initial), device=device))

    def scale_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.out_features,), (self.shared.rank,)

    def layer_bases(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's A[:, :in] (r, in) and B[:out, :] (out, r) on ``device``."""
        bases = self.shared.on(device)
        return bases.A[:, :self.in_features], bases.B[:self.out_features, :]

    def adapter_forward(self, x: torch.Tensor, xd: torch.Tensor) -> torch.Tensor:
        A_s, B_s = self.layer_bases(x.device)
        return vera_linear(x, xd, self.weight_outin(), self.bias, self.vera_lambda_b, self.vera_lambda_d, A_s, B_s)

    def adapter_update(self, xd: torch.Tensor) -> torch.Tensor:
        A_s, B_s = self.layer_bases(xd.device)
        return vera_update(xd, self.vera_lambda_b, self.vera_lambda_d, A_s, B_s, self.out_in)

    @torch.no_grad()
    def spec_delta(self, lambda_b: torch.Tensor, lambda_d: torch.Tensor, bases: Bases) -> torch.Tensor:
        """ΔW of vectors λ_b (out,), λ_d (r,), stored orientation, float32 (the format's :func:`vera_delta`)."""
        return vera_delta(self.vera_spec, lambda_b, lambda_d, bases.A, bases.B, bases.A.device)
