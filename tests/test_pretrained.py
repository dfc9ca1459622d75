"""Releases (safetensors + config), load_pretrained, safe loading, and ctrl-csc-eval."""

import json
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

import ctrl_csc
from ctrl_csc.cli import evaluate as eval_cli
from ctrl_csc.cli.common import config_dir
from ctrl_csc.cli.train import run as train_run
from ctrl_csc.engine import CheckpointError, load_checkpoint
from ctrl_csc.pretrained import PRETRAINED, export_release, load_pretrained, read_release


def compose_cfg(name, overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of the quickstart model after two training steps."""
    out = tmp_path_factory.mktemp("run")
    train_run(compose_cfg("train", ["trainer=smoke"]), out)
    return out / "checkpoints" / "last.pt"


def test_release_roundtrip_gives_the_same_model(trained, tmp_path):
    release = export_release(trained, tmp_path / "m.safetensors")
    (model_a, cfg_a), (model_b, cfg_b) = load_pretrained(trained), load_pretrained(release)
    assert cfg_a == cfg_b and cfg_a["model"]["name"] == "csc_ctrl_tiny"
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        for a, b in zip(model_a(x), model_b(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    states, config, _ = read_release(release)
    ckpt = load_checkpoint(trained)
    for part in ("encoder", "decoder"):
        assert states[part].keys() == ckpt["models"][part].keys()


def test_top_level_load_pretrained_is_the_same_function(trained):
    model, config = ctrl_csc.load_pretrained(trained)
    assert not model.training and config["dataset"]["name"] == "mnist5k"


def test_corrupted_and_foreign_releases_are_refused(trained, tmp_path):
    release = export_release(trained, tmp_path / "m.safetensors")
    data = release.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_pretrained(tmp_path / "cut.safetensors")
    save_file({"w": torch.ones(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a ctrl_csc release"):
        load_pretrained(tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="no pretrained model 'nope'"):
        load_pretrained("nope")


def test_architecture_mismatch_is_named(trained, tmp_path):
    release = export_release(trained, tmp_path / "m.safetensors")
    tensors = load_file(str(release))
    _, config, _ = read_release(release)
    config["model"]["encoder"]["feature_dim"] = 64
    config["model"]["decoder"]["feature_dim"] = 64
    meta = {"format": "ctrl_csc.release/1", "config": json.dumps(config), "metrics": "{}"}
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"encoder does not match.*different shapes"):
        load_pretrained(tmp_path / "other.safetensors")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_eval_refuses_a_pickled_payload(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "ctrl_csc.checkpoint/1", "config": {}, "models": _Payload()}, evil)
    cfg = compose_cfg("eval", [f"checkpoint={evil}"])
    with pytest.raises(CheckpointError, match="pickled object payload"):
        eval_cli.run(cfg, tmp_path / "out")


def test_the_shipped_quickstart_model_is_present():
    assert PRETRAINED["quickstart"].is_file()
    _, config, metrics = read_release(PRETRAINED["quickstart"])
    assert config["model"]["name"] == "csc_ctrl_tiny" and "psnr" in metrics


def test_eval_end_to_end_on_the_shipped_checkpoint(tmp_path):
    cfg = compose_cfg(
        "eval",
        [
            "checkpoint=quickstart",
            "eval.num_images=64",
            "eval.probe_images=200",
            "eval.batch_size=32",
        ],
    )
    metrics = eval_cli.run(cfg, tmp_path)
    saved = json.loads((tmp_path / "eval.json").read_text())
    for key in ("psnr", "ssim", "nearest_subspace", "linear_probe", "density/enc0"):
        assert key in metrics and saved[key] == pytest.approx(metrics[key])
    assert saved["num_images"] == 64 and saved["dataset"] == saved["trained_on"] == "mnist5k"
    for png in ("reconstructions", "dictionary", "densities", "features"):
        assert (tmp_path / f"{png}.png").stat().st_size > 1000


def test_eval_on_an_unseen_dataset_resizes_to_the_model(tmp_path):
    cfg = compose_cfg(
        "eval",
        [
            "checkpoint=quickstart",
            "dataset=digits",
            "dataset.image_size=16",
            "eval.num_images=32",
            "eval.metrics=[psnr,ssim]",
            "eval.plots=false",
        ],
    )
    metrics = eval_cli.run(cfg, tmp_path)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["dataset"] == "digits" and saved["trained_on"] == "mnist5k"
    assert set(metrics) >= {"psnr", "ssim"}


def test_eval_rejects_a_dataset_with_other_channels(tmp_path):
    cfg = compose_cfg("eval", ["checkpoint=quickstart", "dataset=natural_patches"])
    with pytest.raises(ValueError, match="3-channel images but the model was trained on 1"):
        eval_cli.run(cfg, tmp_path)


def test_fid_without_weights_offline_says_how_to_provide_them(tmp_path, monkeypatch):
    import urllib.error

    import torch.hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = compose_cfg("eval", ["checkpoint=quickstart", "eval.metrics=[fid]", "eval.num_images=8"])
    with pytest.raises(RuntimeError, match="eval.inception_weights"):
        eval_cli.run(cfg, tmp_path / "out")
