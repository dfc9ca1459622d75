"""Run the suite as Hydra sweeps: one job per training run, one job per evaluation.

Each row becomes a config file ``<runs>/configs/train/repro/<row>.yaml`` (``# @package _global_``,
the group choices as ``override`` entries, the values below) and the training is one multirun,

    python -m ctrl_csc.cli.train -m +repro=ROW1,ROW2,...
        hydra.searchpath=[file://<runs>/configs/train]
        hydra.sweep.dir=<runs> hydra.sweep.subdir=<row>

so every run is an ordinary Hydra job with its own directory ``<runs>/<row>/`` that any launcher
can place (``--launcher slurm``: one Slurm job each). Locally the pending rows are split into
``jobs`` shards of about equal estimated cost, run side by side (one CPU thread each). The
evaluations follow the same way with ``ctrl-csc-eval`` into ``<runs>/eval/<row>__<on>/``. A row
whose ``metrics.json`` (an evaluation whose ``eval.json``) exists is skipped, and an interrupted
row continues from its own ``last.pt`` (``trainer.resume=auto``).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ctrl_csc.repro.suite import (
    Evaluation,
    Row,
    Scale,
    estimated_cost,
    eval_config,
    train_config,
)

log = logging.getLogger("ctrl_csc")


def write_config(path: Path, choices: dict[str, str], values: dict[str, Any]) -> None:
    """A ``# @package _global_`` config file: group choices as overrides, then the values."""
    body = {"defaults": [{f"override /{k}": v} for k, v in choices.items()], **values}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# @package _global_\n" + OmegaConf.to_yaml(OmegaConf.create(body)))


def run_dir(runs: Path, row: Row | str) -> Path:
    return runs / (row if isinstance(row, str) else row.name)


def eval_dir(runs: Path, evaluation: Evaluation) -> Path:
    return runs / "eval" / evaluation.name


def trained(runs: Path, row: Row) -> bool:
    d = run_dir(runs, row)
    return (d / "metrics.json").is_file() and (d / "checkpoints" / "last.pt").is_file()


def evaluated(runs: Path, evaluation: Evaluation) -> bool:
    return (eval_dir(runs, evaluation) / "eval.json").is_file()


def shards(items: Sequence[Any], costs: Sequence[float], n: int) -> list[list[Any]]:
    """``items`` split into at most ``n`` lists of about equal total cost (longest first)."""
    bins: list[tuple[float, list[Any]]] = [(0.0, []) for _ in range(max(1, min(n, len(items))))]
    for cost, item in sorted(zip(costs, items), key=lambda p: -p[0]):
        i = min(range(len(bins)), key=lambda j: bins[j][0])
        bins[i] = (bins[i][0] + cost, [*bins[i][1], item])
    return [b for _, b in bins if b]


