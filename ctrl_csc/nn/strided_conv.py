"""The linear operator of a CSC stage: a strided convolution and its exact adjoint."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.nn.functional as F
from torch import Tensor

__all__ = ["StridedConv"]


@dataclass(frozen=True)
class StridedConv:
    """A strided 2-D convolution and its exact adjoint, as one linear operator ``A``.

    ``transposed=True`` (the CSC dictionary ``D``): ``A = conv_transpose2d`` maps a code
    ``(N, weight.shape[0], h, w)`` to a signal ``(N, weight.shape[1], H, W)`` and
    ``Aᵀ = conv2d``. ``transposed=False`` (the inverse-CSC operator ``B``): ``A = conv2d`` maps a
    fine signal ``(N, weight.shape[1], H, W)`` to a coarse ``(N, weight.shape[0], h, w)`` and
    ``Aᵀ = conv_transpose2d``. ``output_padding`` (each ``< stride``) makes the transposed
    convolution return exactly ``(H, W)``, so ``<A x, y> = <x, Aᵀ y>``.

    Attributes:
        weight: ``(C0, C1, k, k)`` with ``C0`` the coarse (code) channels.
        stride, padding: as for ``conv2d``.
        output_padding: ``(oh, ow)``, ``0 ≤ oh, ow < stride``.
        transposed: which of the two convolutions is ``A``.
    """

    weight: Tensor
    stride: int
    padding: int
    output_padding: tuple[int, int]
    transposed: bool

    @property
    def unknown_channels(self) -> int:
        """Channels of the operator's input (the unknown of the Lasso)."""
        return self.weight.shape[0] if self.transposed else self.weight.shape[1]

    def _conv(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, self.weight, bias, self.stride, self.padding)

    def _conv_t(self, x: Tensor, bias: Tensor | None) -> Tensor:
        k = self.weight.shape[-1]
        if self.stride == 1 and self.padding < k:
            # at stride 1 the transposed convolution is the convolution with the kernel's
            # channels swapped and rotated by 180° and padding k − 1 − p: the same map, and a
            # faster kernel on CPU (bench_csc: 12.0 instead of 14–16 conv-equivalents at T = 5)
            flipped = self.weight.transpose(0, 1).flip(2, 3)  # a copy of the (small) kernel
            return F.conv2d(x, flipped, bias, 1, k - 1 - self.padding)
        return F.conv_transpose2d(
            x, self.weight, bias, self.stride, self.padding, self.output_padding
        )

    def apply(self, x: Tensor) -> Tensor:
        """``A x``."""
        return self._conv_t(x, None) if self.transposed else self._conv(x, None)

    def adjoint(self, u: Tensor, bias: Tensor | None = None) -> Tensor:
        """``Aᵀ u`` (plus a per-channel ``bias`` of length ``unknown_channels``, fused)."""
        return self._conv(u, bias) if self.transposed else self._conv_t(u, bias)

    def gram(self, x: Tensor) -> Tensor:
        """``AᵀA x``."""
        return self.adjoint(self.apply(x))

    def scaled(self, factor: Tensor | float) -> StridedConv:
        """The operator ``factor · A`` (scales the small weight, not the activations)."""
        return replace(self, weight=self.weight * factor)

    def detached(self) -> StridedConv:
        """The same operator with its weight cut from the autograd graph."""
        return replace(self, weight=self.weight.detach())
