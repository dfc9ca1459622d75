"""What both Hydra entry points share: where the configs live and how objects are built."""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset

from ctrl_csc.engine.checkpoint import CheckpointError
from ctrl_csc.engine.trainer import NonFiniteObjectiveError
from ctrl_csc.pretrained.guard import _is_int, build_models, check_model_settings

log = logging.getLogger("ctrl_csc")

__all__ = [
    "config_dir",
    "build_models",
    "build_datasets",
    "check_data_fits_model",
    "seed_all",
    "to_container",
    "compose_model",
    "check_writable",
    "check_run_dir_arguments",
    "check_stage_arguments",
    "check_trainer_settings",
    "check_model_settings",
    "seeded_subset",
    "submitit_requeues_on_every_signal",
    "EXIT_USER_ERROR",
    "EXIT_NON_FINITE",
    "one_clear_answer",
]

#: Exit status of a console script stopped by an error the user can fix (a setting, a file).
EXIT_USER_ERROR = 2
#: Exit status of a run stopped by a non-finite objective (the last good state is saved).
EXIT_NON_FINITE = 3
# (a preempted run exits with ctrl_csc.engine.distributed.PREEMPTED_EXIT_CODE = 75)

#: Errors a user causes, each raised with one message naming the setting or file to change.
USER_ERRORS = (CheckpointError, ValueError, PermissionError, FileNotFoundError)


