"""The Lipschitz constant ``L = ‖AᵀA‖₂`` of a stage's operator: power iteration and its cache.

:class:`LipschitzEstimate` keeps a warm-started power-iteration vector and the estimate as buffers
and decides when to refresh them (docs/design.md, §3 "Step size");
:class:`~ctrl_csc.nn.solver.UnrolledLasso` is one. Never backpropagated through.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .strided_conv import StridedConv

__all__ = ["LipschitzEstimate", "power_iteration"]


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


class LipschitzEstimate(nn.Module):
    """A warm-started power-iteration estimate of ``L = ‖AᵀA‖₂`` for an operator that changes.

    The vector is warm-started from call to call and estimated:

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

    Args:
        channels: channels of the unknown (for the power-iteration vector).
        power_iters: power-iteration steps per training forward (``≥ 1``).
        init_power_iters: steps when the sizes change / before evaluation (``≥ 1``).
    """

    _LIP_BUFFERS = ("power_vector", "lipschitz_estimate", "lipschitz_shape")

    def __init__(self, channels: int, power_iters: int, init_power_iters: int) -> None:
        super().__init__()
        self.channels = int(channels)
        self.power_iters = int(power_iters)
        self.init_power_iters = int(init_power_iters)
        self.register_buffer("power_vector", torch.zeros(0))
        self.register_buffer("lipschitz_estimate", torch.zeros(()))
        self.register_buffer("lipschitz_shape", torch.zeros(4, dtype=torch.long))
        self._lip_key: tuple[int, ...] | None = None  # mirrors lipschitz_shape (no device sync)
        self._lip_weight: Tensor | None = None  # the operator weight the estimate belongs to
        self.refresh_lipschitz = True  # False: hold the estimate in training (see above)

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
