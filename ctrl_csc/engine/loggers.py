"""Metric loggers: console + JSON lines always, Weights & Biases on request.

A logger has ``log(metrics: dict[str, float], step: int)`` and ``close()``. The trainer calls them
on the main process only.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ConsoleLogger", "JSONLinesLogger", "WandbLogger", "format_metrics"]

log = logging.getLogger("ctrl_csc")


def format_metrics(metrics: Mapping[str, float], keys: list[str] | None = None) -> str:
    keys = keys or list(metrics)
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


class ConsoleLogger:
    """A line of metrics through :mod:`logging` (Hydra sends it to the console and a file)."""

    def __init__(self, keys: list[str] | None = None) -> None:
        self.keys = keys

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        log.info("step %d  %s", step, format_metrics(metrics, self.keys))

    def close(self) -> None:
        pass


class JSONLinesLogger:
    """Appends one JSON object per call to ``path`` (``{"step": s, **metrics}``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        row = {"step": step, **{k: _finite_or_str(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        rows = [
            r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= step
        ]
        self.path.write_text("".join(r + "\n" for r in rows))

    def close(self) -> None:
        pass


def _finite_or_str(v: float) -> float | str:
    v = float(v)
    return v if math.isfinite(v) else str(v)


class WandbLogger:
    """Weights & Biases run; ``mode`` is ``offline`` (default, needs no account), ``online`` or
    ``disabled``. wandb is imported only when this logger is built."""

    def __init__(
        self,
        project: str = "ctrl_csc",
        mode: str = "offline",
        name: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        dir: str | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode must be online, offline or disabled, got {mode!r}")
        try:
            import wandb
        except ImportError:
            raise ImportError(
                "logger=wandb needs the wandb package: pip install 'ctrl_csc[wandb]'"
            ) from None
        self._wandb = wandb
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            mode=mode,
            name=name,
            entity=entity,
            group=group,
            tags=tags,
            dir=dir,
            config=dict(run_config or {}),
            reinit="finish_previous",
        )

    def record_config(self, config: Mapping[str, Any]) -> None:
        """Store the run's configuration (plain containers) in the W&B run's config."""
        self.run.config.update(dict(config), allow_val_change=True)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()
        teardown = getattr(self._wandb, "teardown", None)
        if teardown is not None:  # stops wandb's background service: no process is left behind
            teardown()
