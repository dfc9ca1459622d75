"""The composed model config of a ``conf/model`` file, for tests that build one model.

The ``csc_ctrl_*`` files start from ``conf/model/csc/base.yaml`` through a Hydra defaults list,
so they are composed (not read with ``OmegaConf.load``)."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import ctrl_csc.models  # noqa: F401 - registers the configs' resolvers
from ctrl_csc.cli.common import config_dir


def compose_model(name: str, channels: int, image_size: int) -> DictConfig:
    """The run config of ``model=name`` on images of ``channels`` × ``image_size``²: its
    ``model`` entry, unresolved (``${dataset.channels}`` and the stage lists resolve on use)."""
    size = f"dataset.image_size={image_size}"
    overrides = [f"model={name}", f"dataset.channels={channels}", size]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=overrides).model
