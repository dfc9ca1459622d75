"""``ctrl-csc-train``: build everything from the Hydra config and run the trainer.

The bare command runs the quickstart (CSC-CTRL on the embedded ``mnist5k`` set, on CPU); see
``conf/train.yaml`` for the groups and ``conf/experiment/`` for the paper's experiments.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from ctrl_csc.cli.common import (
    build_datasets,
    build_models,
    check_data_fits_model,
    check_writable,
    config_dir,
    seed_all,
    seeded_subset,
    to_container,
)
from ctrl_csc.engine import (
    Trainer,
    build_loader,
    find_latest_checkpoint,
    setup_distributed,
    teardown_distributed,
)

log = logging.getLogger("ctrl_csc")


def build_optimizers(optim_cfg: DictConfig, encoder, decoder, max_steps: int):
    optimizers = {
        "encoder": instantiate(optim_cfg.encoder)(encoder.parameters()),
        "decoder": instantiate(optim_cfg.decoder)(decoder.parameters()),
    }
    if optim_cfg.lr_decay == "none":
        return optimizers, {}
    if optim_cfg.lr_decay != "linear":
        raise ValueError(f"optim.lr_decay must be linear or none, got {optim_cfg.lr_decay!r}")
    schedulers = {
        k: torch.optim.lr_scheduler.LinearLR(
            o, start_factor=1.0, end_factor=optim_cfg.final_lr_factor, total_iters=max_steps
        )
        for k, o in optimizers.items()
    }
    return optimizers, schedulers


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """``auto``: the latest ``checkpoints/last.pt`` among earlier runs of this name."""
    if resume in (None, "", "none"):
        return None
    if resume != "auto":
        return Path(resume)
    runs_root = output_dir.parent
    found = [p for p in runs_root.glob("*/checkpoints/last.pt") if output_dir not in p.parents]
    latest = max(found, key=lambda p: p.stat().st_mtime) if found else None
    if latest is None:
        latest = find_latest_checkpoint(output_dir)
    if latest is None:
        log.warning("trainer.resume=auto: no earlier run under %s, starting afresh", runs_root)
    return latest


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, float]:
    """Train as configured; return the final held-out metrics."""
    output_dir = check_writable(output_dir)
    tcfg = cfg.trainer
    ctx = setup_distributed(tcfg.device)
    if tcfg.get("threads"):
        torch.set_num_threads(tcfg.threads)
    seed_all(cfg.seed)
    try:
        train_set, test_set = build_datasets(cfg.dataset)
        encoder, decoder = build_models(cfg.model, ctx.device)
        check_data_fits_model(train_set, encoder, cfg.dataset, cfg.model.name)
        step = instantiate(cfg.loss)
        optimizers, schedulers = build_optimizers(cfg.optim, encoder, decoder, tcfg.max_steps)
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
            extra = (
                {"run_config": to_container(cfg)} if "WandbLogger" in cfg.logger._target_ else {}
            )
            loggers.append(instantiate(cfg.logger, **extra))
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
        )
        try:
            return trainer.fit(resume=resolve_resume(tcfg.resume, output_dir))
        finally:
            trainer.close()
    finally:
        teardown_distributed()


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Console script ``ctrl-csc-train``; returns ``cfg.monitor`` of the final metrics (sweepers
    optimise it)."""
    metrics = run(cfg, HydraConfig.get().runtime.output_dir)
    return float(metrics.get(cfg.monitor, float("nan")))


if __name__ == "__main__":
    main()
