"""Hydra configs and entry points: every group composes and builds, every experiment runs a few
steps on embedded data, sweeps, resume, wheel packaging, and two processes under gloo."""

import json
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchrun_helpers import sgd_overrides, spawn_ranks

from ctrl_csc.cli.common import build_models, check_writable, config_dir
from ctrl_csc.cli.train import run
from ctrl_csc.engine import load_checkpoint

CONF = Path(config_dir())
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "WANDB_SILENT": "true"}

# Embedded stand-ins of the same channels and size for datasets that need a download.
PATCHES = ["dataset=natural_patches", "dataset.train_size=64", "dataset.test_size=16"]
STAND_IN = {
    "mnist": ["dataset=mnist5k"],
    "cifar10": [*PATCHES, "dataset.image_size=32"],
    "stl10": [*PATCHES, "dataset.image_size=48"],
    "celeba": [*PATCHES, "dataset.image_size=64"],
    "lsun_bedroom": [*PATCHES, "dataset.image_size=128"],
    "imagenet": [*PATCHES, "dataset.image_size=128"],
}


def names(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def cfg_of(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_bare_command_is_the_quickstart():
    cfg = cfg_of()
    assert (cfg.dataset.name, cfg.model.name, cfg.trainer.device) == (
        "mnist5k",
        "csc_ctrl_mini",
        "cpu",
    )


def model_resolution(name):
    """The image side a model config is for: its name's ``_<size>`` suffix (32 otherwise)."""
    m = re.search(r"_(\d+)$", name)
    return int(m.group(1)) if m else 32


@pytest.mark.parametrize("model", names("model"))
def test_every_model_config_builds(model):
    size = model_resolution(model)
    cfg = cfg_of([f"model={model}", "dataset.channels=3", f"dataset.image_size={size}"])
    f, g = build_models(cfg.model)
    assert (f.in_channels, f.image_size) == (3, (size, size))
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        z = f(x)
        x_hat = g(z)
    assert z.shape == (2, cfg.model.encoder.feature_dim)
    assert x_hat.shape == x.shape and torch.isfinite(x_hat).all()


@pytest.mark.parametrize("group", ["loss", "optim", "logger", "trainer", "dataset"])
def test_every_config_of_a_group_composes_and_builds(group):
    for name in names(group):
        cfg = cfg_of([f"{group}={name}"])
        if group == "loss":
            assert callable(instantiate(cfg.loss))
        elif group == "optim":
            opt = instantiate(cfg.optim.encoder)([torch.nn.Parameter(torch.zeros(1))])
            assert isinstance(opt, torch.optim.Optimizer)
        elif group == "logger" and name == "console":
            instantiate(cfg.logger).log({"a": 1.0}, 0)
        elif group == "trainer":
            assert cfg.trainer.max_steps >= 1
        elif group == "dataset" and cfg.dataset.root is None:  # embedded: builds offline
            x, y = instantiate(cfg.dataset, split="test")[0]
            assert x.shape == (cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)


def smoke_overrides(experiment):
    cfg = cfg_of([f"experiment={experiment}"])
    data = STAND_IN.get(cfg.dataset.name, [])
    # the experiment's own trainer settings win over trainer=smoke: shrink them explicitly
    small = [
        "trainer.max_steps=2",
        "trainer.batch_size=8",
        "trainer.device=cpu",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
    ]
    return [f"experiment={experiment}", "trainer=smoke", *small, *data]


@pytest.mark.parametrize("experiment", names("experiment"))
def test_every_experiment_runs_a_few_steps(experiment, tmp_path):
    cfg = cfg_of(smoke_overrides(experiment))
    metrics = run(cfg, tmp_path)
    assert math.isfinite(metrics["psnr"])
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["step"] == 2


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(HydraException, match="Available options") as e:
        cfg_of(["dataset=cifar100"])
    assert "cifar10" in str(e.value) and "mnist5k" in str(e.value)
    with pytest.raises(HydraException, match="csc_ctrl_32"):
        cfg_of(["model=csc_ctrl_31"])


def test_image_size_the_model_cannot_take_is_reported_before_training(tmp_path):
    cfg = cfg_of(["trainer=smoke", "model.encoder.image_size=64", "model.decoder.image_size=64"])
    with pytest.raises(ValueError, match=r"dataset.image_size.*model|model.*dataset.image_size"):
        run(cfg, tmp_path)


def test_unwritable_run_directory_is_reported(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="hydra.run.dir"):
        check_writable(tmp_path / "file" / "run")


def test_resume_auto_continues_the_same_run(tmp_path):
    # (a sibling run is never continued: tests/test_resume_safety.py)
    base = ["trainer=smoke", "trainer.max_steps=2"]
    run(cfg_of(base), tmp_path / "runs" / "a")
    cfg = cfg_of([*base, "trainer.max_steps=3", "trainer.resume=auto"])
    run(cfg, tmp_path / "runs" / "a")
    assert load_checkpoint(tmp_path / "runs/a/checkpoints/last.pt")["step"] == 3


def cli(*args, cwd=REPO, timeout=300):
    out = subprocess.run(
        [sys.executable, "-m", "ctrl_csc.cli.train", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_multirun_sweep_puts_each_job_in_its_own_directory(tmp_path):
    cli("-m", "trainer=smoke", "model.lmbda=0.05,0.1", f"hydra.sweep.dir={tmp_path}")
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    lmbdas = [OmegaConf.load(p / ".hydra/config.yaml").model.lmbda for p in jobs]
    assert lmbdas == [0.05, 0.1]
    assert all((p / "checkpoints/last.pt").is_file() for p in jobs)


def test_wandb_offline_run_finishes_cleanly(tmp_path):
    pytest.importorskip("wandb")
    cli("trainer=smoke", "logger=wandb", "logger.mode=offline", f"hydra.run.dir={tmp_path}")
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_wandb_gets_one_run_with_the_plain_config(tmp_path, monkeypatch):
    """The config handed to the logger is not instantiated again: one encoder is built, one W&B
    run is made, and its config holds the settings, not built objects."""
    pytest.importorskip("wandb")
    from ctrl_csc.cli import train as train_cli
    from ctrl_csc.models import CSCEncoder

    built = []
    init = CSCEncoder.__init__
    monkeypatch.setattr(
        CSCEncoder, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1]
    )
    argv = [
        "ctrl-csc-train",
        "trainer=smoke",
        "logger=wandb",
        "logger.mode=offline",
        f"hydra.run.dir={tmp_path}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        train_cli.main()
    except SystemExit as stop:
        assert stop.code in (0, None)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(built) == 1 and len(runs) == 1
    stored = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))  # the run's records
    assert b"ctrl_csc.models.CSCEncoder" in stored and b"object at 0x" not in stored


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        check=True,
        env=ENV,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("ctrl_csc-*.whl"))
    files = zipfile.ZipFile(wheel).namelist()
    assert "ctrl_csc/conf/train.yaml" in files and "ctrl_csc/conf/model/csc_ctrl_mini.yaml" in files
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(tmp_path / "site"),
            str(wheel),
        ],
        check=True,
        env=ENV,
        timeout=300,
    )
    probe = (
        "from ctrl_csc.cli.common import config_dir; from hydra import compose, "
        "initialize_config_dir; d = config_dir(); print(d)\n"
        "with initialize_config_dir(config_dir=d, version_base='1.3'):\n"
        "    print(compose('train').model.name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONPATH": str(tmp_path / "site")},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    where, model = out.stdout.split()
    assert Path(where).is_relative_to(tmp_path / "site") and model == "csc_ctrl_mini"


