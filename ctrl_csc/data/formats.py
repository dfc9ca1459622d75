"""Readers of the published on-disk formats of the real datasets.

torchvision's CIFAR-10, STL-10 and CelebA classes refuse files whose MD5 differs from the
published archive (and its LSUN class writes a key cache into the working directory), so the
formats are read here directly; torchvision is still used to *download* them, after which these
readers load the very same files. MNIST's idx files are read by torchvision itself (it checks only
that they exist).
"""

from __future__ import annotations

import csv
import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import ImageTransform, read_image

__all__ = [
    "CIFAR10_FILES",
    "CIFAR10_CLASSES",
    "read_cifar10",
    "STL10_FILES",
    "STL10Binary",
    "read_celeba_partition",
    "read_celeba_attributes",
    "LMDBImageDataset",
]

# ---------------------------------------------------------------------------------------- CIFAR-10
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain data only: the CIFAR batches hold dicts, lists, str/bytes, ints and
    numpy arrays. Any other global a pickle names (``os.system``, ``builtins.eval``, ...) is
    refused before it is looked up, so a hostile data file cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 2 pickles of bytes spell them
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never does")


def _load_pickle(path: Path):
    with open(path, "rb") as f:
        return _CifarUnpickler(f, encoding="latin1").load()


def read_cifar10(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read the python-pickle CIFAR-10 batches in ``folder`` (``cifar-10-batches-py``).

    Each batch is a pickled dict with ``data`` (uint8 ``(n, 3072)``, rows = R, G, B planes of
    32x32) and ``labels`` (list of n ints); ``batches.meta`` holds ``label_names``.

    Returns: ``images`` uint8 ``(N, 32, 32, 3)``, ``labels`` int64 ``(N,)``, class names.
    """
    images, labels = [], []
    for name in CIFAR10_FILES[split]:
        try:
            entry = _load_pickle(folder / name)
            data = np.asarray(entry["data"], dtype=np.uint8)
        except (EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
            why = str(e) if isinstance(e, pickle.UnpicklingError) else type(e).__name__
            raise ValueError(
                f"{folder / name} is truncated or is not a CIFAR-10 batch ({why}); "
                "extract cifar-10-python.tar.gz there again (or delete the folder and set "
                "dataset.download=true)"
            ) from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{folder / name} is not a CIFAR-10 batch: its data has shape {data.shape}, "
                "expected (n, 3072)"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    classes = CIFAR10_CLASSES
    meta = folder / "batches.meta"
    if meta.is_file():
        try:
            classes = [str(c) for c in _load_pickle(meta)["label_names"]]
        except (EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{meta} is not CIFAR-10's batches.meta ({e}); extract cifar-10-python.tar.gz "
                "there again"
            ) from None
    return np.ascontiguousarray(np.concatenate(images)), np.asarray(labels, np.int64), classes


# ------------------------------------------------------------------------------------------ STL-10
STL10_FILES = {
    "train": [("train_X.bin", "train_y.bin")],
    "test": [("test_X.bin", "test_y.bin")],
    "unlabeled": [("unlabeled_X.bin", None)],
    "train+unlabeled": [("train_X.bin", "train_y.bin"), ("unlabeled_X.bin", None)],
}
_STL_IMAGE_BYTES = 3 * 96 * 96


class STL10Binary(Dataset):
    """STL-10 from its binary files (``stl10_binary/*_X.bin``, ``*_y.bin``), memory-mapped.

    ``*_X.bin`` holds uint8 images of 3x96x96, each stored channel by channel in column-major
    order; ``*_y.bin`` holds one uint8 label in 1..10 per image. Unlabelled images get label -1
    (torchvision's convention). The memory maps are opened lazily, per process, so the dataset
    pickles cheaply into DataLoader workers.

    Items: ``(image (C, S, S) float32 in [-1, 1], label int)``.
    """

    def __init__(
        self,
        folder: Path,
        parts: list[tuple[str, str | None]],
        classes: list[str],
        transform: ImageTransform,
    ) -> None:
        self.folder = Path(folder)
        self.classes = list(classes)
        self.transform = transform
        self.files: list[str] = []
        labels, counts = [], []
        for x_name, y_name in parts:
            size = os.path.getsize(self.folder / x_name)
            if size % _STL_IMAGE_BYTES:
                raise ValueError(
                    f"{self.folder / x_name} is not an STL-10 image file: its size {size} is not "
                    f"a multiple of {_STL_IMAGE_BYTES} (3x96x96 bytes)"
                )
            n = size // _STL_IMAGE_BYTES
            if y_name is None:
                y = np.full(n, -1, dtype=np.int64)
            else:
                y = np.fromfile(self.folder / y_name, dtype=np.uint8).astype(np.int64) - 1
                if len(y) != n:
                    raise ValueError(f"{self.folder / y_name} has {len(y)} labels for {n} images")
            self.files.append(x_name)
            labels.append(y)
            counts.append(n)
        self.labels = np.concatenate(labels)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self._maps: list[np.ndarray] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = None
        return state

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self._maps is None:
            self._maps = [
                np.memmap(self.folder / f, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
                for f in self.files
            ]
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        raw = self._maps[part][index - self.offsets[part]]  # (C, W, H): column-major planes
        image = Image.fromarray(np.ascontiguousarray(raw.transpose(2, 1, 0)))
        return self.transform(image), int(self.labels[index])


# ------------------------------------------------------------------------------------------ CelebA
def _read_rows(path: Path) -> list[list[str]]:
    """Rows of a CelebA list file: space-separated ``.txt`` or comma-separated ``.csv`` (Kaggle)."""
    with open(path, newline="") as f:
        if path.suffix == ".csv":
            return [row for row in csv.reader(f) if row]
        return [row for row in csv.reader(f, delimiter=" ", skipinitialspace=True) if row]


def read_celeba_partition(path: Path) -> tuple[list[str], np.ndarray]:
    """``(file names, partition)`` from ``list_eval_partition.txt`` (``000001.jpg 0`` per line) or
    its Kaggle ``.csv`` form (header ``image_id,partition``); partition 0 train, 1 valid, 2 test."""
    rows = _read_rows(path)
    if rows and not rows[0][-1].strip().lstrip("-").isdigit():
        rows = rows[1:]  # header
    names = [r[0] for r in rows]
    part = np.asarray([int(r[1]) for r in rows], dtype=np.int64)
    return names, part


def read_celeba_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(attribute names, file names, values in {0, 1} (N, 40))`` from ``list_attr_celeba.txt``
    (count line, names line, then ``000001.jpg -1 1 ...``) or its Kaggle ``.csv`` form."""
    rows = _read_rows(path)
    if path.suffix == ".csv":
        header, rows = rows[0][1:], rows[1:]
    else:
        header, rows = rows[1], rows[2:]
    names = [r[0] for r in rows]
    values = [[int(v) for v in r[1:] if v] for r in rows]
    values = (np.asarray(values, dtype=np.int64).reshape(len(rows), -1) + 1) // 2
    return [h for h in header if h], names, values


# -------------------------------------------------------------------------------------------- LMDB
class LMDBImageDataset(Dataset):
    """Images stored as encoded bytes (JPEG/WebP) in an LMDB database, e.g. LSUN's
    ``bedroom_train_lmdb``; every image gets the same ``label``.

    The key list is read once at construction; the environment is (re)opened lazily in each
    process, so the dataset pickles into DataLoader workers. Needs the ``lmdb`` package.
    """

    def __init__(
        self, path: Path, classes: list[str], transform: ImageTransform, label: int = 0
    ) -> None:
        import lmdb

        self.path = str(path)
        self.classes = list(classes)
        self.transform = transform
        self.label = int(label)
        env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False)
        try:
            with env.begin(write=False) as txn:
                self.keys = list(txn.cursor().iternext(keys=True, values=False))
        finally:
            env.close()
        self._env = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_env"] = None
        return state

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._env is None:
            import lmdb

            self._env = lmdb.open(
                self.path, readonly=True, lock=False, readahead=False, meminit=False
            )
        with self._env.begin(write=False) as txn:
            buf = txn.get(self.keys[index])
        name = f"{self.path}[{self.keys[index]!r}]"
        return read_image(io.BytesIO(buf), name, self.transform), self.label
