r"""The unrolled convolutional Lasso solver shared by every sparse-coding stage.

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
1 the transposed convolution runs as a convolution with the flipped kernel (:class:`StridedConv`).

The Lipschitz constant comes from :func:`power_iteration` on a persistent, warm-started vector kept
by :class:`UnrolledLasso`, and is never backpropagated through.

Backward (``backward=``). ``"unrolled"`` backpropagates through every iteration, so the tensors
saved for backward grow linearly with ``T``. ``"checkpoint"`` runs the iterations in
``⌈√(T−1)⌉``-long segments without a graph, saves only each segment's input ``(x, x_prev)`` and
recomputes one segment at a time in backward: the same gradients up to the summation order of
the replayed operations (float64: 1e-12 relative), ``O(√T)`` saved codes. ``"implicit"``
differentiates the *converged* Lasso solution instead of the iterations: the first ``T − 1``
iterations run without a graph, the last one is recorded, and its incoming gradient ``g`` is
replaced by ``w = 1_S·(a(AᵀA + μ)_SS)⁻¹ g_S`` on the support ``S`` of ``x_T`` (conjugate
gradients, matrix-free), which is the implicit-function-theorem gradient of the fixed point
``x* = prox(x* − η∇f(x*))`` with respect to ``u``, the operator and ``λ`` (also
``λ_n = ρ·λ_max(u_n)`` when relative). It is exact only at a converged ``x_T`` with strict
complementarity, and it does not differentiate the step size (the solution does not depend on
``η``), so ``learn_step`` is refused with it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .prox import shrink
from .stage import ALGORITHMS, BACKWARDS, check_options, check_relations

__all__ = [
    "ALGORITHMS",
    "BACKWARDS",
    "StridedConv",
    "power_iteration",
    "fista_momentum",
    "proximal_gradient_step",
    "unrolled_lasso",
    "lasso_objective",
    "lambda_max",
    "UnrolledLasso",
]


Callback = Callable[[int, Tensor], None]


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


@torch.no_grad()
def power_iteration(
    op: Callable[[Tensor], Tensor],
    adj: Callable[[Tensor], Tensor],
    v0: Tensor,
    n_iter: int,
) -> tuple[Tensor, Tensor]:
    """Estimate ``L = ‖AᵀA‖₂`` (the largest eigenvalue) by power iteration on ``AᵀA``.

    Runs ``v ← AᵀA v / ‖AᵀA v‖`` ``n_iter`` times from ``v0`` and returns ``‖AᵀA v‖`` for the
    last unit vector ``v``: a lower bound of ``L`` that is at least the Rayleigh quotient and
    increases towards ``L`` (a warm start from the previous vector converges in a few steps when
    ``A`` changes slowly). Not differentiable (runs under ``torch.no_grad``).

    Args:
        op: ``x ↦ A x``.
        adj: ``u ↦ Aᵀ u``.
        v0: start vector, any shape ``op`` accepts (e.g. ``(1, C, h, w)``); need not be unit.
        n_iter: number of applications of ``AᵀA`` (≥ 1).

    Returns:
        ``(L, v)``: a 0-dim tensor and the new unit vector of the shape of ``v0``.
    """
    if n_iter < 1:
        raise ValueError(f"power_iteration: n_iter must be >= 1, got {n_iter}")
    tiny = torch.finfo(v0.dtype).tiny
    v = v0 / torch.linalg.vector_norm(v0).clamp_min(tiny)
    lip = v.new_zeros(())
    for _ in range(n_iter):
        w = adj(op(v))
        lip = torch.linalg.vector_norm(w)
        v = w / lip.clamp_min(tiny)
    return lip, v


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
        traced: running inside ``torch.compile`` (see :func:`_prox`).

    Returns:
        ``x⁺`` of the shape of ``y``.
    """
    if s is None:
        v = torch.add(c, y)
    elif isinstance(s, Tensor):
        v = torch.addcmul(c, y, s)
    else:
        v = torch.add(c, y, alpha=s)
    return _prox(v.sub_(h), theta, nonnegative, traced)