def _sweep(
    module: str,
    names: list[str],
    config_root: Path,
    sweep_dir: Path,
    overrides: Sequence[str],
    log_path: Path,
    threads: int | None,
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        module,
        "-m",
        f"+repro={','.join(names)}",
        f"hydra.searchpath=[file://{config_root.resolve()}]",
        f"hydra.sweep.dir={sweep_dir.resolve()}",
        "hydra.sweep.subdir=${hydra:runtime.choices.repro}",
        *overrides,
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = log_path.open("w")
    handle.write("$ " + " ".join(cmd) + "\n")
    handle.flush()
    env = dict(os.environ)
    if threads:  # sweeps side by side: one thread each (torch's thread pools spin otherwise)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
    proc.log_path, proc.log_handle = log_path, handle  # type: ignore[attr-defined]
    return proc


def _run_sweeps(
    module: str,
    groups: list[list[str]],
    config_root: Path,
    sweep_dir: Path,
    overrides: Sequence[str],
    logs: Path,
    what: str,
) -> list[Path]:
    """Run one sweep per group side by side; the logs of those that failed."""
    threads = 1 if len(groups) > 1 else None
    procs = [
        _sweep(module, names, config_root, sweep_dir, overrides, logs / f"{what}_{i}.log", threads)
        for i, names in enumerate(groups)
    ]
    for proc in procs:
        proc.wait()
        proc.log_handle.close()  # type: ignore[attr-defined]
    return [p.log_path for p in procs if p.returncode != 0]  # type: ignore[attr-defined]


def run_suite(
    suite_rows: list[Row],
    suite_evals: list[Evaluation],
    scale: Scale,
    runs: Path,
    *,
    smoke: bool = False,
    jobs: int = 2,
    launcher: str | None = None,
    train_overrides: Sequence[str] = (),
    eval_overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Train and evaluate what is missing under ``runs``; returns a summary of what ran.

    Raises:
        RuntimeError: a sweep failed (naming its log); what finished is kept and skipped on the
            next call.
    """
    runs.mkdir(parents=True, exist_ok=True)
    rows_by_name = {r.name: r for r in suite_rows}
    train_root, eval_root = runs / "configs" / "train", runs / "configs" / "eval"
    launch = [f"hydra/launcher={launcher}"] if launcher else []
    n_shards = 1 if launcher else jobs
    summary: dict[str, Any] = {"trained": [], "evaluated": [], "failed_logs": []}

    todo = [r for r in suite_rows if not trained(runs, r)]
    for row in todo:
        choices, values = train_config(row, scale, smoke)
        if (run_dir(runs, row) / "checkpoints" / "last.pt").is_file():  # interrupted: continue
            values["trainer"] = {**values.get("trainer", {}), "resume": "auto"}
        write_config(train_root / "repro" / f"{row.name}.yaml", choices, values)
    t0 = time.perf_counter()
    if todo:
        log.info(
            "training %d of %d runs (%d already done)",
            len(todo),
            len(suite_rows),
            len(suite_rows) - len(todo),
        )
        groups = shards([r.name for r in todo], [estimated_cost(r, scale) for r in todo], n_shards)
        overrides = [*launch, *train_overrides]
        failed = _run_sweeps(
            "ctrl_csc.cli.train", groups, train_root, runs, overrides, runs / "logs", "train"
        )
        summary["failed_logs"] += failed
        summary["trained"] = [r.name for r in todo if trained(runs, r)]
    summary["train_s"] = time.perf_counter() - t0

    todo_e = [
        e for e in suite_evals if not evaluated(runs, e) and trained(runs, rows_by_name[e.row])
    ]
    for e in todo_e:
        row = rows_by_name[e.row]
        ckpt = run_dir(runs, row) / "checkpoints" / "last.pt"
        write_config(
            eval_root / "repro" / f"{e.name}.yaml", *eval_config(e, row, ckpt, scale, smoke)
        )
    t0 = time.perf_counter()
    if todo_e:
        log.info("evaluating %d checkpoints", len(todo_e))
        groups = shards([e.name for e in todo_e], [1.0] * len(todo_e), n_shards)
        failed = _run_sweeps(
            "ctrl_csc.cli.evaluate",
            groups,
            eval_root,
            runs / "eval",
            [*launch, *eval_overrides],
            runs / "logs",
            "eval",
        )
        summary["failed_logs"] += failed
        summary["evaluated"] = [e.name for e in todo_e if evaluated(runs, e)]
    summary["eval_s"] = time.perf_counter() - t0
    record_invocation(runs, summary)
    return summary


def git_revision(where: Path) -> str:
    """The checkout's commit, marked when tracked files differ from it."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def record_invocation(runs: Path, summary: dict[str, Any]) -> None:
    """Append what this invocation ran to ``<runs>/suite.json``: the code's revision, the wall
    clock and the CPU time of the sweeps (``getrusage`` of the finished child processes)."""
    path = runs / "suite.json"
    history = json.loads(path.read_text()) if path.is_file() else []
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    history.append(
        {
            "revision": git_revision(Path(__file__).resolve().parent),
            "trained": summary["trained"],
            "evaluated": summary["evaluated"],
            "train_wall_s": summary["train_s"],
            "eval_wall_s": summary["eval_s"],
            "cpu_s": usage.ru_utime + usage.ru_stime,
        }
    )
    path.write_text(json.dumps(history, indent=1) + "\n")
