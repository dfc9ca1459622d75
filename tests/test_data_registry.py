"""The dataset registry, build_dataset's argument checks and the conf/dataset/*.yaml files."""

from pathlib import Path

import pytest
from fake_datasets import write_cifar10
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ctrl_csc.data import DATASETS, build_dataset, dataset_info, register_dataset

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
ALL = ["mnist", "cifar10", "stl10", "celeba", "lsun_bedroom", "imagenet", "imagefolder",
       "mnist5k", "digits", "natural_patches"]  # fmt: skip


def test_registry_lists_every_dataset():
    assert sorted(DATASETS) == sorted(ALL)
    for name in ALL:
        info = dataset_info(name)
        assert set(info) == {"channels", "image_size", "num_classes"}
        assert info["channels"] in (1, 3) and info["image_size"] >= 28


def test_unknown_name_lists_valid_names_and_setting():
    with pytest.raises(ValueError, match=r"dataset=mnsit.*cifar10.*natural_patches"):
        build_dataset("mnsit")
    with pytest.raises(ValueError, match="dataset=nope"):
        dataset_info("nope")


def test_unknown_split_and_option():
    with pytest.raises(ValueError, match=r"split='validation'.*dataset=mnist5k.*train, test"):
        build_dataset("mnist5k", split="validation")
    with pytest.raises(ValueError, match=r"dataset.test_szie.*dataset=mnist5k.*test_size"):
        build_dataset("mnist5k", test_szie=10)


def test_channels_and_num_classes_are_checked():
    ds = build_dataset("digits", "test", channels=1, num_classes=10)
    assert ds[0][0].shape[0] == 1
    with pytest.raises(ValueError, match=r"dataset.channels=3.*dataset.channels=1"):
        build_dataset("digits", channels=3)
    with pytest.raises(ValueError, match="dataset.num_classes=10"):
        build_dataset("digits", num_classes=7)
    with pytest.raises(ValueError, match="dataset.image_size"):
        build_dataset("digits", image_size=0)


def test_register_dataset_decorator_validates():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits", channels=1, image_size=8, num_classes=10)(lambda **k: None)
    with pytest.raises(TypeError, match="must accept"):
        register_dataset("broken", channels=1, image_size=8, num_classes=1)(lambda split: None)
    assert "broken" not in DATASETS
    with pytest.raises(TypeError, match="must not accept.*download"):
        register_dataset("broken", channels=1, image_size=8, num_classes=1, embedded=True)(
            lambda split, image_size, flip, seed, download: None
        )
    assert "broken" not in DATASETS


@pytest.mark.parametrize("name", ALL)
def test_config_matches_registry(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg._target_ == "ctrl_csc.data.build_dataset" and cfg.name == name
    assert "split" not in cfg  # the caller supplies it
    info = dataset_info(name)
    assert {k: cfg[k] for k in info} == info or name == "imagefolder"
    assert cfg.download is False and cfg.augment is False
    extra = set(cfg) - {"_target_", "name", "root", "image_size", "channels", "num_classes",
                        "download", "augment", "seed"}  # fmt: skip
    assert extra <= set(DATASETS[name].options)
    if DATASETS[name].embedded:
        assert cfg.root is None
    else:
        assert str(cfg.root).endswith(f"/{name}")


@pytest.mark.parametrize("name", ["mnist5k", "digits", "natural_patches"])
def test_embedded_configs_instantiate(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    ds = instantiate(cfg, split="test")
    x, y = ds[0]
    assert x.shape == (cfg.channels, cfg.image_size, cfg.image_size)
    assert 0 <= y < cfg.num_classes


def test_real_config_instantiates_with_root(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "cifar10")
    monkeypatch.setenv("CTRL_CSC_DATA", str(tmp_path))
    cfg = OmegaConf.load(CONF / "cifar10.yaml")
    train, test = instantiate(cfg, split="train"), instantiate(cfg, split="test")
    assert (len(train), len(test)) == (10, 3)
    assert train[0][0].shape == (3, 32, 32)
