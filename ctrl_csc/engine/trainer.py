"""The trainer: one loop for the closed-loop game and the baselines, on CPU, one GPU or torchrun.

It takes built objects (no configuration system inside)::

    trainer = Trainer(encoder, decoder, CTRLStep(CTRLObjective("samplewise")),
                      optimizers={"encoder": opt_f, "decoder": opt_g}, train_loader=loader,
                      eval_loader=test_loader, output_dir="runs/x", max_steps=2000)
    metrics = trainer.fit()

Outputs under ``output_dir``: ``checkpoints/last.pt`` (and ``step_*.pt`` every
``checkpoint_every`` steps), ``metrics.jsonl`` (one row per logged step), ``metrics.json``
(final held-out metrics and objective terms), ``samples/*.png`` (inputs beside reconstructions)
and ``objective.png`` (objective terms over training).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ctrl_csc.engine.checkpoint import (
    CheckpointError,
    config_fingerprint,
    fingerprint_diff,
    load_checkpoint,
    load_module_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ctrl_csc.engine.distributed import (
    PREEMPTED_EXIT_CODE,
    SINGLE_PROCESS,
    DistContext,
    PreemptionGuard,
    ResumableSampler,
    TrainingPreempted,
    gather_objects,
    rank_seed,
)
from ctrl_csc.engine.game import Game, NonFiniteObjectiveError, clone_tree
from ctrl_csc.engine.loggers import JSONLinesLogger, format_metrics
from ctrl_csc.engine.steps import TrainStep

__all__ = [
    "Game",
    "Trainer",
    "NonFiniteObjectiveError",
    "TrainingPreempted",
    "PREEMPTED_EXIT_CODE",
    "build_loader",
]

log = logging.getLogger("ctrl_csc")


def build_loader(
    dataset,
    batch_size: int,
    ctx: DistContext = SINGLE_PROCESS,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
) -> DataLoader:
    """A loader whose order is fixed by ``seed`` and the epoch, sharded over ranks, resumable."""
    if drop_last and len(dataset) // ctx.world_size < batch_size:
        raise ValueError(
            f"trainer.batch_size={batch_size} is larger than the {len(dataset)} "
            f"samples per process of the dataset; lower trainer.batch_size"
        )
    sampler = ResumableSampler(
        len(dataset), shuffle=shuffle, seed=seed, rank=ctx.rank, world_size=ctx.world_size
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )


class Trainer:
    """Runs a :class:`TrainStep` for ``max_steps`` steps with evaluation, logging and checkpoints.

    Args:
        encoder, decoder: the two players (already on ``ctx.device``); the training batches are
            cast to the encoder's parameter dtype (float32, or float64 for runs that must be
            free of float32 rounding).
        step: the training step (:class:`~ctrl_csc.engine.CTRLStep` or
            :class:`~ctrl_csc.engine.ReconstructionStep`).
        optimizers: ``{"encoder": ..., "decoder": ...}``.
        train_loader: from :func:`build_loader` (its :class:`ResumableSampler` makes resume exact).
        schedulers: optional ``{name: LRScheduler}`` stepped once per training step.
        eval_loader: held-out images for PSNR, code densities and reconstruction grids (yielding
            images or ``(images, labels)``).
        loggers: objects with ``log(metrics, step)`` and ``close()`` (main process only).
        output_dir: run directory.
        max_steps: training steps (one step = ``k`` encoder updates + one decoder update).
        log_every, eval_every, checkpoint_every: periods in steps (0 disables periodic
            evaluation / periodic checkpoints; the final ones always happen).
        eval_images: held-out images used by each evaluation (``None``: the whole loader; 0: no
            held-out evaluation).
        baseline_images: training images whose mean image serves as the trivial reconstruction
            that ``psnr`` is compared with (``psnr_mean_image`` in the metrics); 0 disables it.
        grad_clip: max gradient norm per player, or ``None``.
        amp, amp_dtype: autocast mixed precision (``bfloat16`` or ``float16``).
        ctx: process and device (:func:`~ctrl_csc.engine.setup_distributed`).
        config: the resolved run configuration (plain containers), stored in every checkpoint.
        progress: progress bar; ``None`` shows it only when stderr is a terminal.
        rollback_nonfinite: keep in memory what a failing step can corrupt, so that a non-finite
            objective in the middle of a step (e.g. the decoder's, after the encoder's updates of
            that step were applied) saves the state from *before* the failing step: the models'
            buffers, scaler and RNG at each step's start, and, before a player's first update in
            a step that is not its last (``Game.update(..., last=True)``), that player's
            parameters and optimiser state (``CTRLStep``: the encoder's; on the training
            device). Without it such a mid-step state is not saved at all (the last checkpoint
            on disk is kept).
        handle_signals: SIGTERM / SIGUSR1 (preemption) finish the current step, write
            ``checkpoints/last.pt`` and raise :class:`TrainingPreempted`, a ``SystemExit`` with
            status :data:`~ctrl_csc.engine.distributed.PREEMPTED_EXIT_CODE` (75).
        requeue: on such a signal, also requeue the job where a scheduler is there to do it
            (submitit's own handler, or ``scontrol requeue`` in a Slurm job).
        resume_strict: refuse to resume from a checkpoint whose stored configuration differs from
            ``config`` in the model, loss, optimiser, dataset or seed (the differing keys are
            listed); ``False`` only warns.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        step: TrainStep,
        optimizers: Mapping[str, torch.optim.Optimizer],
        train_loader: DataLoader,
        schedulers: Mapping[str, Any] | None = None,
        eval_loader: DataLoader | None = None,
        loggers: Sequence[Any] = (),
        output_dir: str | Path = ".",
        max_steps: int = 1000,
        log_every: int = 50,
        eval_every: int = 0,
        checkpoint_every: int = 0,
        eval_images: int | None = 1000,
        baseline_images: int = 0,
        grad_clip: float | None = None,
        amp: bool = False,
        amp_dtype: str = "bfloat16",
        ctx: DistContext = SINGLE_PROCESS,
        config: Mapping[str, Any] | None = None,
        progress: bool | None = None,
        rollback_nonfinite: bool = True,
        handle_signals: bool = True,
        requeue: bool = True,
        resume_strict: bool = True,
    ) -> None:
        if max_steps < 1:
            raise ValueError(f"trainer.max_steps must be >= 1, got {max_steps}")
        self.game = Game(encoder, decoder, optimizers, ctx, grad_clip, amp, amp_dtype)
        self.step_fn, self.ctx = step, ctx
        # batches come in the models' precision (float64 models: a run free of float32 rounding)
        self.dtype = next(encoder.parameters(), torch.empty(())).dtype
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.schedulers = dict(schedulers or {})
        self.output_dir = Path(output_dir)
        self.max_steps, self.log_every = max_steps, max(1, log_every)
        self.eval_every, self.checkpoint_every = eval_every, checkpoint_every
        self.eval_images, self.baseline_images = eval_images, baseline_images
        self.config = dict(config or {})
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.rollback_nonfinite = rollback_nonfinite
        self.game.keep_for_rollback = bool(rollback_nonfinite)
        self.handle_signals, self.requeue = handle_signals, requeue
        self.resume_strict = resume_strict
        self.step = 0
        self.last_metrics: dict[str, float] = {}
        self._mean_image: torch.Tensor | None = None
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.history = JSONLinesLogger(self.output_dir / "metrics.jsonl")
            self.loggers = [self.history, *loggers]
        else:
            self.loggers = []

    # ------------------------------------------------------------------ state
    @property
    def encoder(self) -> nn.Module:
        return self.game.raw_encoder

    @property
    def decoder(self) -> nn.Module:
        return self.game.raw_decoder

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "models": {"encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict()},
            "optimizers": {k: o.state_dict() for k, o in self.game.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "scaler": self.game.scaler.state_dict(),
            "rng": rng_state(),
            "config": self.config,
            "fingerprint": config_fingerprint(self.config),
            "metrics": dict(self.last_metrics),
        }

    def load_state_dict(self, state: Mapping[str, Any], own_rng: bool = False) -> None:
        """Restore :meth:`state_dict` (or a checkpoint). Each rank takes its own random state
        from the checkpoint's ``rng_ranks`` when it was written by as many processes; otherwise
        rank 0 takes ``rng`` and the other ranks start streams of their own (``own_rng``: the
        state is this process's own, e.g. the in-memory copy from before a step)."""
        load_module_state(self.encoder, state["models"]["encoder"], "encoder")
        load_module_state(self.decoder, state["models"]["decoder"], "decoder")
        for k, o in self.game.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        if state.get("scaler"):
            self.game.scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_ranks")
        if own_rng or not self.ctx.distributed:
            set_rng_state(state["rng"])
        elif isinstance(ranks, list) and len(ranks) == self.ctx.world_size:
            set_rng_state(ranks[self.ctx.rank])
        else:
            set_rng_state(state["rng"])
            if self.ctx.rank > 0:
                torch.manual_seed(rank_seed(int(state["step"]), self.ctx.rank))
            log.warning(
                "the checkpoint holds the random state of %s process(es), this run has %d: "
                "ranks > 0 start new random streams",
                len(ranks) if isinstance(ranks, list) else 1,
                self.ctx.world_size,
            )
        self.step = int(state["step"])
        self.last_metrics = dict(state.get("metrics", {}))

    def save(self, name: str = "last.pt") -> Path | None:
        """Write a checkpoint (main process only; every rank must call it, as each rank's random
        state is gathered into ``rng_ranks``). A state whose weights are not finite is refused
        (:class:`NonFiniteObjectiveError`): the checkpoint on disk is kept."""
        ranks = gather_objects(rng_state(), self.ctx) if self.ctx.distributed else None
        if not self.ctx.is_main:
            return None
        for part, module in (("encoder", self.encoder), ("decoder", self.decoder)):
            for k, v in module.state_dict().items():
                if v.is_floating_point() and not torch.isfinite(v).all():
                    raise NonFiniteObjectiveError(
                        f"the {part}'s {k} is not finite at step {self.step}: checkpoint "
                        f"{name} was not written (what is on disk under "
                        f"{self.output_dir / 'checkpoints'} is kept)"
                    )
        state = self.state_dict()
        if ranks is not None:
            state["rng_ranks"] = ranks
        return save_checkpoint(state, self.output_dir / "checkpoints" / name)

    def _snapshot(self) -> dict[str, Any]:
        """What a failing step can change besides the updates it applied (which the game keeps
        as it applies them): the models' buffers (batch-norm statistics, Lipschitz estimates),
        the scaler and the random state. Copied on their devices."""
        return {
            "buffers": {
                name: {k: b.detach().clone() for k, b in module.named_buffers()}
                for name, module in self.game.modules.items()
            },
            "scaler": clone_tree(self.game.scaler.state_dict()),
            "rng": rng_state(),
        }

    def _roll_back(self, before: Mapping[str, Any]) -> None:
        """The state from before the failing step: the game undoes its applied updates, then the
        buffers, scaler and random state of :meth:`_snapshot` are put back."""
        self.game.roll_back()
        for name, module in self.game.modules.items():
            state = module.state_dict()  # parameters as rolled back, buffers as they were
            state.update(before["buffers"][name])
            load_module_state(module, state, name)
        if before["scaler"]:
            self.game.scaler.load_state_dict(before["scaler"])
        set_rng_state(before["rng"])

    def _preempted(self, guard: PreemptionGuard) -> TrainingPreempted:
        """After the step in progress: write ``last.pt``, requeue where possible, and stop."""
        path = self.save("last.pt")
        log.warning(
            "signal %d: stopped after step %d, state saved to %s (continue with "
            "trainer.resume=auto or trainer.resume=%s); exit status %d",
            guard.signum,
            self.step,
            path,
            path,
            PREEMPTED_EXIT_CODE,
        )
        how = guard.requeue()  # submitit's handler requeues and exits itself
        if how:
            log.warning("job requeued (%s)", how)
        return TrainingPreempted(guard.signum, self.step, path)

    def _non_finite(self, error: FloatingPointError, before: dict | None) -> Exception:
        """Save the state from before the failing step (or nothing) and say what failed."""
        failing = self.step + 1
        what = self.game.failed or "objective"
        applied = list(self.game.applied)
        note = ""
        if applied:
            counts = ", ".join(f"{p} {applied.count(p)}x" for p in dict.fromkeys(applied))
            note = f", after this step's update(s) of {counts} had been applied"
        if before is not None:
            self._roll_back(before)
        elif applied:
            return NonFiniteObjectiveError(
                f"{error} [the {what} in training step {failing}{note}; that mid-step state "
                f"was not saved (trainer.rollback_nonfinite=false); the last checkpoint on "
                f"disk under {self.output_dir / 'checkpoints'} is kept]"
            )
        path = self.save("last.pt")
        return NonFiniteObjectiveError(
            f"{error} [the {what} in training step {failing}{note}; the state from before "
            f"that step, i.e. after step {self.step}; last good state saved to {path}]"
        )

    def resume(self, path: str | Path, state: Mapping[str, Any] | None = None) -> None:
        """Continue from a checkpoint written by :meth:`save` (models, optimisers, RNG, step).

        ``state``: the checkpoint already read from ``path``. It is read onto the CPU; the
        weights and optimiser states move to the parameters' device as they load. A checkpoint
        whose configuration differs from this run's in what determines the model and its
        training is refused (``resume_strict``) with the differing keys listed.
        """
        if state is None:
            state = load_checkpoint(path, map_location="cpu")
        stored = state.get("config") or {}
        if self.config and stored:
            diff = fingerprint_diff(stored, self.config)
            if diff and self.resume_strict:
                raise CheckpointError(
                    f"trainer.resume={path}: the checkpoint was trained with another "
                    f"configuration ({len(diff)} key(s) differ: {'; '.join(diff[:10])}"
                    f"{'; ...' if len(diff) > 10 else ''}). Resume with the same settings, or "
                    "set trainer.resume_strict=false to resume anyway"
                )
            if diff:
                log.warning(
                    "trainer.resume=%s with another configuration (trainer.resume_strict="
                    "false): %s",
                    path,
                    "; ".join(diff),
                )
        self.load_state_dict(state)
        if self.ctx.is_main:
            self.history.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ loop
    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches starting at ``self.step``, reproducible from any step."""
        sampler = self.train_loader.sampler
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(
                "Trainer needs a loader from ctrl_csc.engine.build_loader "
                "(a ResumableSampler) so that runs resume exactly"
            )
        sampler.set_position(0)
        steps_per_epoch = len(self.train_loader)  # full epochs: the sampler starts at 0 here
        epoch, offset = divmod(self.step, steps_per_epoch)
        batch_size = self.train_loader.batch_size
        while True:
            sampler.set_position(epoch, offset * batch_size)
            for x, y in self.train_loader:
                yield (
                    x.to(self.ctx.device, self.dtype, non_blocking=True),
                    y.to(self.ctx.device, non_blocking=True),
                )
            epoch, offset = epoch + 1, 0

    def fit(
        self, resume: str | Path | None = None, resume_state: Mapping[str, Any] | None = None
    ) -> dict[str, float]:
        """Train to ``max_steps`` (from a checkpoint when ``resume`` is given, already read as
        ``resume_state`` if given); return the final evaluation metrics (also written to
        ``metrics.json``)."""
        if resume is not None:
            self.resume(resume, resume_state)
        if self.baseline_images and self._mean_image is None:
            with self._rng_untouched():
                self._mean_image = self._training_mean_image()
        self.encoder.train()
        self.decoder.train()
        batches = self._batches()
        bar = tqdm(
            total=self.max_steps,
            initial=self.step,
            disable=not (self.progress and self.ctx.is_main),
            desc="train",
            dynamic_ncols=True,
        )
        t0, window = time.perf_counter(), []
        guard = PreemptionGuard(self.ctx, self.requeue)
        if self.handle_signals:
            guard.install()
        try:
            while self.step < self.max_steps:
                before = self._snapshot() if self.rollback_nonfinite else None
                x, y = next(batches)
                self.game.begin_step()
                try:
                    out = self.step_fn(self.game, x, y)
                except FloatingPointError as e:  # ours, or the objective's non-finite features
                    raise self._non_finite(e, before) from None
                for s in self.schedulers.values():
                    s.step()
                self.step += 1
                bar.update(1)
                window.append(out)
                if self.step % self.log_every == 0 or self.step == self.max_steps:
                    metrics = _mean_of(window)
                    metrics["lr/encoder"] = self.game.optimizers["encoder"].param_groups[0]["lr"]
                    metrics["time/elapsed_s"] = time.perf_counter() - t0
                    self.last_metrics.update(metrics)
                    self._log(metrics)
                    bar.set_postfix_str(
                        format_metrics(
                            metrics,
                            [k for k in metrics if k.endswith(("/total", "/decoder_total"))],
                        )
                    )
                    window = []
                if (
                    self.eval_every
                    and self.step % self.eval_every == 0
                    and self.step < self.max_steps
                ):
                    self._log(self.evaluate())
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save(f"step_{self.step:07d}.pt")
                    self.save("last.pt")
                if self.handle_signals and guard.should_stop() and self.step < self.max_steps:
                    raise self._preempted(guard)
        finally:
            guard.uninstall()
            bar.close()
        final = self.evaluate()
        self._log(final)
        # the final checkpoint carries the final evaluation (a release exported from it keeps
        # its held-out PSNR), as metrics.json does
        self.last_metrics.update({**final, "step": self.step})
        self.save("last.pt")
        if self.ctx.is_main:
            summary = dict(self.last_metrics)
            (self.output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
            self._plot_curves()
        return final

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()

    def _log(self, metrics: Mapping[str, float]) -> None:
        for lg in self.loggers:
            lg.log(metrics, self.step)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Held-out reconstruction PSNR of ``g(f(X))`` (``psnr``; ``psnr_mean_image`` of the
        training mean image with ``baseline_images``), per-stage code densities
        (``density/enc{i}``, ``density/dec{i}``, averaged over images) and a sample grid, by
        :func:`ctrl_csc.eval.evaluate_reconstructions` under the game's autocast (main process
        only; others return ``{}``). Random generators are left as they were, so evaluating never
        changes the course of training (and resumed runs stay exact)."""
        if not self.ctx.is_main or self.eval_loader is None or self.eval_images == 0:
            return {}
        with self._rng_untouched(), torch.no_grad():
            return self._evaluate()

    def metric_names(self) -> list[str] | None:
        """The keys of the main process's :meth:`evaluate` result, known before training (the
        same on every process; none without an evaluation loader or images; ``None`` when the
        models do not say which of their stages output codes)."""
        if self.eval_loader is None or self.eval_images == 0:
            return []
        from ctrl_csc.eval.runner import density_names

        densities = density_names(self.encoder, self.decoder)
        if densities is None:
            return None
        baseline = ["psnr_mean_image"] if self.baseline_images else []
        return ["psnr", *baseline, *densities]

    def _rng_untouched(self) -> AbstractContextManager:
        cuda = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        return torch.random.fork_rng(devices=cuda)

    def _evaluate(self) -> dict[str, float]:
        from ctrl_csc.eval.runner import evaluate_reconstructions
        from ctrl_csc.eval.visualize import reconstruction_grid

        result = evaluate_reconstructions(
            self.encoder,
            self.decoder,
            self.eval_loader,
            metrics=("psnr", "density"),
            num_images=self.eval_images,
            device=self.ctx.device,
            num_samples=32,
            progress=False,
            autocast=self.game.autocast,
            mean_image=self._mean_image,
        )
        metrics = {k: v for k, v in result.metrics.items() if k != "num_images"}
        path = self.output_dir / "samples" / f"step_{self.step:07d}.png"
        reconstruction_grid(result.inputs, result.reconstructions, path)
        log.info("eval step %d  %s", self.step, format_metrics(metrics))
        return metrics

    @torch.no_grad()
    def _training_mean_image(self) -> torch.Tensor:
        total, count = None, 0
        for x, _ in _plain_batches(self.train_loader):
            x = x[: self.baseline_images - count].to(self.ctx.device)
            total = x.sum(0) if total is None else total + x.sum(0)
            count += len(x)
            if count >= self.baseline_images:
                break
        return (total / count).unsqueeze(0)

    def _plot_curves(self) -> None:
        from ctrl_csc.eval.visualize import plot_curves

        plot_curves(self.history.path, self.output_dir / "objective.png")


def _plain_batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the loader's dataset in storage order (does not move the training sampler)."""
    return iter(DataLoader(loader.dataset, batch_size=loader.batch_size or 256, shuffle=False))


def _mean_of(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = rows[0].keys()
    return {k: math.fsum(float(r[k]) for r in rows) / len(rows) for k in keys}
