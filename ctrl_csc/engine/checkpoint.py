"""Checkpoints: one file, written atomically, loaded without unpickling arbitrary objects.

A checkpoint is a plain dictionary saved with ``torch.save`` (the trainer's ``state_dict``)::

    {"format": "ctrl_csc.checkpoint/1", "step": int,   # optimiser steps taken
     "models": {"encoder": state_dict, "decoder": state_dict},
     "optimizers": {name: state_dict}, "schedulers": {name: state_dict},
     "scaler": {...},          # the AMP grad scaler's state ({} when it is disabled)
     "rng": {"torch": ByteTensor, "numpy": {...}, "python": [...], "cuda": [ByteTensor, ...]},
     "rng_ranks": [rng, ...],  # under torchrun only: every rank's "rng", by rank
     "config": {...},          # the resolved run configuration, plain containers only
     "fingerprint": str,       # config_fingerprint(config)
     "metrics": {...}}         # last logged values, plain floats

There is no epoch key: a resumed run derives its epoch and its position inside it from ``step``
and the number of batches per epoch.

It is read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and
dicts only, so a file carrying a pickled object payload is refused instead of executed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
import random
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrl_csc.models.specs import CONFIG_SHAPE_KEYS

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "load_module_state",
    "find_latest_checkpoint",
    "FINGERPRINT_SECTIONS",
    "config_fingerprint",
    "fingerprint_diff",
]

CHECKPOINT_FORMAT = "ctrl_csc.checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe or of another architecture."""


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename).

    A save that fails (disk full, ``kill -9``) leaves the previous file as it was; a failure
    the process sees is a :class:`CheckpointError` naming the file. Temporary files left by a
    killed save of the same name are removed by the next successful one."""
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, **state}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # a killed save's
            stale.unlink(missing_ok=True)
    except OSError as e:  # disk full, quota, read-only or vanished folder: the old file stays
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        kept = " (the previous one is intact)" if path.is_file() else ""
        raise CheckpointError(
            f"could not write checkpoint {str(path)!r}{kept}: {e.strerror or e}. Free space "
            "there or choose another run directory (hydra.run.dir=PATH)"
        ) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, refusing anything unsafe or damaged."""
    path = Path(path)
    if path.is_dir():
        inside = path / "checkpoints" / "last.pt"
        hint = f"; did you mean {str(inside)!r}?" if inside.is_file() else ""
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a directory, not a checkpoint file: give the path of "
            f"a .pt file to `checkpoint=` / `trainer.resume=`{hint}"
        )
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist (check `checkpoint=` / `trainer.resume=`)"
        )
    try:
        with warnings.catch_warnings():  # torch's advice to retry with weights_only=False: no
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        what = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line.upper()]
        if "Weights only load failed" not in str(e) or not what:
            raise _unreadable(path, e) from None
        raise CheckpointError(
            f"checkpoint {str(path)!r} carries a pickled object payload, which is refused: only "
            f"tensors and plain containers are loaded (weights_only=True), nothing in it was run"
            f" ({what[0]}). Use a checkpoint written by ctrl-csc-train, or a .safetensors release"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch.load of a foreign or damaged file raises anything
        raise _unreadable(path, e) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a ctrl_csc checkpoint (format {found!r}, expected "
            f"{CHECKPOINT_FORMAT!r}); give a checkpoint written by ctrl-csc-train to "
            "`checkpoint=` / `trainer.resume=`"
        )
    return state


def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = lines[0].split(". ")[0] if lines else "no details"
    if isinstance(e, zipfile.BadZipFile | EOFError) or "zip archive" in detail:
        what = "is truncated or corrupted"
    elif any("Unsupported operand" in line for line in lines):
        what = "is not a file written by torch.save (a plain pickle or another kind of file)"
        detail = "refused, nothing in it was run"
    else:
        what = "is not a torch checkpoint, or is truncated or corrupted,"
    return CheckpointError(
        f"checkpoint {str(path)!r} {what} and cannot be read ({type(e).__name__}: {detail}); "
        "give another file to `checkpoint=` / `trainer.resume=` (the run's earlier step_*.pt or "
        "last.pt)"
    )


def rng_state() -> dict:
    """Every random generator's state as tensors and plain containers (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def load_module_state(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str
) -> None:
    """``module.load_state_dict(state)`` with an error that says which keys differ."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        shapes = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ]
        parts = []
        if missing:
            parts.append(f"missing in checkpoint: {_clip(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_clip(unexpected)}")
        if shapes:
            parts.append(f"different shapes: {_clip(shapes)}")
        detail = "; ".join(parts) or str(e).splitlines()[0]
        raise CheckpointError(
            f"the checkpoint's {name} does not match the configured architecture ({detail}). "
            "Use the `model=` the checkpoint was trained with (it is stored in its config)."
        ) from None


def _clip(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def find_latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The most recently written ``checkpoints/last.pt`` below ``root`` (a run or sweep folder)."""
    root = Path(root)
    if not root.exists():
        return None
    found = [p for p in root.rglob("last.pt") if p.parent.name == "checkpoints"]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


#: The parts of a run configuration that determine the model and its training: a checkpoint
#: continues only a run whose values of these agree (``trainer.resume_strict``).
FINGERPRINT_SECTIONS = ("model", "loss", "optim", "dataset", "seed")
#: Keys inside those sections (and what lies under them) left out: where the data are, not what
#: they are; and the csc_ctrl_* configs' shape keys, which determine the model only through
#: model.encoder / model.decoder, fingerprinted resolved (so runs saved before the configs had
#: them still resume).
_NOT_FINGERPRINTED = (
    "dataset.root",
    "dataset.download",
    *(f"model.{k}" for k in CONFIG_SHAPE_KEYS),
)


def _fingerprinted_key(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in _NOT_FINGERPRINTED)


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif _fingerprinted_key(prefix):
        out[prefix] = value
    return out


def _fingerprinted(config: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section in FINGERPRINT_SECTIONS:
        if section in config:
            _flatten(config[section], section, out)
    return out


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 of the run configuration's :data:`FINGERPRINT_SECTIONS` (model, loss, optimiser,
    dataset, seed), as stored in every checkpoint."""
    text = json.dumps(_fingerprinted(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: checkpoint A, now B"`` for every fingerprinted key whose value differs."""
    a, b = _fingerprinted(stored), _fingerprinted(current)
    absent = "<absent>"
    return [
        f"{k}: checkpoint {a.get(k, absent)!r}, now {b.get(k, absent)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, absent) != b.get(k, absent)
    ]