@contextmanager
def one_clear_answer() -> Iterator[None]:
    """Around a console script's work: an error the user caused is logged as its one message
    and the script exits with :data:`EXIT_USER_ERROR` (a non-finite objective with
    :data:`EXIT_NON_FINITE`) instead of showing a traceback. ``HYDRA_FULL_ERROR=1`` (or
    ``CTRL_CSC_TRACEBACK=1``) lets the exception through, traceback and all."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("CTRL_CSC_TRACEBACK") == "1":
        yield
        return
    try:
        yield
    except NonFiniteObjectiveError as e:
        log.error("%s", e)
        raise SystemExit(EXIT_NON_FINITE) from None
    except USER_ERRORS as e:
        log.error("%s", plain_message(e))
        raise SystemExit(EXIT_USER_ERROR) from None
    except InstantiationException as e:
        cause = _user_cause(e)
        if cause is None:  # a bug, not a setting: the traceback helps
            raise
        log.error("%s", plain_message(cause))
        raise SystemExit(EXIT_USER_ERROR) from None


def _user_cause(error: BaseException) -> BaseException | None:
    """The user error that ``hydra.utils.instantiate`` wrapped in its "Error in call to target"
    (which shows the exception's ``repr``, so a multi-line hint arrives full of literal ``\\n``)."""
    seen = 0
    while isinstance(error, InstantiationException) and seen < 8:
        error, seen = error.__cause__, seen + 1
    return error if isinstance(error, USER_ERRORS) else None


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def plain_message(error: BaseException) -> str:
    """The error's own message. A data-loader worker re-raises its error with the worker's
    traceback inside the message; the last line of that is the message itself."""
    text = str(error)
    if _WORKER_TRACEBACK in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        prefix = f"{type(error).__name__}: "
        text = last[len(prefix) :] if last.startswith(prefix) else last
    return text


def config_dir() -> str:
    """``conf/`` of a source checkout or editable install, else the copy shipped in the wheel."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        "ctrl_csc's configuration folder (conf/) was not found next to the "
        "package; reinstall ctrl_csc"
    )


def compose_model(name: str, channels: int, image_size: int, *overrides: str) -> DictConfig:
    """The ``model`` entry of the run config of ``model=name`` (a ``conf/model`` file) on images
    of ``channels`` × ``image_size``², composed by Hydra and unresolved (the ``csc_ctrl_*`` files
    start from ``conf/model/csc/base.yaml`` through a defaults list, so ``OmegaConf.load`` of one
    file is not the model). ``overrides``: more Hydra overrides (``"model.lmbda=0.05"``)."""
    size = f"dataset.image_size={image_size}"
    args = [f"model={name}", f"dataset.channels={channels}", size, *overrides]
    return _compose("train", args).model


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Hydra's composition of ``conf/<config_name>.yaml`` with ``overrides``, outside a run."""
    from hydra import compose, initialize_config_dir

    import ctrl_csc.models  # noqa: F401 - registers the configs' resolvers

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved configuration as plain dicts/lists/scalars (what checkpoints store)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def build_datasets(dataset_cfg: DictConfig, splits: tuple[str, ...] = ("train", "test")):
    return tuple(instantiate(dataset_cfg, split=s) for s in splits)


def check_data_fits_model(
    dataset, encoder: torch.nn.Module, dataset_cfg: DictConfig, model_name: str
) -> None:
    """Report an image size or channel count the model cannot take before any training: the
    encoder's own input check on one sample, with the dataset and model named."""
    check = getattr(encoder, "check_input", None)
    if check is None:  # an encoder from outside ctrl_csc.models: its forward will tell
        return
    x, _ = dataset[0]
    try:
        check(x.unsqueeze(0))
    except ValueError as e:
        raise ValueError(f"dataset={dataset_cfg.name}, model={model_name}: {e}") from None


def seeded_subset(dataset, n: int | None = None, seed: int = 0) -> Subset:
    """``n`` samples (all when ``None``) in an order fixed by ``seed``: held-out sets stored by
    class (the embedded digit sets) then give metrics and picture grids over every class."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[: n if n is not None else len(dataset)].tolist())


def check_writable(path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"  # per process: ranks share rank 0's directory
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"the run directory {str(path)!r} is not writable ({e.strerror}); "
            "choose another with hydra.run.dir=PATH (hydra.sweep.dir for -m)"
        ) from None
    return path


def check_run_dir_arguments(argv: list[str], program: str) -> None:
    """``hydra.run.dir=PATH`` / ``hydra.sweep.dir=PATH`` on the command line that cannot be
    created: Hydra makes that folder before any of this package's code runs and reports a failure
    with a traceback, so it is checked first and refused with one line and
    :data:`EXIT_USER_ERROR`. Paths with interpolations are left to :func:`check_writable`."""
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in ("hydra.run.dir", "hydra.sweep.dir") or "${" in value:
            continue
        path = Path(value).expanduser().absolute()
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        problem = None
        if existing is not None and not existing.is_dir():
            problem = f"{str(existing)!r} is a file, not a folder"
        elif existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            problem = f"{str(existing)!r} is not writable"
        if problem:
            sys.stderr.write(
                f"{program}: the run directory {value!r} cannot be created ({problem}); "
                f"choose another with {key}=PATH\n"
            )
            raise SystemExit(EXIT_USER_ERROR)


_STAGE_ENTRY = re.compile(r"^[+~]*model\.(encoder|decoder)\.stages\.\d+[.=]")


def check_stage_arguments(argv: list[str], program: str, config_name: str = "train") -> None:
    """``model.encoder.stages.N.KEY=...`` on the command line where the chosen model makes that
    list (the ``csc_ctrl_*`` configs: the encoder's stages from ``model.widths``, the decoder's
    their mirror): Hydra would refuse the override with ``Key 'N' is not in struct``, so it is
    refused first, with one line naming the settings that do change those stages, and
    :data:`EXIT_USER_ERROR`. Anything it cannot compose is left to Hydra."""
    entries = [a for a in argv[1:] if _STAGE_ENTRY.match(a)]
    if not entries:
        return
    rest = [a for a in argv[1:] if "=" in a and not a.startswith(("-", "hydra."))]
    rest = [a for a in rest if a not in entries]
    try:
        model = _compose(config_name, rest).get("model")
    except Exception:  # noqa: BLE001 - a sweep's syntax, another error: Hydra reports it
        return
    for arg in entries:
        role = _STAGE_ENTRY.match(arg).group(1)  # type: ignore[union-attr]
        part = model.get(role) if model is not None else None
        if part is None or not OmegaConf.is_interpolation(part, "stages"):
            continue
        made = (
            "made from model.widths (each stage halves the resolution; model.first_stage adds "
            "keys to the first)"
            if role == "encoder"
            else "the mirror of the encoder's stages"
        )
        sys.stderr.write(
            f"{program}: {arg}: model.{role}.stages of model={model.get('name')} is {made}, so "
            f"its entries cannot be set one by one; change model.widths=[...] or "
            f"model.first_stage.KEY=..., every stage's model.{role}.stage_defaults.KEY=..., or "
            f"give the whole list: 'model.{role}.stages=[{{...}},{{...}}]'\n"
        )
        raise SystemExit(EXIT_USER_ERROR)


#: ``trainer.dtype``: the precision of the models' weights and of the training batches.
TRAINING_DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: ``trainer.*`` settings that count something: at least 1, or at least 0 (0 = off / none).
_TRAINER_AT_LEAST = {
    "max_steps": 1,
    "batch_size": 1,
    "eval_batch_size": 1,
    "log_every": 1,
    "eval_every": 0,
    "checkpoint_every": 0,
    "eval_images": 0,
    "baseline_images": 0,
    "num_workers": 0,
}


#: ``eval.*`` settings that count something (``num_images: null`` = the whole split).
_EVAL_AT_LEAST = {"num_images": 1, "batch_size": 1, "probe_images": 1, "n_components": 1,
                  "num_workers": 0}  # fmt: skip


def _check_counts(cfg: Any, group: str, at_least: dict[str, int], nullable: tuple[str, ...]):
    for key, low in at_least.items():
        value = cfg.get(key)
        if value is None and key in nullable:
            continue
        if not _is_int(value) or value < low:
            kind = "a positive integer" if low == 1 else "an integer >= 0"
            raise ValueError(f"{group}.{key} must be {kind}, got {value!r}; set {group}.{key}=N")


#: What ``eval.generate`` may ask for (:mod:`ctrl_csc.eval.generate`).
GENERATIONS = ("samples", "traversals", "interpolations")


def check_eval_settings(ecfg: Any) -> None:
    """Every count in ``eval`` an integer in range, refused with the setting named."""
    _check_counts(ecfg, "eval", _EVAL_AT_LEAST, ("num_images", "probe_images"))
    generate = list(ecfg.get("generate") or [])
    unknown = [g for g in generate if g not in GENERATIONS]
    if unknown:
        raise ValueError(
            f"eval.generate: unknown {unknown}; choose from {list(GENERATIONS)}, e.g. "
            "eval.generate=[samples,traversals]"
        )
    for key in ("generate_components", "generate_per_class", "generate_directions"):
        value = ecfg.get(key, 1)
        if not _is_int(value) or value < 1:
            raise ValueError(f"eval.{key} must be a positive integer, got {value!r}")
    for key, low in (("classical_steps", 0), ("classical_images", 1)):
        value = ecfg.get(key, low)
        if not _is_int(value) or value < low:
            raise ValueError(f"eval.{key} must be an integer >= {low}, got {value!r}")
    steps = ecfg.get("generate_steps", 8)
    if not _is_int(steps) or steps < 2:
        raise ValueError(f"eval.generate_steps must be an integer >= 2, got {steps!r}")


def check_trainer_settings(tcfg: Any) -> None:
    """Every count in ``trainer`` an integer in range and ``trainer.device`` a device name,
    each refused with the setting named (instead of a type error deep inside the data loader)."""
    _check_counts(tcfg, "trainer", _TRAINER_AT_LEAST, ("eval_images",))
    threads = tcfg.get("threads")
    if threads is not None and (not _is_int(threads) or threads < 1):
        raise ValueError(f"trainer.threads must be a positive integer or null, got {threads!r}")
    dtype = tcfg.get("dtype", "float32")
    if dtype not in TRAINING_DTYPES:
        raise ValueError(f"trainer.dtype must be one of {sorted(TRAINING_DTYPES)}, got {dtype!r}")
    if dtype == "float64" and tcfg.get("amp", False):
        raise ValueError("trainer.amp=true runs in half precision: it needs trainer.dtype=float32")
    device = tcfg.get("device", "auto")
    if device != "auto":
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"trainer.device={device!r} is not a device; use auto, cpu, cuda or cuda:N"
            ) from None


def submitit_requeues_on_every_signal() -> Any:
    """Under submitit (``hydra/launcher=slurm``), make SIGTERM and SIGUSR1 requeue the job too.

    submitit checkpoints the launcher's call and requeues the job (``scontrol requeue``) on its own
    signal only (SIGUSR2, sent ``signal_delay_s`` before the time limit or on preemption where
    Slurm is told to); SIGTERM, what Slurm sends a job it preempts or cancels, it only logs.
    The trainer calls the handler it found for a signal once ``last.pt`` is written, so pointing
    SIGTERM / SIGUSR1 at submitit's requeueing handler makes a preempted job come back too, in its
    own run directory. Returns a function restoring the previous handlers (a no-op outside
    submitit or outside the main thread).
    """
    try:
        from submitit import JobEnvironment
        from submitit.core.job_environment import SignalHandler
    except ImportError:
        return lambda: None
    try:
        handler = getattr(signal.getsignal(JobEnvironment._usr_sig()), "__self__", None)
    except (ValueError, AttributeError):  # not the main thread / another submitit
        return lambda: None
    if not isinstance(handler, SignalHandler):
        return lambda: None
    previous = {}
    for name in ("SIGTERM", "SIGUSR1"):
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, handler.checkpoint_and_try_requeue)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
