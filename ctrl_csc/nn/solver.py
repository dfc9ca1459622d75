r"""The unrolled convolutional Lasso solver that every sparse-coding stage runs.

The function that runs it (:func:`unrolled_lasso`, dispatching between its three backwards) and
the module that owns its step size and threshold (:class:`UnrolledLasso`).

Problem (docs/design.md, §3 "The CSC stage"), for a linear operator ``A`` (the dictionary ``D``
of a CSC stage, or the strided convolution ``B`` of an inverse-CSC decoder stage) and data ``u``::

    x* = argmin_x  ½‖u − A x‖² + λ‖x‖₁ + (μ/2)‖x‖²        (optionally subject to x ≥ 0)

The pieces, one job per module: the operator ``A`` and its adjoint (:mod:`.strided_conv`); the
estimate of ``L = ‖AᵀA‖₂`` behind the step ``η = 1/L`` (:mod:`.lipschitz`); the ISTA/FISTA
iterations in their fused form (:mod:`.iteration`); their ``torch.compile``-d segments
(:mod:`.compiled`); the memory-saving backwards (:mod:`.backward`).

Backward (``backward=``). ``"unrolled"`` backpropagates through every iteration, so the tensors
saved for backward grow linearly with ``T``. ``"checkpoint"`` saves ``O(√T)`` codes and replays
segments in backward (the same gradients up to summation order). ``"implicit"`` differentiates the
converged Lasso solution (exact at convergence with strict complementarity; it does not
differentiate the step size, so ``learn_step`` is refused with it). Details in :mod:`.backward`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backward import checkpointed, implicit
from .compiled import compile_available, segment_function
from .iteration import Callback, fista_momentum, lambda_at_density, lambda_max, lasso_objective
from .lipschitz import LipschitzEstimate
from .stage import ALGORITHMS, BACKWARDS, EncoderStageOptions, StageOptions
from .strided_conv import StridedConv

__all__ = ["UnrolledLasso", "unrolled_lasso"]


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
    density: float | None = None,
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
    With ``density`` the sample's ``λ_n`` is instead the value at which the first step's code
    keeps that fraction of its entries (:func:`~ctrl_csc.nn.iteration.lambda_at_density`), and
    ``lmbda`` is not read: a code density set directly, whatever the dictionary does to the
    spread of ``Aᵀu``.

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
        density: ``None``, or ``ρ ∈ (0, 1)``: ``λ`` per sample from the code density (above).
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
        density=density, fused=fused, callback=callback,
    )  # fmt: skip
    if backward == "unrolled" or n_iter == 1 and backward == "checkpoint":
        z, _ = segment_function(first=1, last=n_iter, **common)(
            None, None, u, operator.weight, a, lmbda, s
        )
        return z
    if backward == "checkpoint":
        return checkpointed(u, a, lmbda, s, n_iter=n_iter, **common)
    return implicit(
        u, operator, a, lmbda, s, mu=mu, n_iter=n_iter, betas=betas, nonnegative=nonnegative,
        lmbda_relative=lmbda_relative, density=density, max_iter=implicit_max_iter,
        tol=implicit_tol,
    )  # fmt: skip


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class UnrolledLasso(LipschitzEstimate):
    """Unrolled ISTA/FISTA with its own step size, threshold and Lipschitz estimate.

    The single solver used by :class:`~ctrl_csc.nn.CSCLayer` and by the ``inverse_csc`` kind of
    :class:`~ctrl_csc.nn.SparseDeconvLayer`; the layers own the dictionary and pass the operator
    built from it to :meth:`forward`.

    Step size. ``η = m / ((1 + δ) L)`` with ``L`` the power-iteration estimate of ``‖AᵀA‖₂`` for
    the current spatial sizes, ``δ = STEP_MARGIN`` and ``m`` a multiplier. ``L`` is a lower bound
    that converges from below (a 50-step estimate can be ~1% low), and ``δ`` keeps ``η`` at or
    below ``1/L_true``, where FISTA's guarantees hold. Without ``learn_step`` ``m = 1``; with it
    ``m = m_max·sigmoid(ρ)`` is learned but bounded by ``m_max = 1`` (FISTA) or ``2`` (ISTA, which
    converges for ``η < 2/L``), starting at ``m = 1`` (ISTA) or ``0.95`` (FISTA). When ``L`` is
    refreshed, and the attribute ``refresh_lipschitz``: the base class,
    :class:`~ctrl_csc.nn.lipschitz.LipschitzEstimate`.

    Threshold. ``λ`` is a constant, or with ``learn_lmbda`` ``λ = softplus(ρ)`` with ``ρ`` the
    parameter ``raw_lmbda`` (kept positive). With ``lmbda_relative`` the value is a fraction of
    each sample's ``λ_max = ‖Aᵀu‖_∞`` (see :func:`unrolled_lasso`), learned as
    ``sigmoid(ρ)``: kept below 1, where every code would be zero and ``ρ``'s gradient with it.
    With ``density``, each sample's ``λ`` is set by the fraction of non-zeros it gives the first
    step's code, and ``lmbda`` is not read.

    Args:
        channels: channels of the unknown (for the power-iteration vector).
        options: the stage's options object (:class:`~ctrl_csc.nn.stage.StageOptions` of either
            role, validated when it was made), of which the solver reads ``lmbda``, ``mu``,
            ``n_iter``, ``algorithm``, ``nonnegative``, ``learn_lmbda``, ``learn_step``,
            ``power_iters``, ``init_power_iters``, ``lmbda_relative``, ``density``, ``backward`` and
            ``compile`` (meanings there and in :func:`unrolled_lasso`; with ``compile``, where
            ``torch.compile`` cannot run, a warning is given once and the eager path is used).
            ``None``: an encoder stage's defaults. Kept as ``options``; the attributes made from
            it (``n_iter``, ``mu``…) are the live settings, which a diagnostic may change in
            place.
    """

    #: conjugate-gradient budget of ``backward="implicit"`` (each step costs two convolutions;
    #: a 64→64 stage at 32² needs about 40 steps for 1e-6); instance attributes may override it
    implicit_max_iter = 200
    implicit_tol = 1e-6
    #: relative safety margin ``δ`` of the step ``η = m/((1 + δ)L)`` over the power-iteration ``L``
    STEP_MARGIN = 0.02

    def __init__(self, channels: int, options: StageOptions | None = None) -> None:
        opts = EncoderStageOptions() if options is None else options
        super().__init__(channels, opts.power_iters, opts.init_power_iters)
        lmbda = float(opts.lmbda)
        self.options = opts
        self.backward = opts.backward
        self.compile = opts.compile
        self.lmbda_relative = bool(opts.lmbda_relative)
        self.density = None if opts.density is None else float(opts.density)
        self.mu = float(opts.mu)
        self.n_iter = int(opts.n_iter)
        self.algorithm = opts.algorithm
        self.nonnegative = bool(opts.nonnegative)
        self._fixed_lmbda = lmbda
        self.raw_lmbda = None
        if opts.learn_lmbda:  # (needs λ > 0: a fixed λ = 0 has no parameter to start from)
            # a learned fraction of λ_max stays in (0, 1) (sigmoid): at 1 every code is zero and
            # λ's gradient with it, so a softplus fraction that crossed 1 never came back
            relative = self.lmbda_relative
            raw = math.log(lmbda / (1.0 - lmbda)) if relative else _inverse_softplus(lmbda)
            self.raw_lmbda = nn.Parameter(torch.tensor(raw))
        self.max_step_scale = 1.0 if opts.algorithm == "fista" else 2.0
        start = min(1.0, 0.95 * self.max_step_scale) / self.max_step_scale  # sigmoid(ρ₀)
        self.raw_step_scale = (
            nn.Parameter(torch.tensor(math.log(start / (1.0 - start)))) if opts.learn_step else None
        )

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
            self.nonnegative, lmbda_relative=self.lmbda_relative, density=self.density,
            backward=self.backward, fused=self._fused(), implicit_max_iter=self.implicit_max_iter,
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
        """The ``λ`` each sample of ``u`` is solved with: ``(N,)`` when relative or set by the
        code density, else :attr:`lmbda`."""
        if self.density is not None:
            return lambda_at_density(u, operator, self.density, self.nonnegative)
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
            density=self.density,
        )  # fmt: skip
        return torch.stack(rows)

    def extra_repr(self) -> str:
        lmbda = "learned" if self.raw_lmbda is not None else self._fixed_lmbda
        rel = ", lmbda_relative=True" if self.lmbda_relative else ""
        threshold = f"density={self.density}" if self.density is not None else f"lmbda={lmbda}{rel}"
        return (
            f"{threshold}, mu={self.mu}, n_iter={self.n_iter}, "
            f"algorithm={self.algorithm!r}, "
            f"nonnegative={self.nonnegative}, learn_step={self.raw_step_scale is not None}, "
            f"power_iters={self.power_iters}, init_power_iters={self.init_power_iters}"
            + (f", backward={self.backward!r}" if self.backward != "unrolled" else "")
            + (", compile=True" if self.compile else "")
        )
