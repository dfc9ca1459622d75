"""The closed-loop trainer, its steps, checkpoints, loggers and distributed set-up."""

from ctrl_csc.engine.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ctrl_csc.engine.distributed import (
    DistContext,
    ResumableSampler,
    setup_distributed,
    teardown_distributed,
)
from ctrl_csc.engine.game import Game, NonFiniteObjectiveError, build_optimizers
from ctrl_csc.engine.loggers import ConsoleLogger, JSONLinesLogger, WandbLogger
from ctrl_csc.engine.steps import CTRLStep, ReconstructionStep, VAEStep
from ctrl_csc.engine.trainer import Trainer, build_loader

__all__ = [
    "build_optimizers",
    "CTRLStep",
    "CheckpointError",
    "ConsoleLogger",
    "DistContext",
    "Game",
    "JSONLinesLogger",
    "NonFiniteObjectiveError",
    "ReconstructionStep",
    "VAEStep",
    "ResumableSampler",
    "Trainer",
    "WandbLogger",
    "build_loader",
    "find_latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "setup_distributed",
    "teardown_distributed",
]
