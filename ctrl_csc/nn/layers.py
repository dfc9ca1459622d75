"""Convolutional sparse coding (encoder) and sparse deconvolution (decoder) stages.

The mathematics: docs/design.md, §3 "The CSC stage" and §4 "Sparse deconvolution stages".

Conventions. A CSC dictionary ``A`` is stored like an ``nn.Conv2d`` weight, ``(C_out, C_in, k, k)``
(``C_out`` atoms / code channels, atom ``j`` is ``A[j]``), and defines

* synthesis ``D z = conv_transpose2d(z, A, stride=s, padding=p, output_padding=o)``:
  ``(N, C_out, h, w) → (N, C_in, H, W)``, with ``o`` chosen so that ``H, W`` are exactly the
  requested size;
* analysis ``Dᵀ u = conv2d(u, A, stride=s, padding=p)``: ``(N, C_in, H, W) → (N, C_out, h, w)``,
  ``h = ⌊(H + 2p − k)/s⌋ + 1`` (``⌈H/s⌉`` for odd ``k`` and ``p = k // 2``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .solver import UnrolledLasso
from .stage import (
    DecoderStageOptions,
    EncoderStageOptions,
    StageOptions,
    check_channels,
    code_size,
    conv_output_size,
    default_padding,
    transposed_output_padding,
    upsampled_size,
)
from .strided_conv import StridedConv

__all__ = ["CSCLayer", "SparseDeconvLayer", "conv_output_size", "transposed_output_padding"]

_NORM_EPS = 1e-12


def _set_up_stage(
    layer: nn.Module,
    role: type[StageOptions],
    in_channels: int,
    out_channels: int,
    kernel_size: int | None,
    options: StageOptions | None,
    changes: dict,
) -> StageOptions:
    """Give ``layer`` its one options object and the attributes both kinds of stage read from
    it (channels checked, geometry, atom normalisation and scale); returns the options.

    The options are ``options`` (validated when it was made; the role's defaults when ``None``)
    with ``changes`` (``kernel_size`` given positionally among them)."""
    owner = type(layer).__name__
    check_channels(in_channels, f"{owner}: in_channels")
    check_channels(out_channels, f"{owner}: out_channels")
    if options is None:
        options = role()
    elif not isinstance(options, role):
        raise ValueError(f"{owner}: options must be a {role.__name__}, got {options!r}")
    if kernel_size is not None:
        changes["kernel_size"] = kernel_size
    opts = options.replaced(owner, **changes) if changes else options
    layer.options = opts
    layer.in_channels = in_channels
    layer.out_channels = out_channels
    layer.kernel_size = opts.kernel_size
    layer.stride = opts.stride
    layer.padding = default_padding(opts.kernel_size, opts.padding)
    layer.normalize_atoms = bool(opts.normalize_atoms)
    layer.init_std = None if opts.init_std is None else float(opts.init_std)
    return opts


def _check_input(x: Tensor, channels: int, owner: str, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != channels:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"{owner}: expected {what} of shape (N, {channels}, H, W) (channels={channels}), "
            f"got {got}"
        )


def _normalize(weight: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``weight`` with each slice over ``dims`` scaled to unit Euclidean norm (differentiable)."""
    norms = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
    return weight / norms.clamp_min(_NORM_EPS)


def _init_atoms(weight: Tensor, dims: tuple[int, ...], init_std: float | None) -> None:
    """Gaussian atoms scaled to unit norm (``init_std=None``) or with i.i.d. ``N(0, init_std²)``
    entries."""
    with torch.no_grad():
        if init_std is None:
            nn.init.normal_(weight)
            weight.copy_(_normalize(weight, dims))
        else:
            nn.init.normal_(weight, std=init_std)


class CSCLayer(nn.Module):
    """Convolutional sparse coding stage: an unrolled ISTA/FISTA solver of a convolutional Lasso.

    ``forward(x)`` returns ``z_T`` after ``T = n_iter`` proximal steps from ``z₀ = 0`` for::

        min_z ½‖x − D z‖² + λ‖z‖₁ + (μ/2)‖z‖²   (z ≥ 0 if nonnegative)

    with step ``η = 1/L``, ``L = ‖DᵀD‖₂`` estimated by warm-started power iteration for the last
    input's spatial size (see :class:`~ctrl_csc.nn.solver.UnrolledLasso` for when it is
    refreshed). ``Dᵀx`` is computed once: a forward costs ``2T − 1`` convolutions.

    Args:
        in_channels: channels ``C_in`` of the input signal.
        out_channels: number of atoms ``C_out`` (code channels).
        kernel_size: atom size ``k`` (a shorthand for the option of that name).
        options: the stage's options, an :class:`~ctrl_csc.nn.stage.EncoderStageOptions` (frozen,
            validated when made; a model passes its parsed stage spec); ``None``: the defaults.
        **changes: options to change, by name (``stride=2, lmbda=0.1, n_iter=5``…), with their
            defaults and meaning in :class:`~ctrl_csc.nn.stage.EncoderStageOptions`
            (``padding=None`` means ``k // 2``; ``nonnegative`` constrains the code to
            ``z ≥ 0``).

    Shapes:
        input ``(N, C_in, H, W)`` → code ``(N, C_out, h, w)``, ``h = ⌊(H + 2p − k)/s⌋ + 1``.

    Attributes:
        options: the stage's :class:`~ctrl_csc.nn.stage.EncoderStageOptions`.
        weight: the dictionary ``A``, ``(C_out, C_in, k, k)``.
        solver: the :class:`UnrolledLasso` holding λ, the step and the Lipschitz estimate.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | None = None,
        *,
        options: EncoderStageOptions | None = None,
        **changes: Any,
    ) -> None:
        super().__init__()
        opts = _set_up_stage(
            self, EncoderStageOptions, in_channels, out_channels, kernel_size, options, changes
        )
        k = opts.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, k, k))
        self.solver = UnrolledLasso(out_channels, opts)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Gaussian atoms: unit norm, or entries of standard deviation ``init_std``."""
        _init_atoms(self.weight, (1, 2, 3), self.init_std)

    # ---- hyperparameters --------------------------------------------------------------------
    @property
    def lmbda(self) -> Tensor | float:
        """Current ``λ`` (0-dim tensor when learnable)."""
        return self.solver.lmbda

    @property
    def mu(self) -> float:
        return self.solver.mu

    @property
    def n_iter(self) -> int:
        return self.solver.n_iter

    @property
    def algorithm(self) -> str:
        return self.solver.algorithm

    @property
    def nonnegative(self) -> bool:
        return self.solver.nonnegative

    # ---- operators --------------------------------------------------------------------------
    def dictionary(self) -> Tensor:
        """The atoms used by the operators: ``A`` with unit-norm ``A[j]`` if ``normalize_atoms``.

        Returns:
            ``(C_out, C_in, k, k)`` (differentiable in ``weight``).
        """
        return _normalize(self.weight, (1, 2, 3)) if self.normalize_atoms else self.weight

    def code_size(self, input_size: Sequence[int]) -> tuple[int, int]:
        """Spatial size ``(h, w)`` of the code of an input of spatial size ``(H, W)``."""
        return code_size(input_size, self.kernel_size, self.stride, self.padding, "CSCLayer")

    def operator(self, input_size: Sequence[int], dictionary: Tensor | None = None) -> StridedConv:
        """The synthesis operator ``D`` (with adjoint ``Dᵀ``) for inputs of size ``(H, W)``."""
        fine = (int(input_size[0]), int(input_size[1]))
        coarse = self.code_size(fine)
        pad = transposed_output_padding(
            coarse, fine, self.kernel_size, self.stride, self.padding, "CSCLayer"
        )
        weight = self.dictionary() if dictionary is None else dictionary
        return StridedConv(weight, self.stride, self.padding, pad, transposed=True)

    def analyze(self, x: Tensor) -> Tensor:
        """``Dᵀ x``: ``(N, C_in, H, W) → (N, C_out, h, w)``."""
        _check_input(x, self.in_channels, "CSCLayer.analyze", "input")
        return self.operator(x.shape[-2:]).adjoint(x)

    def synthesize(self, z: Tensor, output_size: Sequence[int]) -> Tensor:
        """``D z``: ``(N, C_out, h, w) → (N, C_in, *output_size)``.

        Raises:
            ValueError: when ``output_size`` does not have code size ``(h, w)``.
        """
        _check_input(z, self.out_channels, "CSCLayer.synthesize", "code")
        coarse = (z.shape[-2], z.shape[-1])
        fine = (int(output_size[0]), int(output_size[1]))
        pad = transposed_output_padding(
            coarse, fine, self.kernel_size, self.stride, self.padding, "CSCLayer.synthesize"
        )
        return StridedConv(self.dictionary(), self.stride, self.padding, pad, True).apply(z)

    # ---- solving ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Sparse code of ``x``: ``(N, C_in, H, W) → (N, C_out, h, w)``."""
        _check_input(x, self.in_channels, "CSCLayer", "input")
        size = (x.shape[-2], x.shape[-1])
        return self.solver(x, self.operator(size), self.code_size(size))

    def objective_trace(self, x: Tensor) -> Tensor:
        """Per-iteration Lasso objective ``½‖x − Dz_t‖² + λ‖z_t‖₁ + μ/2‖z_t‖²``.

        Runs the same iterations as ``forward`` (same step size) under ``no_grad`` without
        changing the layer's state beyond bringing a stale Lipschitz estimate up to date.

        Returns:
            ``(n_iter + 1, N)``; row 0 is ``z₀ = 0``.
        """
        _check_input(x, self.in_channels, "CSCLayer", "input")
        size = (x.shape[-2], x.shape[-1])
        with torch.no_grad():
            op = self.operator(size)
        return self.solver.objective_trace(x, op, self.code_size(size))

    def lipschitz(self, input_size: Sequence[int] | None = None) -> Tensor:
        """Current estimate of ``L = ‖DᵀD‖₂`` (0-dim, detached).

        Args:
            input_size: ``(H, W)``; when given, the estimate is first brought up to date for that
                size (as in eval mode). Without it, the estimate for the last input's size.
        """
        if input_size is not None:
            size = (int(input_size[0]), int(input_size[1]))
            with torch.no_grad():
                op = self.operator(size)
            self.solver.update_lipschitz(op, self.code_size(size), size, refresh=False)
        return self.solver.lipschitz()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, "
            f"normalize_atoms={self.normalize_atoms}"
        )


