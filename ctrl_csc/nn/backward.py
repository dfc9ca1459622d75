"""The memory-saving backwards of the unrolled solver: checkpointed segments, implicit gradient.

``"checkpoint"`` (:func:`checkpointed`) runs the iterations in ``⌈√(T−1)⌉``-long segments without
a graph, saves only each segment's input ``(x, x_prev)`` and recomputes one segment at a time in
backward: the same gradients up to the summation order of the replayed operations (float64: 1e-12
relative), ``O(√T)`` saved codes. ``"implicit"`` (:func:`implicit`) differentiates the *converged*
Lasso solution instead of the iterations: the first ``T − 1`` iterations run without a graph, the
last one is recorded, and its incoming gradient ``g`` is replaced by
``w = 1_S·(a(AᵀA + μ)_SS)⁻¹ g_S`` on the support ``S`` of ``x_T`` (conjugate gradients,
matrix-free), which is the implicit-function-theorem gradient of the fixed point
``x* = prox(x* − η∇f(x*))`` with respect to ``u``, the operator and ``λ`` (also
``λ_n = ρ·λ_max(u_n)`` when relative). It is exact only at a converged ``x_T`` with strict
complementarity, and it does not differentiate the step size (the solution does not depend on
``η``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import Tensor

from .compiled import segment_function
from .iteration import data_term, run_iterations
from .prox import shrink
from .strided_conv import StridedConv

__all__ = ["checkpointed", "implicit"]


def checkpointed(
    u: Tensor,
    a: Tensor | float,
    lmbda: Tensor | float,
    s: Tensor | float | None,
    *,
    n_iter: int,
    **common: object,
) -> Tensor:
    """``x_T`` in segments of ``⌈√(T−1)⌉`` iterations (``T ≥ 2``); each saves only its input
    ``(x_t, x_{t−1})`` and ``u`` and is replayed (``Aᵀu`` included) in backward. ``common``: the
    constants of :func:`~ctrl_csc.nn.compiled.segment_function` but ``first``/``last``.

    The segments run under ``torch.utils.checkpoint`` (non-reentrant). It replaced a hand-written
    replay (an ``autograd.Function`` re-running the segment in backward) with the same saved bytes
    and gradients and a lower peak: 49 / 69 MiB allocated at most during forward + backward of a
    64→64 stage, batch 16 at 32², T = 5 / 10, against 61 / 81 MiB (``bench/bench_memory.py``,
    ``peak_alloc_mib``), because it frees each recomputed tensor as soon as backward has used it.
    """
    operator, betas = common["operator"], common["betas"]
    length = math.ceil(math.sqrt(n_iter - 1))
    z = z_prev = None
    for first in range(1, n_iter, length):
        last = min(first + length, n_iter)
        fn = segment_function(first=first, last=last, **common)  # type: ignore[arg-type]
        # ISTA never reads x_{t−1}: pass x_t twice so nothing more is saved
        prev = z_prev if any(betas[first - 1 : last - 1]) else z
        z, z_prev = torch.utils.checkpoint.checkpoint(
            fn, z, prev, u, operator.weight, a, lmbda, s, use_reentrant=False
        )  # type: ignore[union-attr]
    return z  # type: ignore[return-value]


def _batched_cg(apply: Callable[[Tensor], Tensor], b: Tensor, max_iter: int, tol: float) -> Tensor:
    """Solve ``apply(x) = b`` per sample (dim 0) by conjugate gradients from ``x = 0``
    (``apply`` symmetric positive semi-definite, acting on each sample separately); stops when
    every sample's residual is below ``tol·‖b‖`` or after ``max_iter`` steps."""
    dims = tuple(range(1, b.dim()))
    shape = (-1, *([1] * (b.dim() - 1)))
    tiny = torch.finfo(b.dtype).tiny
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r.square().sum(dims)
    stop = (tol * tol) * rs
    for _ in range(max_iter):
        if bool((rs <= stop).all()):
            break
        ap = apply(p)
        alpha = torch.where(rs > stop, rs / (p * ap).sum(dims).clamp_min(tiny), 0.0)
        x.add_(alpha.reshape(shape) * p)
        r.sub_(alpha.reshape(shape) * ap)
        rs_new = r.square().sum(dims)
        p = r + (rs_new / rs.clamp_min(tiny)).reshape(shape) * p
        rs = rs_new
    return x


def _implicit_hook(
    z: Tensor,
    operator: StridedConv,
    a: Tensor | float,
    mu: float,
    max_iter: int,
    tol: float,
) -> Callable[[Tensor], Tensor]:
    """The hook turning the gradient ``g`` at ``x_T`` into ``w = 1_S (a H_SS)⁻¹ g_S``,
    ``H = AᵀA + μI``, ``S`` the support of ``x_T`` (see the module docstring)."""
    support = (z != 0).to(z.dtype)
    op = operator.detached()
    scaled = op.scaled(a.detach() if isinstance(a, Tensor) else a)
    a_mu = (a.detach() if isinstance(a, Tensor) else a) * mu

    def system(v: Tensor) -> Tensor:  # a·P_S (AᵀA + μ) P_S v
        out = scaled.adjoint(op.apply(v))
        if mu:
            out = out.add_(v, alpha=float(a_mu)) if not isinstance(a_mu, Tensor) else out + a_mu * v
        return out.mul_(support)

    def hook(grad: Tensor) -> Tensor:
        with torch.no_grad(), torch.autocast(device_type=grad.device.type, enabled=False):
            return _batched_cg(system, grad * support, max_iter, tol)

    return hook


def implicit(
    u: Tensor,
    operator: StridedConv,
    a: Tensor | float,
    lmbda: Tensor | float,
    s: Tensor | float | None,
    *,
    mu: float,
    n_iter: int,
    betas: list[float],
    nonnegative: bool,
    lmbda_relative: bool,
    density: float | None,
    max_iter: int,
    tol: float,
) -> Tensor:
    """``x_T`` with ``T − 1`` iterations run without a graph and the last one recorded, its
    incoming gradient replaced by the implicit one (module docstring)."""
    c, theta, scaled = data_term(u, operator, a, lmbda, nonnegative, lmbda_relative, density)
    theta_step = None if nonnegative else theta
    if n_iter == 1:
        z = torch.relu(c) if nonnegative else shrink(c, theta)
    else:
        with torch.no_grad():
            c0 = c.detach()
            th0 = theta_step.detach() if isinstance(theta_step, Tensor) else theta_step
            z0 = torch.relu(c0) if nonnegative else shrink(c0, th0)
            z, z_prev = run_iterations(
                z0, z0, c0, operator.weight.detach(), scaled.weight.detach(),
                s.detach() if isinstance(s, Tensor) else s, th0, operator=operator, betas=betas,
                first=1, last=n_iter - 1, nonnegative=nonnegative, callback=None,
            )  # fmt: skip
            beta = betas[n_iter - 2]
            y = z if beta == 0.0 else torch.lerp(z, z_prev, -beta)
        # x_T = prox(s·y + c − a AᵀA y) with y held constant
        z, _ = run_iterations(
            y, y, c, operator.weight, scaled.weight, s, theta_step, operator=operator,
            betas=[0.0], first=1, last=2, nonnegative=nonnegative, callback=None,
        )  # fmt: skip
    if z.requires_grad:
        z.register_hook(_implicit_hook(z.detach(), operator, a, mu, max_iter, tol))
    return z
