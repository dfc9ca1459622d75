"""The real datasets of the paper's experiments, read from their published files.

MNIST, CIFAR-10, STL-10, CelebA, LSUN-bedroom, ImageNet (ImageFolder layout) and any folder of
class folders.

Default sizes follow the CTRL / CSC-CTRL experiments:
- ``mnist`` 32 px: the CTRL reference code resizes MNIST's 28x28 digits to 32x32 so that MNIST and
  CIFAR-10 share the 32-px architectures (two or three stride-2 stages divide 32 evenly, not 28).
- ``cifar10`` 32 px, native.
- ``stl10`` 48 px: STL-10's 96x96 downsampled by two, the size SNGAN-style CTRL backbones use.
- ``celeba`` 64 px (128 by ``image_size=128``): centre crop 140 of the 178x218 aligned faces, then
  resize — the usual GAN/CTRL preprocessing.
- ``lsun_bedroom``, ``imagenet`` 128 px: shorter side resized to 128, centre crop.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .base import (
    ArrayImageDataset,
    ImageFileDataset,
    missing_data_error,
    run_download,
    scan_class_folders,
    scan_images,
)
from .formats import (
    CIFAR10_FILES,
    STL10_FILES,
    LMDBImageDataset,
    STL10Binary,
    read_celeba_attributes,
    read_celeba_partition,
    read_cifar10,
)
from .registry import register_dataset
from .transforms import ImageTransform

log = logging.getLogger(__name__)

__all__: list[str] = []


def _missing(root: Path, names) -> list[str]:
    return [n for n in names if not (root / n).is_file()]


def _download_archive(url: str, root: str, filename: str, md5: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(url, root, filename=filename, md5=md5)


def _archive_folder(
    name: str, root: Path, download: bool, archive, url: str, needed, layout: str,
    size: str = "", scope: str = "",
) -> Path:  # fmt: skip
    """The folder of a dataset that torchvision fetches as one tar archive (CIFAR-10, STL-10):
    ``root/<archive.base_folder>``, or ``root`` itself when it is that folder. With ``download``,
    missing ``needed`` files are fetched; still missing, a missing-data error lists them.

    ``archive``: the torchvision dataset class (``base_folder``, ``url``, ``filename``,
    ``tgz_md5``); ``layout``: the expected files, shown after the folder in the error; ``size``
    / ``scope``: notes in the manual-download and the missing-files sentences."""
    folder = root / archive.base_folder
    if root.name == archive.base_folder and not folder.is_dir():
        folder = root  # accept e.g. cifar-10-batches-py/ itself
    if _missing(folder, needed) and download:
        run_download(
            name,
            root,
            lambda: _download_archive(
                archive.url, str(root), filename=archive.filename, md5=archive.tgz_md5
            ),
            f"download {url}{size} and extract it in {root}/.",
        )
    missing = _missing(folder, needed)
    if missing:
        raise missing_data_error(
            name,
            root,
            f"  {root / archive.base_folder}/{layout}",
            f"Set dataset.download=true to fetch it with torchvision, or extract {url} "
            f"there. Missing{scope}: {', '.join(missing)}.",
        )
    return folder


# ------------------------------------------------------------------------------------------- MNIST
_MNIST_RAW = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@register_dataset(
    "mnist", channels=1, image_size=32, num_classes=10, augmentable=False,
    description="MNIST handwritten digits (torchvision idx files), 60k train / 10k test",
)  # fmt: skip
def _build_mnist(split, root, image_size, download, flip, seed):
    from torchvision.datasets import MNIST

    if root.name == "MNIST" and (root / "raw").is_dir():
        root = root.parent  # accept the MNIST/ folder itself
    raw = root / "MNIST" / "raw"

    def present() -> bool:
        return not _missing(raw, _MNIST_RAW) or (root / "MNIST" / "processed").is_dir()

    if not present() and download:
        run_download(
            "mnist",
            root,
            lambda: MNIST(str(root), train=True, download=True),
            f"fetch the four *-ubyte.gz files from {MNIST.mirrors[0]} into {raw}/ and set "
            "dataset.download=true once (with the archives present it only extracts them, "
            "offline).",
        )
    if not present():
        raise missing_data_error(
            "mnist",
            root,
            f"  {raw}/{{{','.join(_MNIST_RAW)}}}  (the idx files, un-gzipped)",
            "Set dataset.download=true to fetch it with torchvision (also extracts *.gz archives "
            f"already in {raw}/, offline), or pick the embedded dataset=mnist5k.",
        )
    tv = MNIST(str(root), train=split == "train")
    return ArrayImageDataset(
        tv.data.numpy(),
        tv.targets.numpy(),
        [str(i) for i in range(10)],
        ImageTransform(image_size, mode="L", flip=flip),
    )


# ---------------------------------------------------------------------------------------- CIFAR-10
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


@register_dataset(
    "cifar10", channels=3, image_size=32, num_classes=10,
    description="CIFAR-10 (python pickle batches), 50k train / 10k test",
)  # fmt: skip
def _build_cifar10(split, root, image_size, download, flip, seed):
    from torchvision.datasets import CIFAR10

    folder = _archive_folder(
        "cifar10", root, download, CIFAR10, _CIFAR_URL,
        CIFAR10_FILES["train"] + CIFAR10_FILES["test"],
        "{data_batch_1..5, test_batch, batches.meta}  (CIFAR-10 python version)",
    )  # fmt: skip
    images, labels, classes = read_cifar10(folder, split)
    return ArrayImageDataset(images, labels, classes, ImageTransform(image_size, flip=flip))


# ------------------------------------------------------------------------------------------ STL-10
_STL_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"


@register_dataset(
    "stl10", channels=3, image_size=48, num_classes=10,
    splits=("train", "test", "unlabeled", "train+unlabeled"),
    train_splits=("train", "unlabeled", "train+unlabeled"),
    description="STL-10 (binary files), 5k train (+100k unlabeled) / 8k test, 96 px natively",
)  # fmt: skip
def _build_stl10(split, root, image_size, download, flip, seed, unlabeled: bool = False):
    """``unlabeled=True`` makes split ``train`` mean ``train+unlabeled`` (105k images; the
    unlabelled ones have label -1)."""
    from torchvision.datasets import STL10

    if split == "train" and unlabeled:
        split = "train+unlabeled"
    folder = _archive_folder(
        "stl10", root, download, STL10, _STL_URL,
        sorted({n for x, y in STL10_FILES[split] for n in (x, y) if n is not None}),
        "{train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin, class_names.txt}  "
        "(STL-10 binary version)",
        size=" (2.6 GB)", scope=f" for split={split}",
    )  # fmt: skip
    classes = [str(i) for i in range(10)]
    names_file = folder / "class_names.txt"
    if names_file.is_file():
        classes = [c for c in names_file.read_text().splitlines() if c.strip()]
    return STL10Binary(folder, STL10_FILES[split], classes, ImageTransform(image_size, flip=flip))


# ------------------------------------------------------------------------------------------ CelebA
_CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
_CELEBA_SPLITS = {"train": 0, "valid": 1, "val": 1, "test": 2}


def _celeba_file(base: Path, stem: str) -> Path | None:
    for suffix in (".txt", ".csv"):
        if (base / (stem + suffix)).is_file():
            return base / (stem + suffix)
    return None


@register_dataset(
    "celeba", channels=3, image_size=64, num_classes=1,
    splits=("train", "test", "valid", "val", "all"),
    description="CelebA aligned faces, 163k train / 20k valid / 20k test (label: attribute or 0)",
)  # fmt: skip
def _build_celeba(
    split, root, image_size, download, flip, seed,
    crop_size: int | None = 140, attribute: str | None = None,
):  # fmt: skip
    """``crop_size``: centre crop of the 178x218 aligned faces before resizing (``None``: none).
    ``attribute``: a CelebA attribute name (e.g. ``Male``, ``Smiling``) whose 0/1 value is the
    label (then ``num_classes`` is 2); ``None``: every label is 0 (``num_classes`` 1)."""
    from torchvision.datasets import CelebA

    def locate() -> tuple[Path, Path, Path] | None:
        for base in (root / CelebA.base_folder, root):
            images = base / "img_align_celeba"
            if (images / "img_align_celeba").is_dir():  # Kaggle's nesting
                images = images / "img_align_celeba"
            partition = _celeba_file(base, "list_eval_partition")
            if images.is_dir() and partition is not None:
                return base, images, partition
        return None

    if locate() is None and download:
        run_download(
            "celeba",
            root,
            lambda: CelebA(str(root), split="all", target_type=[], download=True),
            f"download img_align_celeba.zip and the list_*.txt files from {_CELEBA_URL} (Google "
            f"Drive; torchvision needs the gdown package) into {root / 'celeba'}/ and unzip.",
        )
    found = locate()
    if found is None:
        raise missing_data_error(
            "celeba",
            root,
            f"  {root / 'celeba'}/img_align_celeba/*.jpg\n"
            f"  {root / 'celeba'}/list_eval_partition.txt  (list_attr_celeba.txt for "
            "dataset.attribute; the Kaggle .csv versions also work)",
            "Set dataset.download=true to fetch it with torchvision (needs gdown; Google Drive "
            f"quotas often block it), or get 'Align&Cropped Images' from {_CELEBA_URL}.",
        )
    base, image_dir, partition_file = found
    names, partition = read_celeba_partition(partition_file)
    keep = np.ones(len(names), bool) if split == "all" else partition == _CELEBA_SPLITS[split]
    if attribute is None:
        labels = np.zeros(len(names), np.int64)
        classes = ["face"]
    else:
        attr_file = _celeba_file(base, "list_attr_celeba")
        if attr_file is None:
            raise missing_data_error(
                "celeba",
                root,
                f"  {base}/list_attr_celeba.txt  (needed by dataset.attribute={attribute})",
                f"Get it from {_CELEBA_URL}, or set dataset.attribute=null.",
            )
        attr_names, attr_rows, values = read_celeba_attributes(attr_file)
        if attribute not in attr_names:
            raise ValueError(
                f"dataset.attribute={attribute!r} is not a CelebA attribute; valid: "
                + ", ".join(attr_names)
            )
        by_name = dict(zip(attr_rows, values[:, attr_names.index(attribute)]))
        labels = np.asarray([by_name[n] for n in names], np.int64)
        classes = [f"not {attribute}", attribute]
    samples = [(str(image_dir / n), int(y)) for n, y, k in zip(names, labels, keep) if k]
    if samples and not Path(samples[0][0]).is_file():
        raise missing_data_error(
            "celeba",
            root,
            f"  {image_dir}/{Path(samples[0][0]).name} (listed in {partition_file.name})",
            "The image folder does not match the partition file; re-extract img_align_celeba.zip.",
        )
    return ImageFileDataset(
        samples, classes, ImageTransform(image_size, crop_size=crop_size, flip=flip)
    )


# ------------------------------------------------------------------------------------ LSUN bedroom
_LSUN_HOWTO = (
    "LSUN cannot be downloaded by torchvision (dataset.download=true does not apply): run "
    "`python download.py -c bedroom` from https://github.com/fyu/lsun and unzip "
    "bedroom_train_lmdb.zip / bedroom_val_lmdb.zip there (reading LMDB needs `pip install "
    "lmdb`), or export the images to a folder (`python data.py export ... --flat`)."
)


@register_dataset(
    "lsun_bedroom", channels=3, image_size=128, num_classes=1,
    splits=("train", "test", "val"),
    description="LSUN bedroom (LMDB or exported image folder); split test = LSUN's val",
)  # fmt: skip
def _build_lsun_bedroom(split, root, image_size, download, flip, seed):
    part = "train" if split == "train" else "val"
    transform = ImageTransform(image_size, flip=flip)
    lmdb_dir = root / f"bedroom_{part}_lmdb"
    if lmdb_dir.is_dir():
        try:
            import lmdb  # noqa: F401
        except ImportError:
            raise ImportError(
                f"dataset=lsun_bedroom: {lmdb_dir} is an LMDB database, and reading it needs the "
                "lmdb package: `pip install lmdb` (or export the images to "
                f"{root / ('bedroom_' + part)}/ and remove the _lmdb folder from dataset.root)"
            ) from None
        return LMDBImageDataset(lmdb_dir, ["bedroom"], transform)
    for folder in (root / f"bedroom_{part}", root / part):
        if folder.is_dir():
            files = scan_images(folder, recursive=True)
            if files:
                return ImageFileDataset([(f, 0) for f in files], ["bedroom"], transform)
    raise missing_data_error(
        "lsun_bedroom",
        root,
        f"  {lmdb_dir}/{{data.mdb, lock.mdb}}   (LMDB, as distributed)\n"
        f"  or {root / ('bedroom_' + part)}/**/*.jpg|webp  (or {root / part}/, an image export)",
        _LSUN_HOWTO,
    )


# ---------------------------------------------------------------------------------------- ImageNet
_IMAGENET_HOWTO = (
    "ImageNet cannot be downloaded automatically (dataset.download=true does not apply): get "
    "ILSVRC2012 from https://image-net.org/download.php, extract the train tar's per-class tars "
    "into train/<wnid>/, and sort the val images into val/<wnid>/ (e.g. with the widely used "
    "valprep.sh)."
)


@register_dataset(
    "imagenet", channels=3, image_size=128, num_classes=1000,
    splits=("train", "test", "val"),
    description="ImageNet-1K in ImageFolder layout; split test = val (50k)",
)  # fmt: skip
def _build_imagenet(split, root, image_size, download, flip, seed):
    part = "train" if split == "train" else "val"
    folder = root / part
    expected = f"  {root}/train/<wnid>/*.JPEG\n  {root}/val/<wnid>/*.JPEG"
    if not folder.is_dir():
        raise missing_data_error("imagenet", root, expected, _IMAGENET_HOWTO)
    samples, classes = scan_class_folders(folder)
    if classes == [folder.name]:
        raise FileNotFoundError(
            f"dataset=imagenet: the images in {folder} are not sorted into class folders "
            f"(<wnid>/); expected layout:\n{expected}\n{_IMAGENET_HOWTO}"
        )
    if not samples:
        raise missing_data_error("imagenet", root, expected, _IMAGENET_HOWTO)
    return ImageFileDataset(samples, classes, ImageTransform(image_size, flip=flip))


# ------------------------------------------------------------------------------------- imagefolder
_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}


@register_dataset(
    "imagefolder", channels=None, image_size=64, num_classes=None,
    splits=("train", "test", "val"),
    description="any folder of class folders (root/<split>/<class>/* if split folders exist)",
)  # fmt: skip
def _build_imagefolder(
    split, root, image_size, download, flip, seed,
    channels: int = 3, crop_size: int | None = None,
):  # fmt: skip
    """``channels``: 3 (RGB) or 1 (grey) — images are converted. ``crop_size``: centre crop before
    resizing. Layout: ``root/<split>/<class>/*`` when ``root`` has ``train``/``test``/``val``
    folders (split ``test`` falls back to ``val`` and back), else ``root/<class>/*`` for every
    split; a folder of images without class folders is one class."""
    if channels not in (1, 3):
        raise ValueError(f"dataset.channels must be 1 or 3 for dataset=imagefolder, got {channels}")
    expected = (
        f"  {root}/<class>/*.jpg|png|...   (every split reads the same images)\n"
        f"  or {root}/train/<class>/*, {root}/test/<class>/* (or val/)"
    )
    how = "Point dataset.root at such a folder; dataset.download=true does not apply."
    if not root.is_dir():
        raise missing_data_error("imagefolder", root, expected, how)
    split_dirs = [d for d in ("train", "test", "val") if (root / d).is_dir()]
    if split_dirs:
        candidates = [root / d for d in _SPLIT_DIRS[split] if (root / d).is_dir()]
        if not candidates:
            raise missing_data_error(
                "imagefolder",
                root,
                expected,
                f"{root} has split folders ({', '.join(split_dirs)}) but none for split={split}.",
            )
        folder = candidates[0]
    else:
        folder = root
        if split != "train":
            log.warning(
                "dataset=imagefolder: %s has no test/ or val/ folder, so split=%s reads the "
                "same images as train",
                root,
                split,
            )
    samples, classes = scan_class_folders(folder)
    if not samples:
        raise missing_data_error("imagefolder", root, expected, how)
    transform = ImageTransform(
        image_size, mode="RGB" if channels == 3 else "L", crop_size=crop_size, flip=flip
    )
    return ImageFileDataset(samples, classes, transform)
