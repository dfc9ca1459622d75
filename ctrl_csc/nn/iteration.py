r"""The iterations of the unrolled convolutional Lasso: momentum, the fused step, its prox, λ_max.

Problem (docs/design.md, §3 "The CSC stage"), for a linear operator ``A`` (the dictionary ``D``
of a CSC stage, or the strided convolution ``B`` of an inverse-CSC decoder stage) and data ``u``::

    x* = argmin_x  ½‖u − A x‖² + λ‖x‖₁ + (μ/2)‖x‖²        (optionally subject to x ≥ 0)

Iterations from ``x₀ = 0`` with step ``η`` (``η = 1/L``, ``L = ‖AᵀA‖₂``)::

    ISTA:   x_{t+1} = prox(x_t − η Aᵀ(A x_t − u))
    FISTA:  y_t = x_t + β_t (x_t − x_{t−1}),  β_t = (τ_{t−1} − 1)/τ_t,
            τ_t = (1 + √(1 + 4τ_{t−1}²))/2,  τ₀ = 1,
            x_{t+1} = prox(y_t − η Aᵀ(A y_t − u))
    prox(v) = shrink(v/(1+ημ), ηλ/(1+ημ))

Both converge for ``η ≤ 1/L``; ISTA's objective is non-increasing for ``η < 2/L``.

Cost. ``Aᵀu`` is computed once, so ``T`` iterations take ``2T − 1`` convolutions:
``x₁ = prox(ηAᵀu)`` needs none besides ``Aᵀu`` and every later iteration one ``A`` and one
``Aᵀ``. With ``a = η/(1+ημ)`` and ``s = 1/(1+ημ)`` the iteration is evaluated in the fused form

    c = a(Aᵀu − λ·[x ≥ 0 constraint])    (one convolution with weight a·W and bias −aλ)
    x_{t+1} = shrink(s·y_t + c − a·AᵀA y_t, aλ)     (threshold already inside c when x ≥ 0)

so the step size and the non-negative threshold ride on the (small) convolution weight and bias and
each iteration adds three elementwise passes (plus one ``lerp`` for the FISTA momentum). At stride
1 the transposed convolution runs as a convolution with the flipped kernel
(:class:`~ctrl_csc.nn.strided_conv.StridedConv`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from .prox import shrink
from .strided_conv import StridedConv

__all__ = [
    "Callback",
    "Geometry",
    "apply_prox",
    "data_term",
    "fista_momentum",
    "lambda_at_density",
    "lambda_max",
    "lasso_objective",
    "proximal_gradient_step",
    "run_iterations",
    "segment",
]


Callback = Callable[[int, Tensor], None]


def fista_momentum(n_iter: int) -> list[float]:
    """FISTA extrapolation weights ``[β_1, …, β_{n_iter−1}]`` with ``β_t = (τ_{t−1} − 1)/τ_t``.

    ``τ₀ = 1`` and ``τ_t = (1 + √(1 + 4τ_{t−1}²))/2``, so ``β_1 = 0``: the second step is taken
    at ``x₁`` itself and FISTA differs from ISTA from the third iteration on.
    """
    betas = []
    tau_prev = 1.0
    for _ in range(1, n_iter):
        tau = (1.0 + math.sqrt(1.0 + 4.0 * tau_prev * tau_prev)) / 2.0
        betas.append((tau_prev - 1.0) / tau)
        tau_prev = tau
    return betas


def proximal_gradient_step(
    y: Tensor,
    c: Tensor,
    h: Tensor,
    s: Tensor | float | None,
    theta: Tensor | float,
    nonnegative: bool,
    traced: bool = False,
) -> Tensor:
    """One fused proximal-gradient step ``x⁺ = prox(y − η(AᵀA y − Aᵀu))``.

    With ``a = η/(1+ημ)`` and ``s = 1/(1+ημ)``: ``x⁺ = shrink(s·y + c − h, aλ)``, where
    ``c = a·Aᵀu`` (signed) or ``a·(Aᵀu − λ)`` (non-negative, whose threshold is then already
    applied, leaving ``max(·, 0)``) and ``h = a·AᵀA y``.

    Args:
        y: extrapolated point ``(N, C, h, w)``.
        c: ``(N, C, h, w)``, see above; not modified.
        h: ``(N, C, h, w)``, see above; consumed (may be overwritten).
        s: ``1/(1+ημ)``, or ``None`` when ``μ = 0``.
        theta: ``aλ`` (only used when not ``nonnegative``).
        nonnegative: whether ``x ≥ 0`` is imposed.
        traced: running inside ``torch.compile`` (see :func:`apply_prox`).

    Returns:
        ``x⁺`` of the shape of ``y``.
    """
    if s is None:
        v = torch.add(c, y)
    elif isinstance(s, Tensor):
        v = torch.addcmul(c, y, s)
    else:
        v = torch.add(c, y, alpha=s)
    return apply_prox(v.sub_(h), theta, nonnegative, traced)


def _mask_free_relu(v: Tensor) -> Tensor:
    """``max(v, 0)`` as ``(v + |v|)/2``: the same values exactly, and a backward that reads ``v``
    (a float) where ``relu``'s reads a boolean mask. Used inside ``torch.compile``: inductor's
    CPU code stores boolean masks ~15x slower than eager does (torch 2.x), which made the compiled
    training forward slower than the eager one. Its gradient at ``v = 0`` exactly is ½, not 0."""
    return (v + v.abs()) * 0.5


def apply_prox(v: Tensor, theta: Tensor | float | None, nonnegative: bool, traced: bool) -> Tensor:
    """The prox of an iteration, ``max(v, 0)`` or ``shrink(v, θ)``; ``v`` is consumed. With
    ``traced`` (inside ``torch.compile``), the mask-free forms of :func:`_mask_free_relu`."""
    if not traced:
        return v.relu_() if nonnegative else shrink(v, theta)  # type: ignore[arg-type]
    if nonnegative:
        return _mask_free_relu(v)
    return torch.sign(v) * _mask_free_relu(v.abs() - theta)


def _threshold_bias(theta: Tensor | float, channels: int, like: Tensor) -> Tensor:
    """A conv bias of ``−θ`` for each of ``channels`` output channels."""
    if isinstance(theta, Tensor):
        return theta.neg().reshape(1).expand(channels)
    return torch.full((channels,), -float(theta), dtype=like.dtype, device=like.device)


def _ranked_correlation(c: Tensor, nonnegative: bool, density: float | None = None) -> Tensor:
    """Per sample, the largest entry of ``c`` (clamped at 0) when ``nonnegative``, else of
    ``|c|``; with ``density``, the ``(k+1)``-th largest instead, ``k = min(⌈density·M⌉, M − 1)``
    for ``M`` entries, so that a threshold there keeps the ``k`` largest (ties aside).
    ``(N, …) → (N, 1, …, 1)``, differentiable: the gradient reaches that one entry."""
    flat = c.flatten(1) if nonnegative else c.flatten(1).abs()
    if density is None:
        # gather at the argmax: a cheaper backward than amax's, which spreads the gradient over
        # ties through full-size masks
        m = flat.gather(1, flat.argmax(1, keepdim=True)).squeeze(1)
    else:
        size = flat.shape[1]
        m = flat.kthvalue(size - min(math.ceil(density * size), size - 1), dim=1).values
    if nonnegative:
        m = m.clamp_min(0.0)
    return m.reshape(-1, *([1] * (c.dim() - 1)))


def lambda_max(u: Tensor, operator: StridedConv, nonnegative: bool = False) -> Tensor:
    """Per sample, the smallest ``λ`` for which the Lasso solution is ``x* = 0``.

    ``x = 0`` is optimal iff ``0 ∈ −Aᵀu + λ∂‖0‖₁`` (plus the normal cone of ``x ≥ 0``), i.e.
    ``λ ≥ ‖Aᵀu‖_∞`` (signed) or ``λ ≥ max(max_j (Aᵀu)_j, 0)`` (non-negative); ``μ`` does not
    change it. Differentiable in ``u`` and the operator (through the maximising entry).

    Args:
        u: data ``(N, C_u, H_u, W_u)``; operator: ``A``.

    Returns:
        ``(N,)``.
    """
    return _ranked_correlation(operator.adjoint(u), nonnegative).flatten()


def lambda_at_density(
    u: Tensor, operator: StridedConv, density: float, nonnegative: bool = False
) -> Tensor:
    """Per sample, the ``λ`` at which the first ISTA step from zero, ``prox(ηAᵀu)``, keeps the
    fraction ``density`` of its entries: the ``(k+1)``-th largest of ``Aᵀu`` (of ``|Aᵀu|`` when
    signed), ``k = ⌈density·M⌉``. Differentiable through that entry.

    Returns:
        ``(N,)``.
    """
    return _ranked_correlation(operator.adjoint(u), nonnegative, density).flatten()


def run_iterations(
    z: Tensor,
    z_prev: Tensor,
    c: Tensor,
    weight: Tensor,
    weight_scaled: Tensor,
    s: Tensor | float | None,
    theta: Tensor | float | None,
    *,
    operator: StridedConv,
    betas: list[float],
    first: int,
    last: int,
    nonnegative: bool,
    callback: Callback | None,
    traced: bool = False,
) -> tuple[Tensor, Tensor]:
    """Iterations ``t = first .. last − 1`` (``x_t → x_{t+1}``) from
    ``(x_t, x_{t−1}) = (z, z_prev)``.

    ``weight`` is the operator's weight and ``weight_scaled`` the same times ``a`` (both passed
    explicitly so a checkpointed segment can be replayed with fresh leaves). Returns
    ``(x_last, x_{last−1})``.
    """
    op = replace(operator, weight=weight)
    scaled = replace(operator, weight=weight_scaled)
    for t in range(first, last):
        beta = betas[t - 1]
        y = z if beta == 0.0 else torch.lerp(z, z_prev, -beta)  # z + β(z − z_prev)
        h = scaled.adjoint(op.apply(y))
        z_prev, z = z, proximal_gradient_step(y, c, h, s, theta, nonnegative, traced)
        if callback is not None:
            callback(t + 1, z)
    return z, z_prev


def data_term(
    u: Tensor,
    operator: StridedConv,
    a: Tensor | float,
    lmbda: Tensor | float,
    nonnegative: bool,
    lmbda_relative: bool,
    density: float | None = None,
) -> tuple[Tensor, Tensor | float, StridedConv]:
    """``(c, θ, a·A)``: ``c = a·Aᵀu`` (minus ``θ = aλ`` when non-negative, fused as the conv's
    bias), ``θ`` per sample ``(N, 1, 1, 1)`` when ``lmbda_relative`` or ``density`` (which
    replaces ``lmbda``: :func:`lambda_at_density`)."""
    scaled = operator.scaled(a)
    if lmbda_relative or density is not None:
        c = scaled.adjoint(u)  # a Aᵀu, whose per-sample max is a·λ_max (a > 0)
        theta = _ranked_correlation(c, nonnegative, density)  # (N, 1, 1, 1): a λ_n, or a λ_max
        if density is None:
            theta = lmbda * theta  # a λ_n = a·lmbda·λ_max
        if nonnegative:
            c = c - theta  # a (Aᵀu − λ_n)
    elif nonnegative:
        theta = a * lmbda
        bias = _threshold_bias(theta, operator.unknown_channels, scaled.weight)
        c = scaled.adjoint(u, bias)  # a (Aᵀu − λ)
    else:
        theta = a * lmbda
        c = scaled.adjoint(u)  # a Aᵀu
    return c, theta, scaled


Geometry = tuple[int, int, tuple[int, int], bool]  # stride, padding, output_padding, transposed


def segment(
    z: Tensor | None,
    z_prev: Tensor | None,
    u: Tensor,
    weight: Tensor,
    a: Tensor | float,
    lmbda: Tensor | float,
    s: Tensor | float | None,
    *,
    geometry: Geometry,
    betas: tuple[float, ...],
    first: int,
    last: int,
    nonnegative: bool,
    lmbda_relative: bool,
    density: float | None = None,
    callback: Callback | None = None,
    traced: bool = False,
) -> tuple[Tensor, Tensor]:
    """Iterations ``first .. last − 1`` from ``(x_t, x_{t−1}) = (z, z_prev)``, computing ``c``
    from ``u`` (``z = None``: start with ``x₁ = prox(c)``). A function of tensors and constants
    only, so a checkpoint can replay it from fresh leaves and ``torch.compile`` can trace it
    (``traced=True``, see :func:`apply_prox`)."""
    op = StridedConv(weight, *geometry)
    c, theta, scaled = data_term(u, op, a, lmbda, nonnegative, lmbda_relative, density)
    if z is None:
        if traced:
            z = apply_prox(c, theta, nonnegative, traced)  # (traced: c is not consumed)
        else:
            z = torch.relu(c) if nonnegative else shrink(c, theta)
        z_prev = z
        if callback is not None:
            callback(1, z)
    return run_iterations(
        z, z_prev, c, weight, scaled.weight, s, None if nonnegative else theta, operator=op,
        betas=list(betas), first=first, last=last, nonnegative=nonnegative, callback=callback,
        traced=traced,
    )  # fmt: skip


def lasso_objective(
    u: Tensor,
    x: Tensor,
    operator: StridedConv,
    lmbda: Tensor | float,
    mu: float = 0.0,
) -> Tensor:
    """Per-sample objective ``½‖u − A x‖² + λ‖x‖₁ + μ/2‖x‖²``.

    Args:
        u: ``(N, …)`` data; x: ``(N, …)`` code; operator: ``A``.

    Returns:
        ``(N,)``.
    """
    r = u - operator.apply(x)
    dims = tuple(range(1, x.dim()))
    obj = 0.5 * r.square().sum(dims) + lmbda * x.abs().sum(dims)
    if mu:
        obj = obj + 0.5 * mu * x.square().sum(dims)
    return obj
