"""A model file is data, never code: hostile configurations stored in a release (.safetensors) or a
checkpoint (.pt) are refused by name, before anything is built, written or imported."""

import copy
import json
import re
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ctrl_csc.cli import evaluate as eval_cli
from ctrl_csc.cli.common import build_models, config_dir, to_container
from ctrl_csc.engine import CheckpointError, save_checkpoint
from ctrl_csc.pretrained import PRETRAINED, RELEASE_FORMAT, load_pretrained, read_release
from ctrl_csc.pretrained.guard import UnsafeConfigError

CONF = Path(config_dir())


@pytest.fixture(scope="module")
def release():
    """The shipped release's tensors and config (plain data, to be tampered with)."""
    states, config, _ = read_release(PRETRAINED["quickstart"])
    return load_file(str(PRETRAINED["quickstart"])), states, config


def write_release(path, tensors, config):
    meta = {"format": RELEASE_FORMAT, "config": json.dumps(config), "metrics": "{}"}
    save_file(tensors, str(path), metadata=meta)
    return path


def write_checkpoint(path, states, config):
    return save_checkpoint({"step": 0, "models": states, "config": config, "metrics": {}}, path)


def hostile_entries(victim: Path):
    """``(setting to tamper, replacement, the target the error must name)``: callables that
    write ``victim`` (or do worse) when a config builds them."""
    v = str(victim)
    return [
        ("encoder", {"_target_": "numpy.savetxt", "fname": v, "X": [1.0]}, "numpy.savetxt"),
        ("encoder", {"_target_": "pathlib.Path.touch", "self": v}, "pathlib.Path.touch"),
        ("decoder", {"_target_": "shutil.copyfile", "src": __file__, "dst": v}, "shutil.copyfile"),
        ("decoder", {"_target_": "torch.save", "obj": [1], "f": v}, "torch.save"),
        (
            "encoder",
            {"_target_": "builtins.exec", "_args_": [f"open({v!r}, 'w').write('x')"]},
            "builtins.exec",
        ),
        ("decoder", {"_target_": "os.system", "_args_": [f"touch {v}"]}, "os.system"),
    ]


def test_the_hostile_entries_write_their_victim_when_instantiated(tmp_path):
    """The premise: handed to Hydra's instantiate, the first four entries write the file (this
    Hydra blocks exec and os.system itself; the guard does not rely on that)."""
    for _, entry, target in hostile_entries(tmp_path / "victim")[:4]:
        instantiate(OmegaConf.create(entry))
        assert (tmp_path / "victim").exists(), target
        (tmp_path / "victim").unlink()


def nested_entries(victim: Path, encoder: dict):
    """The allowed encoder class with something hostile inside its arguments."""
    evil = {"_target_": "numpy.savetxt", "fname": str(victim), "X": [1.0]}
    out = []
    e = copy.deepcopy(encoder)
    e["stages"][1] = {**e["stages"][1], "norm": evil}
    out.append((e, "numpy.savetxt"))
    e = copy.deepcopy(encoder)
    e["stages"].append(evil)
    out.append((e, "numpy.savetxt"))
    e = copy.deepcopy(encoder)
    e["stage_defaults"]["init_std"] = {"_target_": "os.system", "command": f"touch {victim}"}
    out.append((e, "os.system"))
    e = copy.deepcopy(encoder)
    e["_args_"] = [1]
    out.append((e, "_args_"))
    e = copy.deepcopy(encoder)
    e["_partial_"] = True
    out.append((e, "_partial_"))
    e = copy.deepcopy(encoder)
    e["_recursive_"] = False
    out.append((e, "_recursive_"))
    e = copy.deepcopy(encoder)
    e["_convert_"] = "all"
    out.append((e, "_convert_"))
    e = copy.deepcopy(encoder)
    e["in_channels"] = "${oc.env:HOME}"
    out.append((e, "${oc.env:HOME}"))
    e = copy.deepcopy(encoder)
    e["stages"][0]["lmbda"] = "${oc.create:{_target_: os.system}}"
    out.append((e, "oc.create"))
    e = copy.deepcopy(encoder)
    e["evil"] = 1  # not a parameter of CSCEncoder
    out.append((e, "evil"))
    return out


def _loaders(tmp_path, tensors, states, config, tag):
    """Every way a stored config is built: a release and a checkpoint through load_pretrained,
    and both through ctrl-csc-eval."""
    rel = write_release(tmp_path / f"{tag}.safetensors", tensors, config)
    ckpt = write_checkpoint(tmp_path / f"{tag}.pt", states, config)
    return rel, ckpt


def _assert_refused(path, needle, victim, tmp_path, before_files):
    """load_pretrained(path) raises naming ``needle`` and the file; nothing was written (no
    victim, no new file in the folder) and no module was imported."""
    modules = set(sys.modules)
    with pytest.raises(UnsafeConfigError) as err:
        load_pretrained(path)
    msg = str(err.value)
    assert needle in msg and str(path) in msg, msg
    assert not victim.exists()
    assert set(sys.modules) == modules
    assert {p.name for p in tmp_path.iterdir()} == before_files


def test_hostile_targets_in_a_release_or_checkpoint_are_refused_by_name(release, tmp_path):
    tensors, states, config = release
    load_pretrained(PRETRAINED["quickstart"])  # warm every lazy import of a genuine load
    victim = tmp_path / "victim" / "pwned"
    victim.parent.mkdir()
    for i, (part, entry, target) in enumerate(hostile_entries(victim)):
        bad = copy.deepcopy(config)
        bad["model"][part] = entry
        for path in _loaders(tmp_path, tensors, states, bad, f"h{i}"):
            _assert_refused(path, target, victim, tmp_path, {p.name for p in tmp_path.iterdir()})


