"""Released models: load them by name or path, export a training checkpoint as a release.

Release format (``*.safetensors``): the tensors of both players under ``encoder.<key>`` and
``decoder.<key>`` (their ``state_dict`` keys), and in the file's metadata

* ``format``: ``ctrl_csc.release/1``,
* ``config``: the resolved run configuration as JSON (``model``, ``dataset``, ``loss``, ...),
* ``metrics``: the run's final metrics as JSON.

safetensors holds raw tensors only, so loading executes nothing, and the stored config builds
only this project's model classes (:mod:`ctrl_csc.pretrained.guard`: any other ``_target_``,
Hydra key or ``${...}`` interpolation in the file is refused before anything is built).
``load_pretrained`` also accepts a training checkpoint (``checkpoints/last.pt``), read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ctrl_csc.engine.checkpoint import CheckpointError, load_checkpoint, load_module_state
from ctrl_csc.models import Autoencoder

__all__ = ["RELEASE_FORMAT", "PRETRAINED", "export_release", "load_pretrained", "read_release"]

RELEASE_FORMAT = "ctrl_csc.release/1"
_HERE = Path(__file__).resolve().parent
PRETRAINED: dict[str, Path] = {
    "quickstart": _HERE / "quickstart.safetensors",  # digits: bare ctrl-csc-train
    "photos": _HERE / "photos.safetensors",  # natural images: ctrl-csc-train experiment=photos_mini
}


def export_release(
    checkpoint: str | os.PathLike,
    path: str | os.PathLike,
    metrics: dict[str, float] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the weights and config of a training checkpoint as a release file.

    ``dtype`` (e.g. ``torch.float16``) stores floating-point tensors in that type to halve the
    file; :func:`load_pretrained` loads them back into the model's own (float32) parameters.
    """
    from safetensors.torch import save_file

    state = load_checkpoint(checkpoint)
    tensors = {
        f"{part}.{k}": (
            v.to(dtype) if dtype is not None and v.is_floating_point() else v
        ).contiguous()
        for part in ("encoder", "decoder")
        for k, v in state["models"][part].items()
    }
    meta = {
        "format": RELEASE_FORMAT,
        "config": json.dumps(state["config"]),
        "metrics": json.dumps(metrics if metrics is not None else state.get("metrics", {})),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def read_release(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """``(state_dicts {"encoder", "decoder"}, config, metrics)`` of a release file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"release file {str(path)!r} is truncated or corrupted ({e})"
        ) from None
    if meta.get("format") != RELEASE_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a ctrl_csc release (metadata format "
            f"{meta.get('format')!r}, expected {RELEASE_FORMAT!r})"
        )
    states: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "decoder": {}}
    for k, v in tensors.items():
        part, _, key = k.partition(".")
        if part not in states:
            raise CheckpointError(f"release file {str(path)!r} has an unexpected tensor {k!r}")
        states[part][key] = v
    return states, json.loads(meta["config"]), json.loads(meta.get("metrics", "{}"))


def load_pretrained(
    path_or_name: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[Autoencoder, dict[str, Any]]:
    """Build the model a release (or training checkpoint) was trained as and load its weights.

    Args:
        path_or_name: a name from :data:`PRETRAINED` (``"quickstart"``), a ``.safetensors``
            release, or a training checkpoint ``.pt``.
        device: where to put the model.

    Returns:
        ``(model, config)``: an :class:`~ctrl_csc.models.Autoencoder` (``.encoder``,
        ``.decoder``; ``model(x)`` gives ``(z, x̂)``) in eval mode and the run's resolved config.
    """
    from ctrl_csc.pretrained.guard import (
        build_models,
        check_config_against_tensors,
        check_stored_config,
    )

    name = str(path_or_name)
    path = PRETRAINED.get(name, Path(name))
    if not path.is_file():
        raise CheckpointError(
            f"no pretrained model {name!r}: give a path to a .safetensors "
            f"release or a .pt checkpoint, or one of {sorted(PRETRAINED)}"
        )
    if path.suffix == ".safetensors":
        states, config, _ = read_release(path)
    else:
        ckpt = load_checkpoint(path)
        states, config = ckpt["models"], ckpt["config"]
    source = f"{str(path)!r}"
    config = check_stored_config(config, source)  # before anything is built from it
    check_config_against_tensors(config["model"], states, source)  # before anything is allocated
    encoder, decoder = build_models(config["model"], device, source=source)
    load_module_state(encoder, states["encoder"], "encoder")
    load_module_state(decoder, states["decoder"], "decoder")
    return Autoencoder(encoder, decoder).to(device).eval(), config