def _mask_free_relu(v: Tensor) -> Tensor:
    """``max(v, 0)`` as ``(v + |v|)/2``: the same values exactly, and a backward that reads ``v``
    (a float) where ``relu``'s reads a boolean mask. Used inside ``torch.compile``: inductor's
    CPU code stores boolean masks ~15x slower than eager does (torch 2.x), which made the compiled
    training forward slower than the eager one. Its gradient at ``v = 0`` exactly is ½, not 0."""
    return (v + v.abs()) * 0.5


def _prox(v: Tensor, theta: Tensor | float | None, nonnegative: bool, traced: bool) -> Tensor:
    """The prox of an iteration, ``max(v, 0)`` or ``shrink(v, θ)``; ``v`` is consumed. With
    ``traced`` (inside ``torch.compile``), the mask-free forms of :func:`_mask_free_relu`."""
    if not traced:
        return v.relu_() if nonnegative else shrink(v, theta)  # type: ignore[arg-type]
    if nonnegative:
        return _mask_free_relu(v)
    return torch.sign(v) * _mask_free_relu(v.abs() - theta)


_COMPILED: dict[object, Callable[..., object] | None] = {}


def compile_available() -> bool:
    """Whether ``torch.compile`` can build a kernel here (it needs a C++ compiler on CPU);
    tried once per process on a tiny function."""
    if "ok" not in _COMPILED:
        try:
            fn = torch.compile(lambda x: torch.relu(x - 1.0), fullgraph=True)
            fn(torch.zeros(4))
            _COMPILED["ok"] = fn
        except Exception:  # noqa: BLE001 - any failure means: stay eager
            _COMPILED["ok"] = None  # type: ignore[assignment]
    return _COMPILED["ok"] is not None


def _threshold_bias(theta: Tensor | float, channels: int, like: Tensor) -> Tensor:
    """A conv bias of ``−θ`` for each of ``channels`` output channels."""
    if isinstance(theta, Tensor):
        return theta.neg().reshape(1).expand(channels)
    return torch.full((channels,), -float(theta), dtype=like.dtype, device=like.device)


def _max_correlation(c: Tensor, nonnegative: bool) -> Tensor:
    """Per sample, ``max_j c_j`` (clamped at 0) when ``nonnegative``, else ``max_j |c_j|``:
    ``(N, …) → (N, 1, …, 1)`` (differentiable: the gradient reaches the maximising entry)."""
    flat = c.flatten(1) if nonnegative else c.flatten(1).abs()
    # gather at the argmax: the gradient goes to one maximising entry (a cheaper backward than
    # amax's, which spreads it over ties through full-size masks)
    m = flat.gather(1, flat.argmax(1, keepdim=True)).squeeze(1)
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
    return _max_correlation(operator.adjoint(u), nonnegative).flatten()


