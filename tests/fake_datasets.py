"""Tiny fake copies of the real datasets in their real on-disk formats (IDX, CIFAR pickles, STL-10
binaries, CelebA's folders and lists, ImageFolder layouts, an LSUN export), written by the data
tests; each writer returns what the loader must read back."""

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

RNG = np.random.default_rng(0)


def save_image_file(path: Path, size=(40, 30), mode="RGB", fmt=None):
    """A random image of ``size`` (w, h) and ``mode`` at ``path``, in ``fmt`` (or by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(RNG.integers(0, 256, shape, dtype=np.uint8), mode).save(path, format=fmt)


def write_mnist(root: Path, n_train=6, n_test=4):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        header = struct.pack(">IIII", 2051, n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.tobytes()
        )
        out[split] = (images, labels)
    return out


def write_cifar10(root: Path):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {"train": ([], []), "test": ([], [])}
    names = [(f"data_batch_{i}", "train", 2) for i in range(1, 6)] + [("test_batch", "test", 3)]
    for name, split, n in names:
        images = RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = RNG.integers(0, 10, n).tolist()
        entry = {"batch_label": name, "labels": labels, "filenames": [f"{i}.png" for i in range(n)]}
        entry["data"] = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # R, G, B planes per row
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        out[split][0].append(images)
        out[split][1].extend(labels)
    classes = ["airplane", "automobile", "bird", "cat", "deer"] + [f"c{i}" for i in range(5)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes, "num_cases_per_batch": 10000}, f)
    return {k: (np.concatenate(v[0]), v[1]) for k, v in out.items()}


def write_stl10(root: Path):
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", 3), ("test", 2), ("unlabeled", 4)):
        images = RNG.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        # stored per image as 3 planes of 96x96 in column-major order: (C, W, H)
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 3, 2, 1).tobytes())
        labels = np.arange(n) % 10
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        out[split] = (images, labels)
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    return out


CELEBA_PARTS = {"000001.jpg": 0, "000002.jpg": 0, "000003.jpg": 0, "000004.jpg": 1, "000005.jpg": 2}
CELEBA_SMILING = {"000001.jpg": 1, "000002.jpg": -1, "000003.jpg": 1, "000004.jpg": 1,
                  "000005.jpg": -1}  # fmt: skip


def write_celeba(root: Path, kaggle=False):
    base = root / "celeba"
    images = base / "img_align_celeba"
    if kaggle:
        images = images / "img_align_celeba"
    for name in CELEBA_PARTS:
        save_image_file(images / name, size=(178, 218), fmt="JPEG")
    if kaggle:
        rows = ["image_id,partition"] + [f"{n},{p}" for n, p in CELEBA_PARTS.items()]
        (base / "list_eval_partition.csv").write_text("\n".join(rows) + "\n")
        rows = ["image_id,Male,Smiling"] + [f"{n},-1,{s}" for n, s in CELEBA_SMILING.items()]
        (base / "list_attr_celeba.csv").write_text("\n".join(rows) + "\n")
    else:
        rows = [f"{n} {p}" for n, p in CELEBA_PARTS.items()]
        (base / "list_eval_partition.txt").write_text("\n".join(rows) + "\n")
        rows = ["5", "5_o_Clock_Shadow Male Smiling "]
        rows += [f"{n} -1 -1  {s}" for n, s in CELEBA_SMILING.items()]
        (base / "list_attr_celeba.txt").write_text("\n".join(rows) + "\n")
        for name in ("identity_CelebA.txt", "list_bbox_celeba.txt"):
            (base / name).write_text("")


def write_imagenet(root: Path):
    for split, n in (("train", 3), ("val", 1)):
        for wnid in ("n01440764", "n01443537"):
            for i in range(n):
                save_image_file(root / split / wnid / f"{wnid}_{i}.JPEG", fmt="JPEG")


def write_lsun_export(root: Path):
    save_image_file(root / "bedroom_train" / "0" / "1" / "a.jpg", size=(60, 45), fmt="JPEG")
    save_image_file(root / "bedroom_train" / "0" / "2" / "b.webp", size=(45, 60), fmt="WEBP")
    save_image_file(root / "bedroom_val" / "c.jpg", size=(50, 50), fmt="JPEG")


def write_imagefolder(root: Path):
    for cls in ("cats", "dogs"):
        for i in range(2):
            save_image_file(root / cls / f"{i}.png")
