"""The closed-loop game as a training step sees it.

The two players, their optimisers (built by :func:`build_optimizers`, with their learning-rate
schedules), autocast and the finiteness check.

A step (:mod:`ctrl_csc.engine.steps`) is written against :class:`Game`; the
:class:`~ctrl_csc.engine.Trainer` builds one and hands it to the step at every training step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ctrl_csc.engine.distributed import DistContext
from ctrl_csc.engine.syncnorm import sync_batch_norms

__all__ = ["Game", "NonFiniteObjectiveError", "build_optimizers"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def build_optimizers(
    encoder: nn.Module,
    decoder: nn.Module,
    encoder_optimizer: OptimizerFactory,
    decoder_optimizer: OptimizerFactory,
    max_steps: int,
    lr_decay: str = "linear",
    final_lr_factor: float = 0.0,
) -> tuple[dict[str, torch.optim.Optimizer], dict[str, torch.optim.lr_scheduler.LRScheduler]]:
    """The players' optimisers and, with ``lr_decay="linear"``, their learning-rate schedules.

    Args:
        encoder, decoder: the players.
        encoder_optimizer, decoder_optimizer: ``parameters -> Optimizer`` (e.g.
            ``functools.partial(torch.optim.Adam, lr=1e-3)``; the configs' ``optim.encoder``).
        max_steps: training steps; a linear decay reaches ``final_lr_factor × lr`` there.
        lr_decay: ``"linear"`` or ``"none"`` (``optim.lr_decay``).
        final_lr_factor: the last step's fraction of the initial learning rate.

    Returns:
        ``({"encoder": ..., "decoder": ...}, schedulers)``, the form :class:`Trainer` takes;
        ``schedulers`` is ``{}`` without decay.
    """
    optimizers = {
        "encoder": encoder_optimizer(encoder.parameters()),
        "decoder": decoder_optimizer(decoder.parameters()),
    }
    if lr_decay == "none":
        return optimizers, {}
    if lr_decay != "linear":
        raise ValueError(f"optim.lr_decay must be linear or none, got {lr_decay!r}")
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {
        k: torch.optim.lr_scheduler.LinearLR(
            o, start_factor=1.0, end_factor=final_lr_factor, total_iters=max_steps
        )
        for k, o in optimizers.items()
    }
    return optimizers, schedulers


class NonFiniteObjectiveError(FloatingPointError):
    """Raised when the objective becomes NaN or infinite; the last good state is saved first."""


class Game:
    """The players and their optimisers, as a training step sees them.

    ``encoder``/``decoder`` are what the step calls with gradients (DDP-wrapped when distributed);
    ``raw_encoder``/``raw_decoder`` the bare modules, for passes that update nobody's weights.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        optimizers: Mapping[str, torch.optim.Optimizer],
        ctx: DistContext,
        grad_clip: float | None = None,
        amp: bool = False,
        amp_dtype: str = "bfloat16",
    ) -> None:
        self.raw_encoder, self.raw_decoder = encoder, decoder
        self.ctx, self.grad_clip = ctx, grad_clip
        if ctx.distributed:
            # batch norm with the global batch's statistics (SyncBatchNorm on NCCL; in place)
            encoder = sync_batch_norms(encoder, ctx.device)
            decoder = sync_batch_norms(decoder, ctx.device)
            self.raw_encoder, self.raw_decoder = encoder, decoder
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            encoder = DistributedDataParallel(encoder, device_ids=ids)
            decoder = DistributedDataParallel(decoder, device_ids=ids)
        self.encoder, self.decoder = encoder, decoder
        self.optimizers = dict(optimizers)
        self.modules = {"encoder": self.raw_encoder, "decoder": self.raw_decoder}
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[amp_dtype]
        self.amp = amp
        use_scaler = amp and self.amp_dtype == torch.float16 and ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=use_scaler)
        self.applied: list[str] = []  # players updated so far in the current training step
        self.failed: str | None = None  # what check_finite found non-finite
        #: keep, before a player's first update of a step, what the update overwrites (its
        #: parameters and optimiser state), so that :meth:`roll_back` can undo it; the trainer
        #: sets it (``trainer.rollback_nonfinite``)
        self.keep_for_rollback = False
        self._kept: dict[str, tuple[list[torch.Tensor], dict[str, Any]]] = {}

    def begin_step(self) -> None:
        self.applied, self.failed, self._kept = [], None, {}

    def autocast(self) -> AbstractContextManager:
        if not self.amp:
            return nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    def check_finite(self, value: torch.Tensor, what: str) -> None:
        if not torch.isfinite(value).all():
            self.failed = what
            raise NonFiniteObjectiveError(
                f"the {what} became {value.item()} — training stopped. Lower optim.*.lr, enable "
                "trainer.grad_clip, or increase the loss's eps_sq"
            )

    def update(self, players: Sequence[str], loss: torch.Tensor, last: bool = False) -> None:
        """One optimiser step of ``players`` on ``loss`` (to be *minimised*).

        ``last``: nothing that can fail follows this update in the step (its final update), so
        it is not kept for :meth:`roll_back`; a step that checks something after it must leave
        it ``False``.
        """
        if self.keep_for_rollback and not last:
            for name in players:
                if name not in self._kept:
                    params = [p.detach().clone() for p in self.modules[name].parameters()]
                    self._kept[name] = (params, clone_tree(self.optimizers[name].state_dict()))
        for name in players:
            self.optimizers[name].zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for name in players:
            opt = self.optimizers[name]
            if self.grad_clip:
                self.scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(self.modules[name].parameters(), self.grad_clip)
            self.scaler.step(opt)
        self.scaler.update()
        self.applied.extend(players)

    def roll_back(self) -> None:
        """Undo the updates applied in this step (parameters and optimiser states as they were
        before the step), from what :attr:`keep_for_rollback` kept."""
        for name in dict.fromkeys(self.applied):
            if name not in self._kept:
                raise RuntimeError(
                    f"the {name}'s update of this step was not kept (keep_for_rollback unset, or "
                    "the update was marked last although a check followed it)"
                )
            params, opt_state = self._kept[name]
            with torch.no_grad():
                for p, saved in zip(self.modules[name].parameters(), params, strict=True):
                    p.copy_(saved)
            self.optimizers[name].load_state_dict(opt_state)
        self.applied, self._kept = [], {}


def clone_tree(tree: Any) -> Any:
    """A copy of nested dicts/lists whose tensors are cloned (on their device)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, Mapping):
        return {k: clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(clone_tree(v) for v in tree)
    return tree
