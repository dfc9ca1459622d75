"""The fault matrix: every error a user can cause in ``ctrl-csc-train`` / ``ctrl-csc-eval`` is one
exception with one message naming the setting or file to change, and the console scripts turn it
into that one line and exit status 2 (3 for a non-finite objective, 75 for preemption), never a
traceback."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from ctrl_csc.cli import evaluate as eval_cli
from ctrl_csc.cli.common import (
    EXIT_NON_FINITE,
    EXIT_USER_ERROR,
    USER_ERRORS,
    config_dir,
    one_clear_answer,
)
from ctrl_csc.cli.train import run as train_run
from ctrl_csc.engine import NonFiniteObjectiveError, load_checkpoint
from ctrl_csc.pretrained import PRETRAINED, RELEASE_FORMAT, read_release

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["trainer=smoke"]


def cfg_of(name, overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real 2-step checkpoint, a truncated copy, and a release with a hostile target."""
    d = tmp_path_factory.mktemp("faults")
    train_run(cfg_of("train", SMOKE), d / "run")
    ckpt = d / "run" / "checkpoints" / "last.pt"
    data = ckpt.read_bytes()
    (d / "cut.pt").write_bytes(data[: len(data) // 2])
    _, config, _ = read_release(PRETRAINED["quickstart"])
    config["model"]["encoder"] = {"_target_": "numpy.savetxt", "fname": str(d / "pwned"), "X": [1]}
    meta = {"format": RELEASE_FORMAT, "config": json.dumps(config), "metrics": "{}"}
    save_file(load_file(str(PRETRAINED["quickstart"])), str(d / "evil.safetensors"), metadata=meta)
    return {"dir": d, "ckpt": ckpt, "cut": d / "cut.pt", "evil": d / "evil.safetensors"}


TRAIN_FAULTS = [
    # (overrides, what the one message must say)
    (["trainer.resume=/nonexistent/last.pt"], "trainer.resume="),
    (["trainer.resume={cut}"], "truncated or corrupted"),
    (["trainer.resume={ckpt}", "model.lmbda=0.05"], "trainer.resume_strict=false"),
    (
        [
            "trainer.resume={ckpt}",
            "trainer.resume_strict=false",
            "model.encoder.stages.0.out_channels=16",
        ],
        "does not match the configured architecture",
    ),
    (["trainer.batch_size=100000"], "lower trainer.batch_size"),
    (["trainer.max_steps=0"], "trainer.max_steps must be >= 1"),
    (["optim.lr_decay=cosine"], "optim.lr_decay"),
    (["++model.encoder.nonsense=1"], "nonsense"),
    (["model.encoder._target_=os.system"], "model.encoder._target_"),
]
if not torch.cuda.is_available():
    TRAIN_FAULTS.append((["trainer.device=cuda"], "trainer.device"))


@pytest.mark.parametrize("overrides, needle", TRAIN_FAULTS, ids=lambda v: str(v)[:40])
def test_train_faults_have_one_clear_answer(files, tmp_path, overrides, needle):
    overrides = [o.format(**files) for o in overrides]
    with pytest.raises(USER_ERRORS) as err:
        train_run(cfg_of("train", [*SMOKE, *overrides]), tmp_path / "run")
    assert needle in str(err.value), str(err.value)
    assert "\n" not in str(err.value).strip()
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained or written


def test_an_unwritable_run_directory_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="hydra.run.dir"):
        train_run(cfg_of("train", SMOKE), tmp_path / "file" / "run")


EVAL_FAULTS = [
    (["checkpoint=/nonexistent.pt"], "no pretrained model"),
    (["checkpoint={cut}"], "truncated or corrupted"),
    (["checkpoint={evil}"], "numpy.savetxt"),
    (["checkpoint=quickstart", "dataset=natural_patches"], "channels"),
]


@pytest.mark.parametrize("overrides, needle", EVAL_FAULTS, ids=lambda v: str(v)[:40])
def test_eval_faults_have_one_clear_answer(files, tmp_path, overrides, needle):
    overrides = [o.format(**files) for o in overrides]
    with pytest.raises(USER_ERRORS) as err:
        eval_cli.run(cfg_of("eval", [*overrides, "eval.plots=false"]), tmp_path / "out")
    assert needle in str(err.value), str(err.value)
    assert not (tmp_path / "out" / "eval.json").exists()
    assert not (files["dir"] / "pwned").exists()


def test_the_console_scripts_log_the_message_and_exit_with_their_status(caplog, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("CTRL_CSC_TRACEBACK", raising=False)
    with caplog.at_level(logging.ERROR, "ctrl_csc"), pytest.raises(SystemExit) as stop:
        with one_clear_answer():
            raise ValueError("dataset.root: no such folder")
    assert stop.value.code == EXIT_USER_ERROR == 2
    assert caplog.messages == ["dataset.root: no such folder"]
    with pytest.raises(SystemExit) as stop, one_clear_answer():
        raise NonFiniteObjectiveError("the decoder objective became nan")
    assert stop.value.code == EXIT_NON_FINITE == 3
    with pytest.raises(KeyError), one_clear_answer():  # a bug, not a user error: traceback
        raise KeyError("x")
    monkeypatch.setenv("CTRL_CSC_TRACEBACK", "1")
    with pytest.raises(ValueError), one_clear_answer():
        raise ValueError("let through for debugging")


def _cli(module, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_eval_of_a_hostile_release_prints_one_line_and_exits_2(files, tmp_path):
    out = _cli("ctrl_csc.evaluate", f"checkpoint={files['evil']}", f"hydra.run.dir={tmp_path}")
    assert out.returncode == EXIT_USER_ERROR, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "Traceback" not in text and "numpy.savetxt" in text and str(files["evil"]) in text
    errors = [line for line in text.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, text
    assert not (files["dir"] / "pwned").exists()


def test_train_refusing_a_resume_prints_one_line_and_exits_2(files, tmp_path):
    out = _cli(
        "ctrl_csc.train",
        *SMOKE,
        f"trainer.resume={files['ckpt']}",
        "seed=7",
        f"hydra.run.dir={tmp_path}",
    )
    assert out.returncode == EXIT_USER_ERROR, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "Traceback" not in text and "seed: checkpoint 0, now 7" in text
    assert load_checkpoint(files["ckpt"])["step"] == 2
