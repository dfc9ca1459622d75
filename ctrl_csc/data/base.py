"""Dataset classes shared by the registry's builders and the helpers that make their errors clear.

Every dataset built here yields ``(image, label)`` with ``image`` a float32 tensor ``(C, H, W)`` in
``[-1, 1]`` and ``label`` a python ``int``, and exposes ``classes`` (list of names) and
``num_classes``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import ImageTransform, read_image

log = logging.getLogger(__name__)

__all__ = [
    "ArrayImageDataset",
    "ImageFileDataset",
    "IMAGE_EXTENSIONS",
    "scan_class_folders",
    "scan_images",
    "stratified_split",
    "run_download",
    "missing_data_error",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class LabelledDataset(Dataset):
    """A dataset of ``(image, label)`` with a ``classes`` list (set by subclasses)."""

    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ArrayImageDataset(LabelledDataset):
    """Images held in a uint8 array (in memory or memory-mapped) with integer labels.

    Args:
        images: uint8 array ``(N, H, W)`` (grey) or ``(N, H, W, C)`` (C = 1 or 3).
        labels: integer array ``(N,)``.
        classes: class names; ``num_classes = len(classes)``.
        transform: PIL image -> tensor ``(C', S, S)`` in ``[-1, 1]``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        classes: Sequence[str],
        transform: ImageTransform,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 (N,H,W[,C]), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return self.transform(Image.fromarray(np.ascontiguousarray(image))), int(self.labels[index])


class ImageFileDataset(LabelledDataset):
    """Image files on disk with integer labels (ImageFolder trees, CelebA, LSUN exports).

    Args:
        samples: ``(path, label)`` pairs.
        classes: class names; ``num_classes = len(classes)``.
        transform: PIL image -> tensor ``(C, S, S)`` in ``[-1, 1]`` (it converts the mode).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        transform: ImageTransform,
    ) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return read_image(path, path, self.transform), int(label)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_images(directory: Path, recursive: bool) -> list[str]:
    """Sorted paths of the image files in ``directory`` (and its sub-folders if ``recursive``)."""
    if recursive:
        found = [
            os.path.join(dirpath, f)
            for dirpath, _, files in os.walk(directory, followlinks=True)
            for f in files
            if _is_image(f)
        ]
    else:
        found = [e.path for e in os.scandir(directory) if e.is_file() and _is_image(e.name)]
    return sorted(found)


def scan_class_folders(directory: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, classes)`` of a folder of class folders (images searched recursively in each).

    ``classes`` are the sub-folder names in sorted order (labels are their indices, as in
    torchvision's ``ImageFolder``; hidden folders are ignored). A class folder without images is
    an error (skipping it would shift every later label, differently per split). A folder with
    no sub-folders but images directly inside is one class named after the folder.
    """
    subdirs = sorted(e.name for e in os.scandir(directory) if e.is_dir() and e.name[0] != ".")
    classes: list[str] = []
    samples: list[tuple[str, int]] = []
    for name in subdirs:
        files = scan_images(directory / name, recursive=True)
        if not files:
            raise FileNotFoundError(
                f"dataset.root: the class folder {str(directory / name)!r} holds no images "
                f"(files ending {', '.join(IMAGE_EXTENSIONS)}); add its images or remove the "
                "folder (the sorted class-folder names are the labels)"
            )
        samples.extend((f, len(classes)) for f in files)
        classes.append(name)
    if not classes:
        files = scan_images(directory, recursive=False)
        if files:
            classes = [directory.name]
            samples = [(f, 0) for f in files]
    return samples, classes


def stratified_split(
    labels: np.ndarray, test_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic, class-balanced ``(train_idx, test_idx)`` of ``len(labels)`` samples.

    Samples are shuffled by a permutation drawn from ``seed``, then ordered by their rank within
    their class relative to the class size, so that the first ``test_size`` of that order hold
    every class in proportion to its size; those are the test set. Both index arrays are sorted.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be in (0, {n}), got {test_size}")
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = labels[perm]
    rank = np.empty(n, dtype=np.float64)
    for c in np.unique(shuffled):
        where = np.flatnonzero(shuffled == c)
        rank[where] = (np.arange(len(where)) + 0.5) / len(where)
    order = perm[np.argsort(rank, kind="stable")]
    return np.sort(order[test_size:]), np.sort(order[:test_size])


def missing_data_error(
    dataset: str, root: Path, expected: str, how_to_get: str
) -> FileNotFoundError:
    """Error for data missing under ``root``: which dataset, where, what layout, how to get it."""
    return FileNotFoundError(
        f"dataset={dataset}: no data found under dataset.root={str(root)!r}.\n"
        f"Expected layout:\n{expected}\n{how_to_get}\n"
        "(Point dataset.root at the folder that holds it, or set the CTRL_CSC_DATA environment "
        "variable to the parent of per-dataset folders.)"
    )


def run_download(dataset: str, root: Path, fetch: Callable[[], object], manual: str) -> None:
    """Run a torchvision download ``fetch()``; turn network/IO failures into one clear error.

    ``manual`` says how to get the files by hand (the URL and where to put them).
    """
    log.info("downloading %s into %s", dataset, root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fetch()
    except (URLError, OSError, RuntimeError, ImportError) as e:
        reason = getattr(e, "reason", None) or e
        raise RuntimeError(
            f"dataset={dataset}: downloading into dataset.root={str(root)!r} failed ({reason}). "
            "This machine may have no network access (or the mirror is down). "
            f"Get the files by hand instead: {manual} "
            "Then set dataset.download=false."
        ) from e