class SparseDeconvLayer(nn.Module):
    """Sparse deconvolution stage: inverts the resolution change of a CSC stage.

    See docs/design.md, §4 "Sparse deconvolution stages".

    Kinds:

    * ``"synthesis"``: ``x = D' z = conv_transpose2d(z, A', stride=s, padding=p)`` with its own
      dictionary ``A'`` of shape ``(C_in, C_out, k, k)`` (atom ``j`` is ``A'[j]``, normalised to
      unit norm if ``normalize_atoms``). The solver options (``lmbda`` … ``init_power_iters``)
      are not used by this kind; ``learn_lmbda``/``learn_step`` are rejected.
    * ``"inverse_csc"``: the unrolled solver of :class:`CSCLayer` with the roles of ``conv2d`` and
      ``conv_transpose2d`` swapped. With ``B v = conv2d(v, A', stride=s, padding=p)`` mapping a
      fine signal ``(N, C_out, H, W)`` to the coarse code ``(N, C_in, h, w)``, it returns ``v_T``
      for ``min_v ½‖z − B v‖² + λ‖v‖₁ + μ/2‖v‖²`` (``v ≥ 0`` if ``nonnegative``), i.e. sparse
      coding that upsamples. ``normalize_atoms`` scales each ``A'[:, c]`` (the filters of fine
      channel ``c``, i.e. the columns of ``B`` belonging to that channel) to unit norm.

    Args:
        in_channels: channels ``C_in`` of the coarse input (code).
        out_channels: channels ``C_out`` of the fine output.
        kernel_size: atom size ``k`` (a shorthand for the option of that name).
        options: the stage's options, a :class:`~ctrl_csc.nn.stage.DecoderStageOptions` (frozen,
            validated when made); ``None``: the defaults.
        **changes: options to change, by name (``kind="inverse_csc", stride=2``…), with their
            defaults and meaning in :class:`~ctrl_csc.nn.stage.DecoderStageOptions` (the solver
            options are used by ``inverse_csc`` only; ``normalize_atoms``: see the kinds).

    Shapes:
        ``(N, C_in, h, w)`` → ``(N, C_out, H, W)`` with ``(H, W) = output_size`` or by default
        ``(h·s, w·s)``.

    Attributes:
        options: the stage's :class:`~ctrl_csc.nn.stage.DecoderStageOptions`.
        weight: ``A'``, ``(C_in, C_out, k, k)`` (a ``conv_transpose2d`` weight).
        solver: the :class:`UnrolledLasso` (``inverse_csc``) or ``None`` (``synthesis``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | None = None,
        *,
        options: DecoderStageOptions | None = None,
        **changes: Any,
    ) -> None:
        super().__init__()
        opts = _set_up_stage(
            self, DecoderStageOptions, in_channels, out_channels, kernel_size, options, changes
        )
        self.kind = opts.kind
        k = opts.kernel_size
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels, k, k))
        self.solver = UnrolledLasso(out_channels, opts) if opts.kind == "inverse_csc" else None
        self.reset_parameters()

    @property
    def _atom_dims(self) -> tuple[int, ...]:
        return (1, 2, 3) if self.kind == "synthesis" else (0, 2, 3)

    def reset_parameters(self) -> None:
        """Gaussian atoms: unit norm, or entries of standard deviation ``init_std``."""
        _init_atoms(self.weight, self._atom_dims, self.init_std)

    def dictionary(self) -> Tensor:
        """``A'`` as used by the operator (normalised if ``normalize_atoms``).

        Returns:
            ``(C_in, C_out, k, k)`` (differentiable in ``weight``).
        """
        return _normalize(self.weight, self._atom_dims) if self.normalize_atoms else self.weight

    def default_output_size(self, input_size: Sequence[int]) -> tuple[int, int]:
        """``(h·s, w·s)`` for an input of spatial size ``(h, w)``."""
        return upsampled_size(input_size, self.stride)

    def operator(self, input_size: Sequence[int], output_size: Sequence[int]) -> StridedConv:
        """The stage's operator between coarse ``input_size`` and fine ``output_size``.

        ``synthesis``: ``D'`` (``apply`` = ``conv_transpose2d``, coarse → fine);
        ``inverse_csc``: ``B`` (``apply`` = ``conv2d``, fine → coarse). ``adjoint`` is the other.
        """
        coarse = (int(input_size[0]), int(input_size[1]))
        fine = (int(output_size[0]), int(output_size[1]))
        pad = transposed_output_padding(
            coarse, fine, self.kernel_size, self.stride, self.padding, "SparseDeconvLayer"
        )
        return StridedConv(
            self.dictionary(), self.stride, self.padding, pad, self.kind == "synthesis"
        )

    def forward(self, z: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        """``(N, C_in, h, w) → (N, C_out, H, W)``, ``(H, W) = output_size or (h·s, w·s)``."""
        _check_input(z, self.in_channels, "SparseDeconvLayer", "input")
        coarse = (z.shape[-2], z.shape[-1])
        fine = self.default_output_size(coarse) if output_size is None else output_size
        fine = (int(fine[0]), int(fine[1]))
        op = self.operator(coarse, fine)
        if self.solver is None:
            return op.apply(z)
        return self.solver(z, op, fine)

    def _require_solver(self, what: str) -> UnrolledLasso:
        if self.solver is None:
            raise ValueError(f"SparseDeconvLayer.{what} needs kind='inverse_csc' (got 'synthesis')")
        return self.solver

    def objective_trace(self, z: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        """Per-iteration objective ``½‖z − B v_t‖² + λ‖v_t‖₁ + μ/2‖v_t‖²`` (``inverse_csc``).

        Returns:
            ``(n_iter + 1, N)``; row 0 is ``v₀ = 0``.
        """
        solver = self._require_solver("objective_trace")
        _check_input(z, self.in_channels, "SparseDeconvLayer", "input")
        coarse = (z.shape[-2], z.shape[-1])
        fine = self.default_output_size(coarse) if output_size is None else tuple(output_size)
        with torch.no_grad():
            op = self.operator(coarse, fine)
        return solver.objective_trace(z, op, fine)

    def lipschitz(
        self, input_size: Sequence[int] | None = None, output_size: Sequence[int] | None = None
    ) -> Tensor:
        """Current estimate of ``L = ‖BᵀB‖₂`` (``inverse_csc``), 0-dim, detached.

        Args:
            input_size: coarse ``(h, w)``; when given, the estimate is first brought up to date
                for it (and ``output_size``, default ``(h·s, w·s)``).
        """
        solver = self._require_solver("lipschitz")
        if input_size is not None:
            coarse = (int(input_size[0]), int(input_size[1]))
            fine = self.default_output_size(coarse) if output_size is None else output_size
            fine = (int(fine[0]), int(fine[1]))
            with torch.no_grad():
                op = self.operator(coarse, fine)
            solver.update_lipschitz(op, fine, coarse, refresh=False)
        return solver.lipschitz()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, kind={self.kind!r}, "
            f"normalize_atoms={self.normalize_atoms}"
        )
