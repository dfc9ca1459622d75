"""Real datasets: each loader reads a tiny fake copy written in its real on-disk format."""

import pickle
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_datasets import (
    RNG,
    save_image_file,
    write_celeba,
    write_cifar10,
    write_imagefolder,
    write_imagenet,
    write_lsun_export,
    write_mnist,
    write_stl10,
)
from PIL import Image

from ctrl_csc.data import build_dataset


def _signed(images_hwc: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> what the datasets yield at native size: (N, C, H, W) in [-1, 1]."""
    a = images_hwc[:, None] if images_hwc.ndim == 3 else images_hwc.transpose(0, 3, 1, 2)
    return torch.from_numpy(a.astype(np.float32)) / 127.5 - 1


def _stack(ds):
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), list(ys)


# ----------------------------------------------------------------------- format-exact readers
def test_mnist_idx_files(tmp_path):
    data = write_mnist(tmp_path)
    for split in ("train", "test"):
        ds = build_dataset("mnist", split, root=tmp_path, image_size=28)
        x, y = _stack(ds)
        assert torch.equal(x, _signed(data[split][0]))
        assert y == data[split][1].tolist()
    x, _ = build_dataset("mnist", "test", root=tmp_path / "MNIST")[0]  # the MNIST/ folder works
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32


def test_cifar10_pickle_batches(tmp_path):
    data = write_cifar10(tmp_path)
    for split in ("train", "test"):
        ds = build_dataset("cifar10", split, root=tmp_path)
        x, y = _stack(ds)
        assert torch.equal(x, _signed(data[split][0]))
        assert y == data[split][1]
    assert ds.classes[:2] == ["airplane", "automobile"] and ds.num_classes == 10


def test_stl10_binary_files(tmp_path):
    data = write_stl10(tmp_path)
    for split in ("train", "test", "unlabeled"):
        ds = build_dataset("stl10", split, root=tmp_path, image_size=96)
        x, y = _stack(ds)
        assert torch.equal(x, _signed(data[split][0]))
        want = [-1] * 4 if split == "unlabeled" else data[split][1].tolist()
        assert y == want
    both = build_dataset("stl10", "train", root=tmp_path, unlabeled=True)
    assert len(both) == 7 and both[0][0].shape == (3, 48, 48) and both[6][1] == -1
    assert both.classes[0] == "class0"
    revived = pickle.loads(pickle.dumps(both))  # DataLoader workers: memory maps reopen lazily
    assert torch.equal(revived[5][0], both[5][0])


@pytest.mark.parametrize("kaggle", [False, True])
def test_celeba_partition_and_attributes(tmp_path, kaggle):
    write_celeba(tmp_path, kaggle=kaggle)
    sizes = {"train": 3, "valid": 1, "val": 1, "test": 1, "all": 5}
    for split, n in sizes.items():
        ds = build_dataset("celeba", split, root=tmp_path)
        assert len(ds) == n
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and y == 0 and -1 <= x.min() and x.max() <= 1
    smiling = build_dataset("celeba", "train", root=tmp_path, attribute="Smiling", num_classes=2)
    assert [smiling[i][1] for i in range(3)] == [1, 0, 1]
    assert build_dataset("celeba", "test", root=tmp_path, image_size=128)[0][0].shape[-1] == 128
    with pytest.raises(ValueError, match="not a CelebA attribute"):
        build_dataset("celeba", root=tmp_path, attribute="Purple_Hair")


def test_celeba_crop_then_resize(tmp_path):
    write_celeba(tmp_path)
    ds = build_dataset("celeba", "test", root=tmp_path, image_size=140)
    with Image.open(ds.samples[0][0]) as image:
        full = np.asarray(image.convert("RGB"))
    top, left = round((218 - 140) / 2), round((178 - 140) / 2)
    want = _signed(full[None, top : top + 140, left : left + 140])[0]
    assert torch.equal(ds[0][0], want)


def test_imagenet_imagefolder_layout(tmp_path):
    write_imagenet(tmp_path)
    train = build_dataset("imagenet", "train", root=tmp_path, image_size=32, num_classes=2)
    test = build_dataset("imagenet", "test", root=tmp_path, image_size=32, num_classes=2)
    assert (len(train), len(test)) == (6, 2)
    assert train.classes == ["n01440764", "n01443537"]
    x, y = _stack(test)
    assert x.shape == (2, 3, 32, 32) and y == [0, 1]
    assert build_dataset("imagenet", "val", root=tmp_path, num_classes=2)[0][0].shape[-1] == 128
    with pytest.raises(ValueError, match="dataset.num_classes=2"):
        build_dataset("imagenet", root=tmp_path, num_classes=1000)  # the config's 1000


def test_imagenet_unsorted_val_is_explained(tmp_path):
    write_imagenet(tmp_path)
    save_image_file(tmp_path / "flatval" / "ILSVRC2012_val_00000001.JPEG", fmt="JPEG")
    (tmp_path / "val").rename(tmp_path / "val_sorted")
    (tmp_path / "flatval").rename(tmp_path / "val")
    with pytest.raises(FileNotFoundError, match="not sorted into class folders"):
        build_dataset("imagenet", "test", root=tmp_path)


def test_lsun_bedroom_image_export(tmp_path):
    write_lsun_export(tmp_path)
    train = build_dataset("lsun_bedroom", "train", root=tmp_path, image_size=32)
    test = build_dataset("lsun_bedroom", "test", root=tmp_path, image_size=32)
    assert (len(train), len(test)) == (2, 1)
    x, y = _stack(train)
    assert x.shape == (2, 3, 32, 32) and y == [0, 0]


def test_lsun_bedroom_lmdb(tmp_path):
    db = tmp_path / "bedroom_train_lmdb"
    db.mkdir()
    try:
        import lmdb
    except ImportError:
        with pytest.raises(ImportError, match="pip install lmdb"):
            build_dataset("lsun_bedroom", root=tmp_path)
        return
    import io

    env = lmdb.open(str(db), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buf, "JPEG")
            txn.put(f"key{i}".encode(), buf.getvalue())
    env.close()
    ds = build_dataset("lsun_bedroom", root=tmp_path, image_size=16)
    assert len(ds) == 3 and ds[2][0].shape == (3, 16, 16) and ds[2][1] == 0


def test_imagefolder_layouts(tmp_path):
    write_imagefolder(tmp_path / "plain")
    ds = build_dataset("imagefolder", "train", root=tmp_path / "plain", image_size=16)
    assert ds.classes == ["cats", "dogs"] and len(ds) == 4 and ds[3][1] == 1
    assert ds[0][0].shape == (3, 16, 16)
    grey = build_dataset("imagefolder", root=tmp_path / "plain", image_size=16, channels=1)
    assert grey[0][0].shape == (1, 16, 16)
    # split folders: test falls back to val
    write_imagefolder(tmp_path / "split" / "train")
    save_image_file(tmp_path / "split" / "val" / "cats" / "x.png")
    assert len(build_dataset("imagefolder", "test", root=tmp_path / "split")) == 1
    # a folder of images without class folders is one class
    for i in range(3):
        save_image_file(tmp_path / "flat" / f"{i}.jpg", fmt="JPEG")
    flat = build_dataset("imagefolder", root=tmp_path / "flat", num_classes=1)
    assert len(flat) == 3 and flat.classes == ["flat"]
    with pytest.raises(ValueError, match="1 or 3"):
        build_dataset("imagefolder", root=tmp_path / "plain", channels=4)


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "name, layout_hint, how_hint",
    [
        ("mnist", "MNIST/raw", "dataset.download=true"),
        ("cifar10", "cifar-10-batches-py", "dataset.download=true"),
        ("stl10", "stl10_binary", "dataset.download=true"),
        ("celeba", "list_eval_partition.txt", "dataset.download=true"),
        ("lsun_bedroom", "bedroom_train_lmdb", "github.com/fyu/lsun"),
        ("imagenet", "train/<wnid>", "image-net.org"),
        ("imagefolder", "<class>", "dataset.root"),
    ],
)
def test_missing_root_names_dataset_layout_and_remedy(tmp_path, name, layout_hint, how_hint):
    with pytest.raises(FileNotFoundError) as info:
        build_dataset(name, "train", root=tmp_path / "nothing_here")
    msg = str(info.value)
    assert f"dataset={name}" in msg and "nothing_here" in msg
    assert layout_hint in msg and how_hint in msg


def test_default_root_follows_environment(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "cifar10")
    monkeypatch.setenv("CTRL_CSC_DATA", str(tmp_path))
    assert len(build_dataset("cifar10", "test")) == 3


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize("name", ["cifar10", "mnist", "stl10"])
def test_download_without_network_is_explained(tmp_path, no_network, name):
    with pytest.raises(RuntimeError) as info:
        build_dataset(name, root=tmp_path / name, download=True)
    msg = str(info.value)
    assert f"dataset={name}" in msg and "no network access" in msg and "by hand" in msg


def test_download_skipped_when_present(tmp_path, no_network):
    write_cifar10(tmp_path)
    assert len(build_dataset("cifar10", "test", root=tmp_path, download=True)) == 3


def test_cifar_corrupt_batch_is_explained(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="not a CIFAR-10 batch"):
        build_dataset("cifar10", "test", root=tmp_path)


class _Touch:
    """Unpickling this calls pathlib.Path.touch(path): what a hostile data file would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("where", ["test_batch", "batches.meta"])
def test_cifar_hostile_pickle_runs_nothing(tmp_path, where):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    payload = {"data": _Touch(marker), "labels": [0], "label_names": _Touch(marker)}
    with open(tmp_path / "cifar-10-batches-py" / where, "wb") as f:
        pickle.dump(payload, f)
    with pytest.raises(ValueError, match=r"names pathlib\.\w*Path\.touch"):
        build_dataset("cifar10", "test", root=tmp_path)
    assert not marker.exists()


def test_cifar_python2_protocol_batches_load(tmp_path):
    """The published batches are protocol-2 pickles; the restricted unpickler reads them."""
    data = write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    with open(folder / "test_batch", "rb") as f:
        entry = pickle.load(f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(entry, f, protocol=2)
    ds = build_dataset("cifar10", "test", root=tmp_path)
    assert len(ds) == len(data["test"][1])
