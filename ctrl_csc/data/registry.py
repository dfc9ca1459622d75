"""The dataset registry: ``name -> builder`` with each dataset's defaults, and ``build_dataset``.

A builder is registered with :func:`register_dataset` and is called by :func:`build_dataset` with
the keyword arguments ``split, root, image_size, download, flip, seed`` (plus ``channels`` for a
dataset whose channel count is a setting) and the dataset's own options. The builder of an
*embedded* dataset (its data ships with an installed package) takes neither ``root`` nor
``download``: it reads no files of the user's and has nothing to fetch, so :func:`build_dataset`
refuses a ``root`` for it and drops ``download`` (``dataset.download=true`` is harmless there: the
data is always present). Everything user-facing (unknown name, split, option, channel count,
class count, root) is checked here once, with messages that name the setting to change.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

__all__ = ["DatasetEntry", "DATASETS", "register_dataset", "build_dataset", "dataset_info"]

# Keyword arguments build_dataset passes to every builder (not user options); an embedded
# dataset's builder takes only _EMBEDDED_COMMON (no files to read, nothing to download).
_COMMON = ("split", "root", "image_size", "download", "flip", "seed")
_EMBEDDED_COMMON = ("split", "image_size", "flip", "seed")


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset.

    Attributes:
        name: registry name (the ``dataset=<name>`` setting).
        builder: the function that builds it (see the module docstring).
        channels: image channels it yields; ``None`` when ``channels`` is a setting of the dataset.
        image_size: default side of the square images.
        num_classes: number of label values; ``None`` when it depends on the data on disk.
        splits: the accepted ``split`` values.
        train_splits: the splits that augmentation applies to (never to evaluation splits).
        augmentable: whether ``augment=True`` makes sense (random horizontal flips: natural
            images yes, digits no).
        embedded: whether the data ships with an installed package (no ``root``, no download).
        description: one line for listings.
    """

    name: str
    builder: Callable[..., Dataset]
    channels: int | None
    image_size: int
    num_classes: int | None
    splits: tuple[str, ...] = ("train", "test")
    train_splits: tuple[str, ...] = ("train",)
    augmentable: bool = True
    embedded: bool = False
    description: str = ""

    def __call__(self, **kwargs) -> Dataset:
        return self.builder(**kwargs)

    @property
    def options(self) -> tuple[str, ...]:
        """Names of the dataset-specific keyword options its builder accepts."""
        params = inspect.signature(self.builder).parameters
        return tuple(p for p in params if p not in _COMMON)


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str,
    *,
    channels: int | None,
    image_size: int,
    num_classes: int | None,
    splits: tuple[str, ...] = ("train", "test"),
    train_splits: tuple[str, ...] = ("train",),
    augmentable: bool = True,
    embedded: bool = False,
    description: str = "",
) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator adding a builder to :data:`DATASETS` under ``name`` (see :class:`DatasetEntry`)."""

    def decorate(builder: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        params = inspect.signature(builder).parameters
        missing = [p for p in (_EMBEDDED_COMMON if embedded else _COMMON) if p not in params]
        if missing:
            raise TypeError(f"builder of {name!r} must accept {missing}")
        extra = [p for p in _COMMON if embedded and p in params and p not in _EMBEDDED_COMMON]
        if extra:
            raise TypeError(
                f"builder of embedded dataset {name!r} must not accept {extra}: an embedded "
                "dataset reads no root and downloads nothing"
            )
        DATASETS[name] = DatasetEntry(
            name=name,
            builder=builder,
            channels=channels,
            image_size=image_size,
            num_classes=num_classes,
            splits=tuple(splits),
            train_splits=tuple(train_splits),
            augmentable=augmentable,
            embedded=embedded,
            description=description,
        )
        return builder

    return decorate


def _entry(name: str) -> DatasetEntry:
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(DATASETS))
        raise ValueError(
            f"unknown dataset {name!r} (the setting dataset={name}); valid names: {valid}"
        ) from None


def dataset_info(name: str) -> dict:
    """Defaults of dataset ``name``: ``dict(channels=, image_size=, num_classes=)``.

    ``channels`` / ``num_classes`` may be ``None`` where they depend on settings or data
    (``imagefolder``: channels default 3, classes = the folders found).
    """
    e = _entry(name)
    channels = e.channels if e.channels is not None else 3
    return dict(channels=channels, image_size=e.image_size, num_classes=e.num_classes)


def default_root(name: str) -> Path:
    """``$CTRL_CSC_DATA/<name>`` (``data/<name>`` when the variable is unset), as the configs do."""
    return Path(os.environ.get("CTRL_CSC_DATA", "data")) / name


def build_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    download: bool = False,
    augment: bool = False,
    seed: int = 0,
    **options,
) -> Dataset:
    """Build a registered dataset of ``(image, label)`` pairs.

    Args:
        name: registry name (see :data:`DATASETS`).
        split: ``"train"`` or ``"test"``, or another split the dataset has (``stl10``:
            ``"unlabeled"``, ``"train+unlabeled"``; ``celeba``: ``"valid"``, ``"all"``; ...).
        root: folder holding the data; ``None`` means ``$CTRL_CSC_DATA/<name>`` (``data/<name>``
            if unset). Embedded datasets take no root.
        image_size: side of the square output images; ``None`` = the dataset's default.
        download: fetch the data with torchvision if it is missing (where that is possible).
            Ignored for embedded datasets, whose data is always present.
        augment: random horizontal flips on the training split(s) of natural-image datasets; the
            test split is never augmented.
        seed: seed of the deterministic train/test split and sampling of the embedded datasets.
        **options: dataset-specific options (see ``DATASETS[name].options``), plus the
            informational config keys ``channels`` and ``num_classes``, which are checked against
            the dataset (``channels`` is a real setting for ``imagefolder``).

    Returns:
        A ``Dataset`` whose items are ``(image, label)``: ``image`` float32 ``(C, S, S)`` in
        ``[-1, 1]`` with ``S = image_size``, ``label`` an ``int``. It has ``classes`` and
        ``num_classes`` attributes.
    """
    entry = _entry(name)
    if split not in entry.splits:
        raise ValueError(
            f"split={split!r} is not a split of dataset={name}; valid splits: "
            + ", ".join(entry.splits)
        )
    channels = options.pop("channels", None)
    num_classes = options.pop("num_classes", None)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        valid = [o for o in entry.options if o != "channels"]
        raise ValueError(
            f"unknown option(s) {', '.join('dataset.' + o for o in unknown)} for dataset={name}; "
            + (f"its options are: {', '.join(valid)}" if valid else "it has no options")
        )

    if entry.channels is None:
        if channels is not None:
            options["channels"] = int(channels)
    elif channels is not None and int(channels) != entry.channels:
        raise ValueError(
            f"dataset.channels={channels} but dataset={name} has {entry.channels}-channel "
            f"images; set dataset.channels={entry.channels} (and use a model that takes "
            f"{entry.channels}-channel images)"
        )

    size = entry.image_size if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"dataset.image_size must be a positive integer, got {image_size!r}")

    if augment and not entry.augmentable:
        raise ValueError(
            f"dataset.augment=true is not available for dataset={name} (horizontal flips would "
            "change what digits mean); set dataset.augment=false"
        )

    if entry.embedded:
        if root is not None:
            raise ValueError(
                f"dataset={name} is embedded in an installed package and reads no files; "
                f"set dataset.root=null (got {str(root)!r})"
            )
        files = {}  # nothing to read or fetch: `download` does not apply
    else:
        root_path = Path(root).expanduser() if root is not None else default_root(name)
        files = dict(root=root_path, download=bool(download))

    dataset = entry.builder(
        split=split,
        image_size=size,
        flip=bool(augment) and split in entry.train_splits,
        seed=int(seed),
        **files,
        **options,
    )

    found = getattr(dataset, "num_classes", None)
    if num_classes is not None and found is not None and int(num_classes) != found:
        raise ValueError(
            f"dataset.num_classes={num_classes} but dataset={name} (split={split}) has "
            f"{found} classes; set dataset.num_classes={found}"
        )
    return dataset