def _run_iterations(
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


def _data_term(
    u: Tensor,
    operator: StridedConv,
    a: Tensor | float,
    lmbda: Tensor | float,
    nonnegative: bool,
    lmbda_relative: bool,
) -> tuple[Tensor, Tensor | float, StridedConv]:
    """``(c, θ, a·A)``: ``c = a·Aᵀu`` (minus ``θ = aλ`` when non-negative, fused as the conv's
    bias), ``θ`` per sample ``(N, 1, 1, 1)`` when ``lmbda_relative``."""
    scaled = operator.scaled(a)
    if lmbda_relative:
        c = scaled.adjoint(u)  # a Aᵀu, whose per-sample max is a·λ_max (a > 0)
        theta = lmbda * _max_correlation(c, nonnegative)  # a λ_n, shape (N, 1, 1, 1)
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


def _segment(
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
    callback: Callback | None = None,
    traced: bool = False,
) -> tuple[Tensor, Tensor]:
    """Iterations ``first .. last − 1`` from ``(x_t, x_{t−1}) = (z, z_prev)``, computing ``c``
    from ``u`` (``z = None``: start with ``x₁ = prox(c)``). A function of tensors and constants
    only, so a checkpoint can replay it from fresh leaves and ``torch.compile`` can trace it
    (``traced=True``, see :func:`_prox`)."""
    op = StridedConv(weight, *geometry)
    c, theta, scaled = _data_term(u, op, a, lmbda, nonnegative, lmbda_relative)
    if z is None:
        if traced:
            z = _prox(c, theta, nonnegative, traced)  # (traced: c is not consumed)
        else:
            z = torch.relu(c) if nonnegative else shrink(c, theta)
        z_prev = z
        if callback is not None:
            callback(1, z)
    return _run_iterations(
        z, z_prev, c, weight, scaled.weight, s, None if nonnegative else theta, operator=op,
        betas=list(betas), first=first, last=last, nonnegative=nonnegative, callback=callback,
        traced=traced,
    )  # fmt: skip


def _segment_function(
    operator: StridedConv,
    betas: list[float],
    first: int,
    last: int,
    nonnegative: bool,
    lmbda_relative: bool,
    fused: bool,
    callback: Callback | None,
) -> Callable[..., tuple[Tensor, Tensor]]:
    """:func:`_segment` with its constants bound; with ``fused``, ``torch.compile``-d (once per
    process and set of constants), which fuses the elementwise work between the convolutions
    (prox, step, momentum) and lets inductor pick the convolutions' memory layout."""
    constants = dict(
        geometry=(operator.stride, operator.padding, operator.output_padding, operator.transposed),
        betas=tuple(betas), first=first, last=last, nonnegative=nonnegative,
        lmbda_relative=lmbda_relative,
    )  # fmt: skip
    if not fused or callback is not None:
        return partial(_segment, callback=callback, **constants)
    key = tuple(sorted(constants.items()))
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = torch.compile(
            partial(_segment, traced=True, **constants), fullgraph=True
        )
    return fn  # type: ignore[return-value]


class _Replay(torch.autograd.Function):
    """``fn(*args)`` run without a graph; its tensor arguments are saved (through
    ``ctx.save_for_backward``, so ``saved_tensors_hooks`` see them) and ``fn`` is replayed with
    a graph in backward to get the gradients. The same operations on the same values: the
    gradients equal those of running ``fn`` under autograd directly."""

    @staticmethod
    def forward(ctx, fn, *args):  # type: ignore[override]
        ctx.fn = fn
        ctx.positions = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        ctx.constants = [None if isinstance(a, Tensor) else a for a in args]
        ctx.save_for_backward(*(args[i] for i in ctx.positions))
        return fn(*args)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        args = list(ctx.constants)
        wanted = []
        for i, saved in zip(ctx.positions, ctx.saved_tensors):
            leaf = saved.detach()
            if ctx.needs_input_grad[i + 1]:
                leaf.requires_grad_(True)
                wanted.append(i)
            args[i] = leaf
        with torch.enable_grad():
            outs = ctx.fn(*args)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        result: list[Tensor | None] = [None] * len(args)
        if pairs and wanted:
            got = torch.autograd.grad(
                [o for o, _ in pairs],
                [args[i] for i in wanted],
                [g for _, g in pairs],
                allow_unused=True,
            )
            for i, g in zip(wanted, got):
                result[i] = g
        return (None, *result)


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


def unrolled_lasso(
    u: Tensor,
    operator: StridedConv,
    step: Tensor | float,
    lmbda: Tensor | float,
    mu: float = 0.0,
    n_iter: int = 2,
    algorithm: str = "fista",
    nonnegative: bool = False,
    callback: Callback | None = None,
    lmbda_relative: bool = False,
    backward: str = "unrolled",
    fused: bool = False,
    implicit_max_iter: int = 200,
    implicit_tol: float = 1e-6,
) -> Tensor:
    """``n_iter`` unrolled ISTA/FISTA steps from ``x₀ = 0`` for the elastic-net Lasso.

    Solves (approximately) ``min_x ½‖u − A x‖² + λ‖x‖₁ + μ/2‖x‖²`` (``x ≥ 0`` when
    ``nonnegative``); see the module docstring for the iterations and the fused form. Costs
    ``2·n_iter − 1`` convolutions. Differentiable with respect to ``u``, the operator's weight,
    ``step`` and ``lmbda`` when those are tensors that require grad.

    With ``lmbda_relative``, ``lmbda`` is a fraction ``ρ`` and each sample ``n`` is solved with
    ``λ_n = ρ·λ_max(u_n)`` (:func:`lambda_max`, differentiated through as well): the same ``ρ``
    then gives comparable sparsity at any input scale (after a normalisation, after an earlier
    stage), and ``ρ ≥ 1`` gives the zero code. ``λ_max`` comes from ``Aᵀu``, computed anyway.

    Args:
        u: data ``(N, C_u, H_u, W_u)`` in the range of ``A``.
        operator: the linear operator ``A`` (with its adjoint).
        step: ``η > 0``, a number or a 0-dim tensor.
        lmbda: ``λ ≥ 0``, a number or a 0-dim tensor.
        mu: ``μ ≥ 0``.
        n_iter: number of proximal steps ``T ≥ 1``.
        algorithm: ``"ista"`` or ``"fista"``.
        nonnegative: impose ``x ≥ 0``.
        callback: called as ``callback(t, x_t)`` after each step ``t = 1..T`` (for objective
            traces); ``None`` in normal use.
        lmbda_relative: ``λ = lmbda · λ_max(u)`` per sample (see above).
        backward: ``"unrolled"``, ``"checkpoint"`` or ``"implicit"`` (module docstring); the
            forward value is the same ``x_T`` for all three. ``"implicit"`` with a ``step``
            that requires grad is refused (its gradient would be silently zero).
        fused: run the iterations as one ``torch.compile``-d graph (a checkpoint segment
            each; needs a working ``torch.compile``), which fuses the elementwise work between
            the convolutions; the same values and gradients up to rounding, the code in
            ``channels_last`` memory format. ``"implicit"`` runs eagerly (its recorded part is
            one step).
        implicit_max_iter, implicit_tol: conjugate-gradient budget of the implicit backward.

    Returns:
        The code ``x_T`` of shape ``(N, C_x, H_x, W_x)`` (the domain of ``A``).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    if backward == "implicit" and isinstance(step, Tensor) and step.requires_grad:
        raise ValueError(
            "backward='implicit' differentiates the converged solution, which does not depend "
            "on the step size: a learned step (learn_step=True) would get no gradient"
        )
    tracked = torch.is_grad_enabled() and any(
        isinstance(v, Tensor) and v.requires_grad for v in (u, operator.weight, step, lmbda)
    )
    if not tracked or callback is not None:
        backward = "unrolled"  # nothing to differentiate: every mode computes the same x_T
    if mu:
        denom = 1.0 + step * mu
        a, s = step / denom, 1.0 / denom
    else:
        a, s = step, None
    betas = fista_momentum(n_iter) if algorithm == "fista" else [0.0] * (n_iter - 1)
    fused = fused and callback is None and backward != "implicit"
    if fused:
        # the compiled graph runs its convolutions channels-last anyway (inductor's layout
        # choice); handing it a channels-last input spares it the conversions in and out, so
        # the code comes back channels-last (same values; a later stage then converts nothing)
        u = u.contiguous(memory_format=torch.channels_last)
    common = dict(
        operator=operator, betas=betas, nonnegative=nonnegative, lmbda_relative=lmbda_relative,
        fused=fused, callback=callback,
    )  # fmt: skip
    if backward == "unrolled" or n_iter == 1 and backward == "checkpoint":
        fn = _segment_function(first=1, last=n_iter, **common)
        z, _ = fn(None, None, u, operator.weight, a, lmbda, s)
        return z
    if backward == "checkpoint":
        # segments of ⌈√(T−1)⌉ iterations; each saves only its input (x_t, x_{t−1}) and u, and
        # is replayed (Aᵀu included) in backward
        length = math.ceil(math.sqrt(n_iter - 1))
        z = z_prev = None
        for first in range(1, n_iter, length):
            last = min(first + length, n_iter)
            fn = _segment_function(first=first, last=last, **common)
            # ISTA never reads x_{t−1}: pass x_t twice so nothing more is saved
            prev = z_prev if any(betas[first - 1 : last - 1]) else z
            z, z_prev = _Replay.apply(fn, z, prev, u, operator.weight, a, lmbda, s)
        return z

    # implicit: T − 1 iterations without a graph, the last one recorded, its gradient replaced
    c, theta, scaled = _data_term(u, operator, a, lmbda, nonnegative, lmbda_relative)
    theta_step = None if nonnegative else theta
    if n_iter == 1:
        z = torch.relu(c) if nonnegative else shrink(c, theta)
    else:
        with torch.no_grad():
            c0 = c.detach()
            th0 = theta_step.detach() if isinstance(theta_step, Tensor) else theta_step
            z0 = torch.relu(c0) if nonnegative else shrink(c0, th0)
            z, z_prev = _run_iterations(
                z0, z0, c0, operator.weight.detach(), scaled.weight.detach(),
                s.detach() if isinstance(s, Tensor) else s, th0, operator=operator, betas=betas,
                first=1, last=n_iter - 1, nonnegative=nonnegative, callback=None,
            )  # fmt: skip
            beta = betas[n_iter - 2]
            y = z if beta == 0.0 else torch.lerp(z, z_prev, -beta)
        # x_T = prox(s·y + c − a AᵀA y) with y held constant
        z, _ = _run_iterations(
            y, y, c, operator.weight, scaled.weight, s, theta_step, operator=operator,
            betas=[0.0], first=1, last=2, nonnegative=nonnegative, callback=None,
        )  # fmt: skip
    if z.requires_grad:
        z.register_hook(
            _implicit_hook(z.detach(), operator, a, mu, implicit_max_iter, implicit_tol)
        )
    return z


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


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class UnrolledLasso(nn.Module):
    """Unrolled ISTA/FISTA with its own step size, threshold and Lipschitz estimate.

    The single solver used by :class:`~ctrl_csc.nn.CSCLayer` and by the ``inverse_csc`` kind of
    :class:`~ctrl_csc.nn.SparseDeconvLayer`; the layers own the dictionary and pass the operator
    built from it to :meth:`forward`.

    Step size. ``η = m / ((1 + δ) L)`` with ``L`` the power-iteration estimate of ``‖AᵀA‖₂`` for
    the current spatial sizes, ``δ = STEP_MARGIN`` and ``m`` a multiplier. ``L`` is a lower bound
    that converges from below (a 50-step estimate can be ~1% low), and ``δ`` keeps ``η`` at or
    below ``1/L_true``, where FISTA's guarantees hold. Without ``learn_step`` ``m = 1``; with it
    ``m = m_max·sigmoid(ρ)`` is learned but bounded by ``m_max = 1`` (FISTA) or ``2`` (ISTA, which
    converges for ``η < 2/L``), starting at ``m = 1`` (ISTA) or ``0.95`` (FISTA). The vector is
    warm-started from call to call and estimated:

    * from a fixed pseudo-random start with ``init_power_iters`` steps when the spatial sizes
      change (or at first use);
    * in training mode, ``power_iters`` further steps on every forward;
    * in eval mode, ``init_power_iters`` warm steps only when the operator's weight differs
      from the one of the last estimate (a detached copy of it is kept and compared by value, so
      an optimiser step, ``load_state_dict`` or any in-place edit is noticed); otherwise the
      cached value is used.

    The vector, ``L`` and the sizes they belong to are buffers in the state dict (loadable into
    a module that has seen other sizes, or none). Setting the attribute ``refresh_lipschitz`` to
    ``False`` holds the estimate in training mode (no ``power_iters`` steps; new sizes are still
    estimated): a constant step, which finite-difference checks need; never while a dictionary
    learns.

    Threshold. ``λ`` is a constant, or with ``learn_lmbda`` ``λ = softplus(ρ)`` with ``ρ`` the
    parameter ``raw_lmbda`` (kept positive). With ``lmbda_relative`` the value is a fraction of
    each sample's ``λ_max = ‖Aᵀu‖_∞`` (see :func:`unrolled_lasso`), learned as
    ``sigmoid(ρ)``: kept below 1, where every code would be zero and ``ρ``'s gradient with it.

    Args:
        channels: channels of the unknown (for the power-iteration vector).
        lmbda, mu, n_iter, algorithm, nonnegative: see :func:`unrolled_lasso`.
        learn_lmbda: make ``λ`` a parameter.
        learn_step: learn a multiplier on ``η``.
        power_iters: power-iteration steps per training forward (``≥ 1``).
        init_power_iters: steps when the sizes change / before evaluation (``≥ 1``).
        lmbda_relative: ``lmbda`` is a fraction (``< 1``) of each sample's ``λ_max``.
        backward: ``"unrolled"`` (default), ``"checkpoint"`` or ``"implicit"`` (see the module
            docstring; ``"implicit"`` refuses ``learn_step``).
        compile: fuse each iteration's elementwise work with ``torch.compile``
            (:func:`unrolled_lasso`'s ``fused``); where compile cannot run (no C++ compiler), a
            warning is given once and the eager path is used.
    """

    _LIP_BUFFERS = ("power_vector", "lipschitz_estimate", "lipschitz_shape")
    #: conjugate-gradient budget of ``backward="implicit"`` (each step costs two convolutions;
    #: a 64→64 stage at 32² needs about 40 steps for 1e-6); instance attributes may override it
    implicit_max_iter = 200
    implicit_tol = 1e-6
    #: relative safety margin ``δ`` of the step ``η = m/((1 + δ)L)`` over the power-iteration ``L``
    STEP_MARGIN = 0.02

    def __init__(
        self,
        channels: int,
        lmbda: float = 0.1,
        mu: float = 0.0,
        n_iter: int = 2,
        algorithm: str = "fista",
        nonnegative: bool = True,
        learn_lmbda: bool = False,
        learn_step: bool = False,
        power_iters: int = 1,
        init_power_iters: int = 50,
        lmbda_relative: bool = False,
        backward: str = "unrolled",
        compile: bool = False,
    ) -> None:
        super().__init__()
        options = dict(
            lmbda=lmbda, mu=mu, n_iter=n_iter, algorithm=algorithm, learn_lmbda=learn_lmbda,
            learn_step=learn_step, power_iters=power_iters, init_power_iters=init_power_iters,
            lmbda_relative=lmbda_relative, backward=backward, compile=compile,
        )  # fmt: skip
        check_options(options, "UnrolledLasso: ")
        check_relations(options, "UnrolledLasso: ")
        self.channels = int(channels)
        self.backward = backward
        self.compile = compile
        self.lmbda_relative = bool(lmbda_relative)
        self.mu = float(mu)
        self.n_iter = int(n_iter)
        self.algorithm = algorithm
        self.nonnegative = bool(nonnegative)
        self.power_iters = int(power_iters)
        self.init_power_iters = int(init_power_iters)
        self._fixed_lmbda = float(lmbda)
        # a learned fraction of λ_max stays in (0, 1) (sigmoid): at 1 every code is zero and λ's
        # gradient with it, so a softplus fraction that crossed 1 never came back
        raw = math.log(lmbda / (1.0 - lmbda)) if lmbda_relative else _inverse_softplus(lmbda)
        self.raw_lmbda = nn.Parameter(torch.tensor(raw)) if learn_lmbda else None
        self.max_step_scale = 1.0 if algorithm == "fista" else 2.0
        start = min(1.0, 0.95 * self.max_step_scale) / self.max_step_scale  # sigmoid(ρ₀)
        self.raw_step_scale = (
            nn.Parameter(torch.tensor(math.log(start / (1.0 - start)))) if learn_step else None
        )
        self.register_buffer("power_vector", torch.zeros(0))
        self.register_buffer("lipschitz_estimate", torch.zeros(()))
        self.register_buffer("lipschitz_shape", torch.zeros(4, dtype=torch.long))
        self._lip_key: tuple[int, ...] | None = None  # mirrors lipschitz_shape (no device sync)
        self._lip_weight: Tensor | None = None  # the operator weight the estimate belongs to
        self.refresh_lipschitz = True  # False: hold the estimate in training (see above)

    # ---- parameters -------------------------------------------------------------------------
    @property
    def lmbda(self) -> Tensor | float:
        """The current ``λ`` (a 0-dim tensor when learnable; a fraction of ``λ_max`` in
        ``(0, 1)`` with ``lmbda_relative``)."""
        if self.raw_lmbda is None:
            return self._fixed_lmbda
        if self.lmbda_relative:
            return torch.sigmoid(self.raw_lmbda)
        return F.softplus(self.raw_lmbda)

    @property
    def step_scale(self) -> Tensor | float:
        """The multiplier ``m`` of ``η = m/((1 + δ)L)`` (a 0-dim tensor in ``(0, m_max)`` when
        learnable)."""
        if self.raw_step_scale is None:
            return 1.0
        return self.max_step_scale * torch.sigmoid(self.raw_step_scale)

    # ---- Lipschitz constant -----------------------------------------------------------------
    def _initial_vector(self, size: tuple[int, int], like: Tensor) -> Tensor:
        gen = torch.Generator().manual_seed(0)
        v = torch.randn((1, self.channels, *size), generator=gen, dtype=torch.float64)
        return v.to(device=like.device, dtype=like.dtype)

    def update_lipschitz(
        self,
        operator: StridedConv,
        unknown_size: tuple[int, int],
        data_size: tuple[int, int],
        refresh: bool,
    ) -> None:
        """Bring the estimate of ``‖AᵀA‖₂`` up to date (see the class docstring).

        Args:
            operator: ``A`` for these sizes (its weight is detached here).
            unknown_size: spatial size of the unknown, data_size: of the data.
            refresh: run ``power_iters`` steps (training mode).
        """
        key = (*data_size, *unknown_size)
        weight = operator.weight
        if key != self._lip_key:
            n, v0 = self.init_power_iters, self._initial_vector(unknown_size, weight)
        else:
            v0 = self.power_vector.to(dtype=weight.dtype)
            if refresh:
                n = self.power_iters if self.refresh_lipschitz else 0
            elif not self._estimated_for(weight):
                n = self.init_power_iters
            else:
                n = 0
        if n == 0:
            return
        op = operator.detached()
        with torch.autocast(device_type=weight.device.type, enabled=False):  # full precision
            lip, v = power_iteration(op.apply, op.adjoint, v0, n)
        # Assign fresh tensors rather than copying in place (works under inference_mode too).
        self.power_vector = v
        self.lipschitz_estimate = lip
        if key != self._lip_key:
            self.lipschitz_shape = torch.tensor(key, dtype=torch.long, device=weight.device)
            self._lip_key = key
        self._lip_weight = weight.detach().clone()

    def _estimated_for(self, weight: Tensor) -> bool:
        """Whether the current estimate was made for exactly this operator weight."""
        last = self._lip_weight
        return (
            last is not None
            and (last.shape, last.dtype, last.device) == (weight.shape, weight.dtype, weight.device)
            and torch.equal(last, weight.detach())
        )

    def lipschitz(self) -> Tensor:
        """The current estimate of ``L`` (0-dim, detached) for the last sizes seen."""
        if self._lip_key is None:
            raise RuntimeError(
                "no Lipschitz estimate yet: run a forward pass first or pass input_size"
            )
        return self.lipschitz_estimate.detach().clone()

    def step_size(self) -> Tensor:
        """``η = m/((1 + δ)L)`` from the current estimate (differentiable in ``m`` only)."""
        lip = self.lipschitz_estimate.clone()  # a normal tensor even if made in inference mode
        lip = lip.clamp_min(torch.finfo(lip.dtype).tiny) * (1.0 + self.STEP_MARGIN)
        return self.step_scale / lip

    # ---- solving ----------------------------------------------------------------------------
    def forward(
        self,
        u: Tensor,
        operator: StridedConv,
        unknown_size: tuple[int, int],
    ) -> Tensor:
        """Solve for the code of ``u``.

        Args:
            u: data ``(N, C_u, H_u, W_u)``.
            operator: ``A``, mapping the unknown ``(N, channels, *unknown_size)`` to data.
            unknown_size: spatial size of the unknown.

        Returns:
            ``(N, channels, *unknown_size)``.
        """
        data_size = (u.shape[-2], u.shape[-1])
        self.update_lipschitz(operator, unknown_size, data_size, self.training)
        z = unrolled_lasso(
            u, operator, self.step_size(), self.lmbda, self.mu, self.n_iter, self.algorithm,
            self.nonnegative, lmbda_relative=self.lmbda_relative, backward=self.backward,
            fused=self._fused(), implicit_max_iter=self.implicit_max_iter,
            implicit_tol=self.implicit_tol,
        )  # fmt: skip
        return z

    def _fused(self) -> bool:
        if not self.compile:
            return False
        if compile_available():
            return True
        if not getattr(self, "_warned_compile", False):
            warnings.warn(
                "UnrolledLasso: compile=True but torch.compile cannot build kernels here (it "
                "needs a working C++ compiler on CPU); running the eager solver",
                stacklevel=3,
            )
            self._warned_compile = True
        return False

    def effective_lmbda(self, u: Tensor, operator: StridedConv) -> Tensor | float:
        """The ``λ`` each sample of ``u`` is solved with: ``(N,)`` when relative, else
        :attr:`lmbda`."""
        if not self.lmbda_relative:
            return self.lmbda
        return self.lmbda * lambda_max(u, operator, self.nonnegative)

    @torch.no_grad()
    def objective_trace(
        self,
        u: Tensor,
        operator: StridedConv,
        unknown_size: tuple[int, int],
    ) -> Tensor:
        """Lasso objective after each iteration, with the step size ``forward`` uses.

        Does not run the per-step training power iterations.

        Returns:
            ``(n_iter + 1, N)``: row 0 is ``x₀ = 0``, row ``t`` is ``x_t``.
        """
        data_size = (u.shape[-2], u.shape[-1])
        self.update_lipschitz(operator, unknown_size, data_size, refresh=False)
        lmbda = self.effective_lmbda(u, operator)
        zero = u.new_zeros((u.shape[0], self.channels, *unknown_size))
        rows = [lasso_objective(u, zero, operator, lmbda, self.mu)]

        def record(_t: int, z: Tensor) -> None:
            rows.append(lasso_objective(u, z, operator, lmbda, self.mu))

        unrolled_lasso(
            u, operator, self.step_size(), self.lmbda, self.mu, self.n_iter, self.algorithm,
            self.nonnegative, callback=record, lmbda_relative=self.lmbda_relative,
        )  # fmt: skip
        return torch.stack(rows)

    # ---- state dict -------------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # noqa: D401 - torch hook
        # The buffers' shapes depend on the input size: take the incoming shapes.
        for name in self._LIP_BUFFERS:
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, Tensor):
                current = getattr(self, name)
                setattr(
                    self,
                    name,
                    torch.empty(incoming.shape, dtype=current.dtype, device=current.device),
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        shape = tuple(int(s) for s in self.lipschitz_shape.tolist())
        self._lip_key = shape if len(shape) == 4 and any(shape) else None
        self._lip_weight = None  # re-checked (warm) before the next evaluation

    def extra_repr(self) -> str:
        lmbda = "learned" if self.raw_lmbda is not None else self._fixed_lmbda
        rel = ", lmbda_relative=True" if self.lmbda_relative else ""
        return (
            f"lmbda={lmbda}{rel}, mu={self.mu}, n_iter={self.n_iter}, "
            f"algorithm={self.algorithm!r}, "
            f"nonnegative={self.nonnegative}, learn_step={self.raw_step_scale is not None}, "
            f"power_iters={self.power_iters}, init_power_iters={self.init_power_iters}"
            + (f", backward={self.backward!r}" if self.backward != "unrolled" else "")
            + (", compile=True" if self.compile else "")
        )
