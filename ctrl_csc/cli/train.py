"""``ctrl-csc-train``: build everything from the Hydra config and run the trainer.

The bare command runs the quickstart (CSC-CTRL on the embedded ``mnist5k`` set, on CPU); see
``conf/train.yaml`` for the groups and ``conf/experiment/`` for the paper's experiments.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ctrl_csc.cli.common import (
    TRAINING_DTYPES,
    build_datasets,
    build_models,
    check_data_fits_model,
    check_run_dir_arguments,
    check_stage_arguments,
    check_trainer_settings,
    check_writable,
    config_dir,
    one_clear_answer,
    seed_all,
    seeded_subset,
    submitit_requeues_on_every_signal,
    to_container,
)
from ctrl_csc.engine import (
    Trainer,
    build_loader,
    build_optimizers,
    load_checkpoint,
    setup_distributed,
    teardown_distributed,
)
from ctrl_csc.engine.distributed import agree_on_run_dir, rank_seed
from ctrl_csc.pretrained.guard import check_stored_config

log = logging.getLogger("ctrl_csc")


def resolve_resume(
    resume: str | None, output_dir: Path, sweep_overrides: Sequence[str] | None = None
) -> Path | None:
    """The checkpoint a run continues from, or ``None``.

    ``auto`` continues only *this* job: ``checkpoints/last.pt`` of this run directory or, for a
    job of a sweep (``sweep_overrides``: its Hydra overrides), the latest ``last.pt`` of a job of
    an earlier sweep of this name with the same overrides. Never a sibling run's. Without
    ``resume``, a job that Slurm restarted (``SLURM_RESTART_COUNT`` > 0) continues from its own
    directory's ``last.pt``.
    """
    own = output_dir / "checkpoints" / "last.pt"
    if resume in (None, "", "none"):
        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 and own.is_file():
            log.info("requeued Slurm job: continuing from its own %s", own)
            return own
        return None
    if resume != "auto":
        return Path(resume)
    if own.is_file():
        return own
    if sweep_overrides is not None:
        found = _same_job_in_earlier_sweeps(output_dir, sweep_overrides)
        if found is not None:
            return found
    log.warning(
        "trainer.resume=auto: no checkpoint of this job in %s%s, starting afresh (to continue "
        "another run, set trainer.resume=PATH/checkpoints/last.pt or hydra.run.dir=ITS_DIR)",
        output_dir,
        " or in earlier sweeps with the same overrides" if sweep_overrides is not None else "",
    )
    return None


def _job_key(overrides: Sequence[str]) -> frozenset[str]:
    """The overrides that make a job what it is (not how it is resumed or launched)."""
    return frozenset(
        o
        for o in overrides
        if not o.lstrip("+~").startswith(("trainer.resume", "hydra.", "hydra/"))
    )


def _same_job_in_earlier_sweeps(output_dir: Path, overrides: Sequence[str]) -> Path | None:
    """``multirun/<name>/<date>/<job>``: the newest ``last.pt`` among the other sweeps' jobs
    whose ``.hydra/overrides.yaml`` holds the same overrides as this job."""
    root, key = output_dir.parent.parent, _job_key(overrides)
    matches = []
    for ckpt in root.glob("*/*/checkpoints/last.pt"):
        job_dir = ckpt.parent.parent
        if job_dir.parent == output_dir.parent:  # a sibling job of this very sweep
            continue
        stored = job_dir / ".hydra" / "overrides.yaml"
        if stored.is_file() and _job_key(OmegaConf.load(stored)) == key:
            matches.append(ckpt)
    return max(matches, key=lambda p: p.stat().st_mtime) if matches else None


def check_monitor(monitor: str | None, available: Sequence[str] | None) -> None:
    """Refuse a ``monitor`` that the final evaluation will not report (a sweep would optimise
    NaN); nothing to check when the run does not evaluate (``trainer.eval_images=0``) or the
    metrics are not known in advance (``None``: models of another package)."""
    if monitor is None or not available or monitor in available:
        return
    raise ValueError(
        f"monitor={monitor!r} is not a metric of this run's evaluation; set monitor= one of "
        f"{', '.join(available)}"
    )


def run(
    cfg: DictConfig, output_dir: str | Path, sweep_overrides: Sequence[str] | None = None
) -> dict[str, float]:
    """Train as configured; return the final held-out metrics.

    ``sweep_overrides``: the job's Hydra overrides when it is one job of a sweep (``-m``), which
    ``trainer.resume=auto`` uses to find the same job of an earlier sweep.
    """
    tcfg = cfg.trainer
    check_trainer_settings(tcfg)
    ctx = setup_distributed(tcfg.device)
    if tcfg.get("threads"):
        torch.set_num_threads(tcfg.threads)
    trainer = None
    try:
        output_dir = check_writable(agree_on_run_dir(output_dir, ctx))  # rank 0's
        seed_all(cfg.seed)
        train_set, test_set = build_datasets(cfg.dataset)
        dtype = TRAINING_DTYPES[tcfg.get("dtype", "float32")]
        # the same weights on every rank
        encoder, decoder = (m.to(dtype) for m in build_models(cfg.model, ctx.device))
        check_data_fits_model(train_set, encoder, cfg.dataset, cfg.model.name)
        if ctx.distributed:  # each rank its own random streams from here on (noise, dropout)
            seed_all(rank_seed(cfg.seed, ctx.rank))
        step = instantiate(cfg.loss)
        optimizers, schedulers = build_optimizers(
            encoder,
            decoder,
            instantiate(cfg.optim.encoder),
            instantiate(cfg.optim.decoder),
            tcfg.max_steps,
            cfg.optim.lr_decay,
            cfg.optim.get("final_lr_factor", 0.0),
        )
        train_loader = build_loader(
            train_set,
            tcfg.batch_size,
            ctx,
            shuffle=True,
            seed=cfg.seed,
            num_workers=tcfg.num_workers,
        )
        eval_loader = torch.utils.data.DataLoader(
            seeded_subset(test_set, tcfg.eval_images),
            batch_size=tcfg.eval_batch_size,
            shuffle=False,
            num_workers=tcfg.num_workers,
        )
        loggers = []
        if ctx.is_main:
            # the run's config goes to the logger after it is built: handed to instantiate, its
            # nested _target_s (models, dataset, loss) would be built again and sent as objects
            logger = instantiate(cfg.logger)
            if callable(getattr(logger, "record_config", None)):
                logger.record_config(to_container(cfg))
            loggers.append(logger)
            n_f = sum(p.numel() for p in encoder.parameters())
            n_g = sum(p.numel() for p in decoder.parameters())
            log.info(
                "model=%s (encoder %.2fM, decoder %.2fM parameters), dataset=%s (%d train, "
                "%d test), %d process(es) on %s, output %s",
                cfg.model.name,
                n_f / 1e6,
                n_g / 1e6,
                cfg.dataset.name,
                len(train_set),
                len(test_set),
                ctx.world_size,
                ctx.device,
                output_dir,
            )
            for role, model, key in (
                ("encoder", encoder, "projection_rate"),
                ("decoder", decoder, "last_stage_gain"),
            ):
                value = getattr(model, key, None)  # set by "auto" when the model was built
                if isinstance(value, torch.Tensor) and float(value) != 1:
                    log.info("%s %s %.4g", role, key, float(value))
        trainer = Trainer(
            encoder,
            decoder,
            step,
            optimizers,
            train_loader,
            schedulers=schedulers,
            eval_loader=eval_loader,
            loggers=loggers,
            output_dir=output_dir,
            max_steps=tcfg.max_steps,
            log_every=tcfg.log_every,
            eval_every=tcfg.eval_every,
            checkpoint_every=tcfg.checkpoint_every,
            eval_images=tcfg.eval_images,
            baseline_images=tcfg.baseline_images,
            grad_clip=tcfg.grad_clip,
            amp=tcfg.amp,
            amp_dtype=tcfg.amp_dtype,
            ctx=ctx,
            config=to_container(cfg),
            progress=tcfg.progress,
            rollback_nonfinite=tcfg.get("rollback_nonfinite", True),
            handle_signals=tcfg.get("handle_signals", True),
            requeue=tcfg.get("requeue", True),
            resume_strict=tcfg.get("resume_strict", True),
        )
        check_monitor(cfg.get("monitor"), trainer.metric_names())
        resume = resolve_resume(tcfg.resume, output_dir, sweep_overrides)
        state = None
        if resume is not None:  # read once: the guard checks its config, the trainer loads it
            state = load_checkpoint(resume, map_location="cpu")
            stored = state.get("config")
            if isinstance(stored, dict) and "model" in stored:
                check_stored_config(stored, f"{str(resume)!r}")
        wants_requeue = tcfg.get("handle_signals", True) and tcfg.get("requeue", True)
        restore = submitit_requeues_on_every_signal() if wants_requeue else (lambda: None)
        try:
            metrics = trainer.fit(resume=resume, resume_state=state)
            if ctx.distributed:  # no rank takes the group down while another still uses it
                torch.distributed.barrier()
            return metrics
        finally:
            restore()
            trainer.close()
    finally:
        # the DDP-wrapped players go before their process group: gloo's threads that outlive it
        # aborted a rank at exit now and then ("terminate called without an active exception")
        trainer = None
        gc.collect()
        teardown_distributed()


def main() -> None:
    """Console script ``ctrl-csc-train`` (Hydra's command line; see :func:`hydra_main`)."""
    check_run_dir_arguments(sys.argv, "ctrl-csc-train")  # Hydra creates it before we run
    check_stage_arguments(sys.argv, "ctrl-csc-train")  # Hydra's refusal would not say what to set
    hydra_main()


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    """The Hydra task of ``ctrl-csc-train``; returns ``cfg.monitor`` of the final metrics
    (sweepers optimise it)."""
    hc = HydraConfig.get()
    sweep = list(hc.overrides.task) if hc.mode == RunMode.MULTIRUN else None
    with one_clear_answer():
        metrics = run(cfg, hc.runtime.output_dir, sweep)
    return float(metrics.get(cfg.monitor, float("nan")))  # NaN only without evaluation


if __name__ == "__main__":
    main()
