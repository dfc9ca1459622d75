"""Differentiable all-gather of features across ``torch.distributed`` ranks.

Gradient convention
-------------------
Every rank gathers the global batch and computes the *same* global objective ``T`` on it, then
calls ``backward`` on it. The backward of :func:`all_gather_with_grad` sums the incoming gradients
over ranks (``all_reduce(SUM)``) and keeps this rank's slice, so the gradient that reaches the
local features is ``Σ_r ∂T_r/∂Z_local``: with ``T_r = T`` on every rank this is
``world_size × ∂T/∂Z_local``. ``DistributedDataParallel`` then *averages* the parameter gradients
over ranks, which divides that factor back out: parameter gradients equal those of one process
holding the whole batch. (More generally the parameter gradient is that of ``mean_r T_r`` — the
right one also when ranks compute different losses from the gathered features.)
Without DDP, average the parameter gradients over ranks yourself (``all_reduce`` then divide by
``world_size``), exactly as DDP does.

Ranks may hold different numbers of rows (the last batch of an epoch): sizes are exchanged first
and the pieces padded to a common length for the collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather", "all_gather_with_grad", "distributed_world_size"]


def distributed_world_size(group: dist.ProcessGroup | None = None) -> int:
    """World size when ``torch.distributed`` is available and initialised, else 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _gather_sizes(n: int, device: torch.device, group) -> list[int]:
    world = dist.get_world_size(group)
    mine = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in torch.cat(sizes).tolist()]


def _gather_padded(x: Tensor, sizes: list[int], group) -> Tensor:
    """All-gather ``x`` (``(n_r, ...)`` on rank r) into ``(Σ n_r, ...)`` in rank order."""
    top = max(sizes)
    x = x.contiguous()
    if x.shape[0] < top:
        x = torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # type: ignore[override]
        sizes = _gather_sizes(x.shape[0], x.device, group)
        rank = dist.get_rank(group)
        ctx.group = group
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.stop], None


def all_gather_with_grad(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, differentiably.

    Args:
        x: ``(n_r, ...)`` on rank ``r``; trailing dims equal on all ranks, ``n_r`` may differ.
        group: process group (default: the world).

    Returns:
        ``(Σ_r n_r, ...)`` in rank order, on every rank. Backward: ``all_reduce(SUM)`` of the
        gradient, then this rank's slice (see the module docstring for why this makes
        DDP-averaged parameter gradients equal to single-process ones). Every rank must call
        ``backward`` (a collective). Returns ``x`` unchanged when not distributed.
    """
    if distributed_world_size(group) == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


def all_gather(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Non-differentiable gather (e.g. labels): ``(n_r, ...)`` → ``(Σ_r n_r, ...)``."""
    if distributed_world_size(group) == 1:
        return x
    with torch.no_grad():
        sizes = _gather_sizes(x.shape[0], x.device, group)
        return _gather_padded(x.detach(), sizes, group)
