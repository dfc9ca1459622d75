"""Datasets: a registry of builders yielding ``(image (C, H, W) float32 in [-1, 1], label int)``.

    from ctrl_csc.data import build_dataset, DATASETS, dataset_info
    train = build_dataset("cifar10", split="train", root="data/cifar10", augment=True)
    test = build_dataset("mnist5k", split="test")          # embedded: no download, no root
    dataset_info("stl10")  # {'channels': 3, 'image_size': 48, 'num_classes': 10}

Real datasets (``mnist``, ``cifar10``, ``stl10``, ``celeba``, ``lsun_bedroom``, ``imagenet``,
``imagefolder``) are in :mod:`ctrl_csc.data.real`; embedded ones (``mnist5k``, ``digits``,
``natural_patches``) in :mod:`ctrl_csc.data.embedded`. Configs: ``conf/dataset/<name>.yaml``.
"""

from . import embedded, real  # noqa: F401  (register the datasets)
from .base import ArrayImageDataset, ImageFileDataset
from .registry import DATASETS, DatasetEntry, build_dataset, dataset_info, register_dataset
from .transforms import ImageTransform

__all__ = [
    "DATASETS",
    "DatasetEntry",
    "build_dataset",
    "dataset_info",
    "register_dataset",
    "ImageTransform",
    "ArrayImageDataset",
    "ImageFileDataset",
]
