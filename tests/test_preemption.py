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
from tiny_players import make_trainer

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
        [sys.executable, "-m", "ctrl_csc.cli.train", *OVERRIDES, f"hydra.run.dir={out}"],
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


# ------------------------------------------------------------------------------ Slurm requeue


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """An ``scontrol`` on PATH that records its arguments, and whether ``last.pt`` was already
    on disk when it was called (``$FAKE_CKPT``)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(
        "#!/bin/sh\n"
        'if [ -f "$FAKE_CKPT" ]; then saved=saved; else saved=unsaved; fi\n'
        'echo "$* $saved" >> "$FAKE_SCONTROL_LOG"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SCONTROL_LOG", str(log))
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    return lambda: log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"SLURM_JOB_ID": "4242"}, ["requeue 4242 saved"]),
        (
            {"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "7"},
            ["requeue 4242_7 saved"],
        ),
        ({}, []),  # not a Slurm job: nothing to requeue
    ],
)
def test_a_plain_slurm_job_is_requeued_with_scontrol_after_saving(
    tmp_path, monkeypatch, fake_scontrol, env, expected
):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FAKE_CKPT", str(tmp_path / "run" / "checkpoints" / "last.pt"))
    trainer = make_trainer(tmp_path / "run", max_steps=10, step=SignalsItselfAt(signal.SIGTERM, 2))
    with pytest.raises(TrainingPreempted) as stop:
        trainer.fit()
    assert stop.value.code == PREEMPTED_EXIT_CODE
    assert fake_scontrol() == expected


def test_requeue_false_leaves_the_job_alone(tmp_path, monkeypatch, fake_scontrol):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    trainer = make_trainer(
        tmp_path, max_steps=10, step=SignalsItselfAt(signal.SIGTERM, 2), requeue=False
    )
    with pytest.raises(TrainingPreempted):
        trainer.fit()
    assert fake_scontrol() == []
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 2


class _SignalsAtItem(torch.utils.data.Dataset):
    """The training set, sending ``signum`` to this process when item ``at`` is read (in the
    middle of a step: the smoke trainer reads in the main process)."""

    def __init__(self, data, signum, at):
        self.data, self.signum, self.at, self.reads = data, signum, at, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.at:
            os.kill(os.getpid(), self.signum)
        return self.data[i]


def _weights(path):
    return load_checkpoint(path)["models"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_under_submitit_a_signal_requeues_the_job_which_continues_where_it_stopped(
    tmp_path, monkeypatch, fake_scontrol, signum
):
    """``hydra/launcher=slurm``: submitit's own handler checkpoints the launcher's call and runs
    ``scontrol requeue`` for SIGUSR2, and, through the trainer, for SIGTERM (which submitit alone
    only logs). The requeued job (``SLURM_RESTART_COUNT=1``, the same run directory) continues
    from its ``last.pt`` to the weights of an uninterrupted run, bit for bit."""
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
    from submitit.core.utils import DelayedSubmission, JobPaths
    from submitit.slurm.slurm import SlurmJobEnvironment

    import ctrl_csc.cli.train as train_cli

    out = tmp_path / "job"
    for k, v in {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FAKE_CKPT", str(out / "checkpoints" / "last.pt"))
    steps = ["trainer=smoke", "trainer.max_steps=6", "trainer.log_every=1"]

    # what submitit does at the start of a job: its handlers, around the launcher's call
    delayed = DelayedSubmission(SlurmLauncher(), steps, "hydra.sweep.dir", 0, "job_id_for_0", {})
    delayed.set_timeout(60, 3)
    paths = JobPaths(tmp_path / "submitit", job_id="4242")
    paths.folder.mkdir(parents=True)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    saved[signal.SIGCONT] = signal.getsignal(signal.SIGCONT)
    real_build = train_cli.build_datasets

    def build(dataset_cfg, splits=("train", "test")):
        train, test = real_build(dataset_cfg, splits)
        return _SignalsAtItem(train, signum, 8 * 2 + 3), test  # during step 3

    try:
        SlurmJobEnvironment()._handle_signals(paths, delayed)
        monkeypatch.setattr(train_cli, "build_datasets", build)
        with pytest.raises(SystemExit) as stop:
            train_cli.run(cfg_of(steps), out)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        monkeypatch.setattr(train_cli, "build_datasets", real_build)
    assert stop.value.code == -1  # submitit's exit once the job is requeued
    assert fake_scontrol() == ["requeue 4242 saved"]  # requeued after last.pt was written
    again = DelayedSubmission.load(paths.submitted_pickle)  # what the requeued job will run
    assert isinstance(again.function, SlurmLauncher) and again.args[0] == steps
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3
    assert submitit is not None

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued job, in its own directory
    train_cli.run(cfg_of(steps), out)
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    train_cli.run(cfg_of(steps), tmp_path / "full")
    a, b = (
        _weights(out / "checkpoints" / "last.pt"),
        _weights(tmp_path / "full" / "checkpoints" / "last.pt"),
    )
    for part in ("encoder", "decoder"):
        for k, v in b[part].items():
            assert torch.equal(a[part][k], v), (part, k)


def test_the_slurm_launcher_requeues_on_timeouts_too():
    """hydra-submitit-launcher's default ``max_num_timeout`` is 0: a job reaching its time limit
    would stop for good. The project's ``hydra/launcher=slurm`` requeues it."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.max_num_timeout >= 1
    assert cfg.hydra.launcher.signal_delay_s >= 60  # time to finish the step and save
