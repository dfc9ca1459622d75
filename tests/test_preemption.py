"""Preemption: SIGTERM / SIGUSR1 finish the current step, write ``last.pt`` atomically and exit
with status 75; the resumed run ends with the weights of an uninterrupted one, bit for bit."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_engine import make_trainer

from ctrl_csc.cli.common import config_dir
from ctrl_csc.cli.train import run
from ctrl_csc.engine import CTRLStep, load_checkpoint
from ctrl_csc.engine.distributed import PREEMPTED_EXIT_CODE, TrainingPreempted
from ctrl_csc.losses import CTRLObjective

REPO = Path(__file__).resolve().parents[1]
STEPS = 60
OVERRIDES = [
    "trainer=smoke",
    f"trainer.max_steps={STEPS}",
    "trainer.log_every=1",
    "trainer.threads=1",
]


def cfg_of(overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_sigterm_mid_run_then_resume_equals_the_uninterrupted_run(tmp_path):
    out = tmp_path / "job"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctrl_csc.train", *OVERRIDES, f"hydra.run.dir={out}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rows = out / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (rows.exists() and len(rows.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the training process never started its steps"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT_CODE, log
    assert "Traceback" not in log
    stopped = load_checkpoint(out / "checkpoints" / "last.pt")
    assert 2 <= stopped["step"] < STEPS, stopped["step"]  # stopped mid-run, after a whole step
    assert "stopped after step" in log and not list((out / "checkpoints").glob("*.tmp"))

    # the job restarted in its own directory, and an uninterrupted run, in this process
    resumed = run(cfg_of([*OVERRIDES, f"trainer.resume={out}/checkpoints/last.pt"]), out)
    full = run(cfg_of(OVERRIDES), tmp_path / "full")
    a = load_checkpoint(out / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == STEPS
    for part in ("encoder", "decoder"):
        assert a["models"][part].keys() == b["models"][part].keys()
        for k, v in b["models"][part].items():
            assert torch.equal(a["models"][part][k], v), (part, k)
    assert resumed == full


class SignalsItselfAt(CTRLStep):
    """Sends ``signum`` to its own process in the middle of step ``at`` (1-based)."""

    def __init__(self, signum, at):
        super().__init__(CTRLObjective("samplewise"), noise_std=0.05)
        self.signum, self.at, self.calls = signum, at, 0

    def __call__(self, game, x, y):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return super().__call__(game, x, y)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_finishes_the_current_step_saves_and_exits_75(tmp_path, signum):
    before = signal.getsignal(signum)
    trainer = make_trainer(tmp_path, max_steps=10, step=SignalsItselfAt(signum, 3))
    with pytest.raises(TrainingPreempted) as stop:
        trainer.fit()
    assert stop.value.code == PREEMPTED_EXIT_CODE == 75 and stop.value.signum == signum
    assert trainer.step == 3  # the step in progress was finished, no further one started
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert saved["step"] == 3
    for k, v in trainer.encoder.state_dict().items():
        assert torch.equal(saved["models"]["encoder"][k], v)
    assert signal.getsignal(signum) == before  # the previous handler is back
    assert not (tmp_path / "metrics.json").exists()  # no final evaluation: it was stopped


def test_an_earlier_python_handler_is_called_after_saving(tmp_path):
    """Where a scheduler's handler was installed (submitit's resubmits the job), it runs once the
    checkpoint is on disk."""
    seen = []

    def scheduler(signum, frame):
        seen.append((signum, (tmp_path / "checkpoints" / "last.pt").exists()))

    previous = signal.signal(signal.SIGUSR1, scheduler)
    try:
        trainer = make_trainer(tmp_path, max_steps=10, step=SignalsItselfAt(signal.SIGUSR1, 2))
        with pytest.raises(TrainingPreempted):
            trainer.fit()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen == [(signal.SIGUSR1, True)]
