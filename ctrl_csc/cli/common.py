"""What both Hydra entry points share: where the configs live and how objects are built."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset

from ctrl_csc.cli.guard import DECODERS, ENCODERS, UnsafeConfigError, checked_entry, plain_config
from ctrl_csc.engine.checkpoint import CheckpointError
from ctrl_csc.engine.trainer import NonFiniteObjectiveError

log = logging.getLogger("ctrl_csc")

__all__ = [
    "config_dir",
    "build_models",
    "build_datasets",
    "check_data_fits_model",
    "seed_all",
    "to_container",
    "check_writable",
    "seeded_subset",
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
        log.error("%s", e)
        raise SystemExit(EXIT_USER_ERROR) from None


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


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved configuration as plain dicts/lists/scalars (what checkpoints store)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def build_models(
    model_cfg: DictConfig | dict,
    device: torch.device | str = "cpu",
    source: str | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(encoder, decoder)`` from a model config (its ``encoder``/``decoder`` entries).

    Only this project's encoder and decoder classes are built, with keyword arguments checked
    against their signatures (:mod:`ctrl_csc.cli.guard`). ``source`` names the file a stored
    config came from (a checkpoint or release): its ``${...}`` interpolations are refused instead
    of resolved. Without it the config is the user's own Hydra config and is resolved first.
    """
    where = source or f"the model config (model={_name_of(model_cfg)})"
    cfg = plain_config(model_cfg, source)
    if not isinstance(cfg, dict):
        raise UnsafeConfigError(f"{where}: the model config is not a mapping")
    for part in ("encoder", "decoder"):
        if part not in cfg:
            raise ValueError(f"the model config has no `{part}` entry (model={cfg.get('name')})")
    built = []
    for part, allowed in (("encoder", ENCODERS), ("decoder", DECODERS)):
        cls, kwargs = checked_entry(cfg[part], allowed, f"model.{part}", where)
        built.append(cls(**kwargs).to(device))
    return built[0], built[1]


def _name_of(model_cfg) -> str:
    try:
        return str(model_cfg.get("name"))
    except Exception:  # noqa: BLE001 - only for the message
        return "?"


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