def trained_weights(run_dir):
    models = load_checkpoint(run_dir / "checkpoints" / "last.pt")["models"]
    return {part: models[part] for part in ("encoder", "decoder")}


@pytest.mark.distributed
def test_two_processes_make_the_one_process_updates(tmp_path):
    """2 CPU processes (gloo), 8 images each, = one process with the batch of 16: the same
    objective at every step and the same SGD updates of both players. Multiclass, so the labels
    are gathered too; no batch statistics (group norm is per image). In float64
    (``trainer.dtype``): in float32 the two runs' summation orders differ and the trajectory
    amplifies that by an amount that depends on the CPU's kernels (tests/test_distributed_state.py
    has the figures)."""
    common = [
        "trainer=smoke",
        "trainer.max_steps=3",
        "trainer.dtype=float64",
        "loss=ctrl_multiclass",
        "model.encoder.norm=none",
        "model.decoder.norm=group",
        "++model.decoder.norm_groups=1",
        "optim.lr_decay=none",
    ]
    run(cfg_of([*common, *sgd_overrides(0.0), "trainer.max_steps=1"]), tmp_path / "init")
    single = cfg_of([*common, *sgd_overrides(1e-3), "trainer.batch_size=16"])
    run(single, tmp_path / "one")
    double = cfg_of([*common, *sgd_overrides(1e-3), "trainer.batch_size=8"])
    spawn_ranks(double, [tmp_path / "two"] * 2)

    def objective(d):  # the total and the classwise term (which needs the gathered labels)
        rows = [json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()]
        terms = ("objective/total", "objective/delta_R_classwise")
        return [r[t] for r in rows if "objective/total" in r for t in terms]

    one, two = objective(tmp_path / "one"), objective(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert one == pytest.approx(two, rel=1e-9, abs=1e-12)
    init, w_one, w_two = (trained_weights(tmp_path / d) for d in ("init", "one", "two"))
    for part in ("encoder", "decoder"):
        keys = [k for k, v in init[part].items() if v.is_floating_point()]
        assert keys and w_one[part].keys() == w_two[part].keys()
        d_one = torch.cat([(w_one[part][k] - init[part][k]).flatten() for k in keys])
        d_two = torch.cat([(w_two[part][k] - init[part][k]).flatten() for k in keys])
        assert d_one.norm() > 1e-3, f"the {part} did not move: the comparison would be empty"
        assert (d_two - d_one).norm() <= 1e-9 * d_one.norm(), (
            f"{part}: 2-process update off by {float((d_two - d_one).norm() / d_one.norm()):.3g}"
        )


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_ and launcher.partition == "gpu"
    assert launcher.gpus_per_node == launcher.tasks_per_node == 8