def test_nested_targets_hydra_keys_and_interpolations_are_refused(release, tmp_path):
    tensors, states, config = release
    load_pretrained(PRETRAINED["quickstart"])
    victim = tmp_path / "victim"
    for i, (encoder, needle) in enumerate(nested_entries(victim, config["model"]["encoder"])):
        bad = copy.deepcopy(config)
        bad["model"]["encoder"] = encoder
        for path in _loaders(tmp_path, tensors, states, bad, f"n{i}"):
            _assert_refused(path, needle, victim, tmp_path, {p.name for p in tmp_path.iterdir()})


def test_a_target_that_was_never_imported_stays_unimported(release, tmp_path):
    tensors, states, config = release
    load_pretrained(PRETRAINED["quickstart"])
    module = "smtplib"
    assert module not in sys.modules  # else the test could not tell
    bad = copy.deepcopy(config)
    bad["model"]["decoder"] = {"_target_": f"{module}.SMTP", "host": "localhost"}
    rel = write_release(tmp_path / "m.safetensors", tensors, bad)
    with pytest.raises(UnsafeConfigError, match="smtplib.SMTP"):
        load_pretrained(rel)
    assert module not in sys.modules


def test_a_hostile_dataset_target_is_refused_before_evaluation(release, tmp_path):
    tensors, states, config = release
    victim = tmp_path / "victim"
    bad = copy.deepcopy(config)
    bad["dataset"] = {"_target_": "os.system", "command": f"touch {victim}"}
    for path in _loaders(tmp_path, tensors, states, bad, "d"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("eval", overrides=[f"checkpoint={path}", "eval.plots=false"])
        with pytest.raises(UnsafeConfigError, match=r"dataset\._target_.*os\.system"):
            eval_cli.run(cfg, tmp_path / "out")
        assert not victim.exists() and not (tmp_path / "out" / "eval.json").exists()


def test_a_stored_dataset_entry_chooses_no_location_and_no_download(release, tmp_path, monkeypatch):
    """A file whose dataset entry names a folder of its choosing and ``download: true``: the
    evaluator neither creates that folder nor downloads; it reads ``$CTRL_CSC_DATA/<name>`` (or
    ``eval.data_root``) and says that the data is missing there."""
    tensors, states, config = release
    chosen, data = tmp_path / "chosen", tmp_path / "data"
    monkeypatch.setenv("CTRL_CSC_DATA", str(data))
    bad = copy.deepcopy(config)
    bad["dataset"] = {**bad["dataset"], "name": "mnist", "root": str(chosen), "download": True}
    del bad["dataset"]["test_size"]  # an option of mnist5k only
    for path in _loaders(tmp_path, tensors, states, bad, "loc"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("eval", overrides=[f"checkpoint={path}", "eval.plots=false"])
        with pytest.raises(FileNotFoundError, match=re.escape(str(data / "mnist"))):
            eval_cli.run(cfg, tmp_path / "out")
        assert not chosen.exists() and not data.exists()


def test_the_error_is_a_checkpoint_error_naming_setting_and_allowed_classes(release, tmp_path):
    tensors, states, config = release
    bad = copy.deepcopy(config)
    bad["model"]["encoder"] = {"_target_": "numpy.savetxt", "fname": "x", "X": [1]}
    path = write_release(tmp_path / "m.safetensors", tensors, bad)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    msg = str(err.value)
    assert "model.encoder._target_" in msg and "ctrl_csc.models.CSCEncoder" in msg
    assert "numpy.savetxt" in msg and "m.safetensors" in msg


def test_genuine_files_still_load(release, tmp_path):
    tensors, states, config = release
    for path in _loaders(tmp_path, tensors, states, config, "ok"):
        model, cfg = load_pretrained(path)
        assert cfg == config and type(model.encoder).__name__ == "CSCEncoder"


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_project_model_config_passes_the_guard_as_user_config_and_as_stored(model):
    m = re.search(r"_(\d+)$", model)
    size = int(m.group(1)) if m else 32
    overrides = [f"model={model}", "dataset.channels=3", f"dataset.image_size={size}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    f, g = build_models(cfg.model)  # the user's own Hydra config: resolved, then checked
    stored = to_container(cfg)["model"]  # what a checkpoint stores
    f2, g2 = build_models(stored, source="'stored.pt'")
    assert type(f) is type(f2) and type(g) is type(g2)
    assert f.state_dict().keys() == f2.state_dict().keys()


def test_a_class_of_ones_own_is_built_once_registered():
    import torch

    from ctrl_csc.pretrained import guard

    class MyEncoder(torch.nn.Module):
        def __init__(self, width: int = 3):
            super().__init__()
            self.fc = torch.nn.Linear(width, width)

    cfg = {
        "encoder": {"_target_": f"{__name__}.MyEncoder", "width": 4},
        "decoder": {
            "_target_": "ctrl_csc.models.DCGANDecoder",
            "out_channels": 1,
            "image_size": 32,
            "feature_dim": 8,
        },
    }
    with pytest.raises(UnsafeConfigError, match="MyEncoder"):
        build_models(cfg)
    name = guard.register_model_class(MyEncoder, "encoder")
    try:
        cfg["encoder"]["_target_"] = name
        f, _ = build_models(cfg)
        assert isinstance(f, MyEncoder) and f.fc.in_features == 4
    finally:
        del guard.ENCODERS[name]
