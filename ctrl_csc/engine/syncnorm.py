"""Batch norm with the statistics of the global batch under ``torch.distributed``.

Under torchrun each rank holds ``1/W`` of the batch. A plain ``BatchNorm`` normalises each share
by its own mean and variance, so the gathered objective is not that of one process holding the
whole batch (DESIGN §2 asks that it be). :func:`sync_batch_norms` replaces every batch-norm layer
of a model by one that normalises with the statistics of the global batch:

* on CUDA with NCCL, torch's :class:`torch.nn.SyncBatchNorm`
  (``nn.SyncBatchNorm.convert_sync_batchnorm``);
* anywhere else (CPU and gloo, where ``SyncBatchNorm`` refuses to run), :class:`GlobalBatchNorm`:
  the per-channel sum and centred sum of squares are all-reduced with a differentiable
  all-reduce (:func:`all_reduce_sum`), so the values, the gradients and the
  running statistics are those of ``BatchNorm`` on the concatenated batch.

Both keep the layer's parameters and buffers (the same tensors: optimisers built on the model stay
valid, checkpoints keep their keys), its momentum, ``eps`` and training mode. Both honour
``momentum = 0`` exactly (the running statistics do not move), which
:func:`ctrl_csc.engine.steps.frozen_statistics` relies on. In eval mode, or in one process, both
are plain ``BatchNorm``.

Gradient convention: the backward of the all-reduce sums the incoming gradients over ranks, as the
backward of :func:`ctrl_csc.losses.all_gather_with_grad` does; with DDP averaging the parameter
gradients, they equal those of one process holding the whole batch (see
:mod:`ctrl_csc.losses.distributed`). Every rank must run the same sequence of batch-norm forwards
(and backwards) in training mode: each is a collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GlobalBatchNorm", "all_reduce_sum", "count_batch_norms", "sync_batch_norms"]


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` whose backward is ``all_reduce(SUM)`` of the gradient (what
    ``torch.distributed.nn.functional.all_reduce`` does; that one is deprecated)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable ``Σ_r x_r`` over the ranks of ``group``."""
    return _AllReduceSum.apply(x, group)


def _world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class GlobalBatchNorm(_BatchNorm):
    """``BatchNorm`` over any input ``(N, C, ...)`` whose training-mode statistics are those of
    the batch of all ranks (the concatenation of every rank's ``N`` rows, which may differ).

    Forward in training mode under ``torch.distributed``: ``S = Σ x`` and ``n`` (all-reduced), the
    global mean ``μ = S / n``, then ``Q = Σ (x − μ)²`` (all-reduced; two passes, so no
    cancellation as in ``E[x²] − μ²``), the biased variance ``σ² = Q / n`` for normalising and the
    unbiased ``Q / (n − 1)`` for the running variance, as ``BatchNorm`` does. The statistics are
    computed in at least float32 (bf16/fp16 inputs under autocast); the output has the input's
    dtype.
    """

    def __init__(self, *args, process_group: dist.ProcessGroup | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input (N, C, ...) of 2 or more dims, got {input.dim()}")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and _world(self.process_group) > 1):
            return super().forward(input)
        self._check_input_dim(input)
        group = self.process_group or dist.group.WORLD
        dims = [0, *range(2, input.dim())]
        shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
        x = input if input.dtype in (torch.float32, torch.float64) else input.float()
        count = torch.full((1,), input.numel() // max(input.shape[1], 1), dtype=x.dtype)
        summed = all_reduce_sum(torch.cat([x.sum(dims), count.to(x.device)]), group)
        n = summed[-1].detach()
        if float(n) < 2:
            raise ValueError(
                f"expected more than 1 value per channel when training, got input size "
                f"{list(input.shape)} (global batch of {int(n)} values per channel)"
            )
        mean = summed[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce_sum(centred.square().sum(dims), group) / n

        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = float(self.momentum)
                if factor != 0.0:  # momentum 0 (frozen statistics): leave them exactly as they are
                    unbiased = var * (n / (n - 1))
                    self.running_mean.mul_(1 - factor).add_(factor * mean.detach())
                    self.running_var.mul_(1 - factor).add_(factor * unbiased.detach())

        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape).to(out.dtype)
        if self.bias is not None:
            out = out + self.bias.view(shape).to(out.dtype)
        return out.to(input.dtype)

    @classmethod
    def convert(
        cls, module: nn.Module, process_group: dist.ProcessGroup | None = None
    ) -> nn.Module:
        """``module`` with every ``_BatchNorm`` replaced by a :class:`GlobalBatchNorm` holding
        the same parameters and buffers (children are replaced in place; the returned module is
        ``module`` itself unless ``module`` is a batch norm)."""
        out = module
        if isinstance(module, _BatchNorm) and not isinstance(
            module, (GlobalBatchNorm, nn.SyncBatchNorm)
        ):
            out = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                bias=module.bias is not None,
                process_group=process_group,
            )
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert(child, process_group))
        return out


def count_batch_norms(module: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in module.modules())


def sync_batch_norms(
    module: nn.Module,
    device: torch.device | str | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """``module`` normalising with the global batch's statistics under ``torch.distributed``.

    ``nn.SyncBatchNorm`` where ``device`` is CUDA and the backend is NCCL, :class:`GlobalBatchNorm`
    otherwise (``device`` defaults to that of the module's first parameter). Children are
    replaced in place; call it before wrapping the module in DDP and keep the returned module (it
    is ``module`` itself unless ``module`` is a batch norm). A module without batch norm is
    returned unchanged.
    """
    if count_batch_norms(module) == 0:
        return module
    if device is None:
        first = next(iter(module.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    nccl = (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_backend(process_group) == dist.Backend.NCCL
    )
    if device.type == "cuda" and nccl:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return GlobalBatchNorm.convert(module, process_group)
