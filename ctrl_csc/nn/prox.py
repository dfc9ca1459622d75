"""Proximal operators of the (elastic-net) ℓ1 penalty.

Both operators act elementwise, so they accept tensors of any shape; thresholds may be Python
numbers or tensors that broadcast against the input (e.g. a 0-dim learnable threshold), and the
result is differentiable with respect to the input and to tensor thresholds.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["shrink", "prox_elastic_net"]


def shrink(v: Tensor, theta: Tensor | float, nonnegative: bool = False) -> Tensor:
    """Soft-thresholding, the proximal operator of ``θ‖·‖₁`` (plus the indicator of ``z ≥ 0``).

    ``shrink(v, θ) = sign(v) · max(|v| − θ, 0)``, or ``max(v − θ, 0)`` when ``nonnegative``; it is
    ``argmin_z ½(z − v)² + θ|z|`` (subject to ``z ≥ 0``) for each entry.

    Args:
        v: any shape.
        theta: threshold ``θ ≥ 0``; a number or a tensor broadcastable to ``v``.
        nonnegative: project onto ``z ≥ 0`` as well.

    Returns:
        Tensor of the shape of ``v``.
    """
    if not isinstance(theta, Tensor) and theta < 0:
        raise ValueError(f"shrink: the threshold theta must be >= 0, got {theta}")
    if nonnegative:
        return torch.relu(v - theta)
    if not isinstance(theta, Tensor):
        return torch.nn.functional.softshrink(v, float(theta))
    # sign(v)·relu(|v| − θ), differentiable in v and θ; its backward is ~9x cheaper on CPU
    # than that of v − clamp(v, −θ, θ) with tensor bounds (bench/bench_csc.py).
    return torch.sign(v) * torch.relu(v.abs() - theta)


def prox_elastic_net(
    v: Tensor,
    step: Tensor | float,
    lmbda: Tensor | float,
    mu: Tensor | float = 0.0,
    nonnegative: bool = False,
) -> Tensor:
    """Proximal operator of ``η(λ‖z‖₁ + μ/2 ‖z‖²)`` (optionally with ``z ≥ 0``).

    ``prox(v) = argmin_z ½‖z − v‖² + ηλ‖z‖₁ + ημ/2 ‖z‖² = shrink(v/(1+ημ), ηλ/(1+ημ))``.

    Args:
        v: any shape.
        step: step size ``η > 0`` (number or broadcastable tensor).
        lmbda: ℓ1 weight ``λ ≥ 0``.
        mu: ℓ2 weight ``μ ≥ 0``.
        nonnegative: add the constraint ``z ≥ 0``.

    Returns:
        Tensor of the shape of ``v``.
    """
    scale = 1.0 / (1.0 + step * mu)
    return shrink(v * scale, step * lmbda * scale, nonnegative)
