"""Resume is safe: ``trainer.resume=auto`` continues only the same job, a checkpoint of another
configuration is refused with the differing keys, and the stored config passes the guard."""

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ctrl_csc.cli.common import config_dir, to_container
from ctrl_csc.cli.train import run
from ctrl_csc.engine import CheckpointError, load_checkpoint, save_checkpoint
from ctrl_csc.engine.checkpoint import config_fingerprint
from ctrl_csc.pretrained.guard import UnsafeConfigError

BASE = ["trainer=smoke", "trainer.max_steps=2"]
MORE = ["trainer=smoke", "trainer.max_steps=3"]


def cfg_of(overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def trained_steps(run_dir):
    """The steps whose objective the run logged itself (a resumed run keeps the earlier rows)."""
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "objective/total" in r]


def test_auto_continues_its_own_directory_and_never_a_sibling(tmp_path):
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    run(cfg_of(BASE), a)
    run(cfg_of([*MORE, "trainer.resume=auto"]), b)  # a new run of the same name
    assert trained_steps(b) == [1, 2, 3]  # started afresh, not from a's step 2
    run(cfg_of([*MORE, "trainer.resume=auto"]), a)  # the same job again
    assert load_checkpoint(a / "checkpoints" / "last.pt")["step"] == 3
    assert trained_steps(a) == [1, 2, 3]


def test_resume_reads_the_checkpoint_once(tmp_path, monkeypatch):
    """The guard's check of the stored config and the trainer's load share one read (a large
    checkpoint is not read and unpickled twice)."""
    import ctrl_csc.cli.train as train_cli
    import ctrl_csc.engine.trainer as trainer_module

    run(cfg_of(BASE), tmp_path)
    reads = []

    def counting(path, *args, **kwargs):
        reads.append(path)
        return load_checkpoint(path, *args, **kwargs)

    monkeypatch.setattr(train_cli, "load_checkpoint", counting)
    monkeypatch.setattr(trainer_module, "load_checkpoint", counting)
    run(cfg_of([*MORE, "trainer.resume=auto"]), tmp_path)
    assert len(reads) == 1 and trained_steps(tmp_path) == [1, 2, 3]


def sweep_job(root, date, num, overrides, steps="trainer.max_steps=2"):
    """One job of a sweep as Hydra lays it out: multirun/<name>/<date>/<num>/.hydra."""
    out = root / date / str(num)
    (out / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(list(overrides)), out / ".hydra" / "overrides.yaml")
    run(cfg_of(["trainer=smoke", steps, *overrides]), out, sweep_overrides=overrides)
    return out


def test_auto_in_a_sweep_continues_the_earlier_job_with_the_same_overrides(tmp_path):
    sweep_job(tmp_path, "d1", 0, ["model.lmbda=0.1"])
    sweep_job(tmp_path, "d1", 1, ["model.lmbda=0.05"])  # newer, but another job
    again = ["model.lmbda=0.1", "trainer.resume=auto"]
    out = sweep_job(tmp_path, "d2", 0, again, steps="trainer.max_steps=3")
    assert trained_steps(out) == [3]  # continued from d1/0's step 2
    assert load_checkpoint(out / "checkpoints" / "last.pt")["config"]["model"]["lmbda"] == 0.1
    fresh = sweep_job(tmp_path, "d3", 0, ["model.lmbda=0.2", "trainer.resume=auto"])
    assert trained_steps(fresh) == [1, 2]  # no earlier job of these overrides: afresh


def test_every_checkpoint_records_the_fingerprint_of_what_determines_training(tmp_path):
    run(cfg_of(BASE), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["fingerprint"] == config_fingerprint(to_container(cfg_of(BASE)))
    other = config_fingerprint(to_container(cfg_of([*BASE, "model.lmbda=0.05"])))
    longer = config_fingerprint(to_container(cfg_of([*BASE, "trainer.max_steps=9"])))
    assert other != state["fingerprint"] == longer


def test_the_model_shape_keys_count_only_through_the_stages_they_make():
    """model.widths / first_stage / kernel_size feed model.encoder and model.decoder, which are
    fingerprinted resolved: a run saved before the configs had these keys still resumes, and a
    change of them still refuses through the stages it changes."""
    base = to_container(cfg_of(BASE))
    old = {**base, "model": {k: v for k, v in base["model"].items()
                             if k not in ("widths", "first_stage", "kernel_size")}}  # fmt: skip
    assert config_fingerprint(old) == config_fingerprint(base)
    narrower = to_container(cfg_of([*BASE, "model.widths=[16,64,128]"]))
    assert config_fingerprint(narrower) != config_fingerprint(base)


@pytest.mark.parametrize(
    "change, keys",
    [
        (["model.lmbda=0.05"], ["model.lmbda", "model.encoder.stage_defaults.lmbda"]),
        (["seed=1"], ["seed"]),
        (["optim.decoder.lr=0.1"], ["optim.decoder.lr"]),
        (["loss.objective.beta=1.0"], ["loss.objective.beta"]),
    ],
)
def test_resuming_another_configuration_is_refused_with_the_keys(tmp_path, change, keys):
    run(cfg_of(BASE), tmp_path)
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match="trainer.resume_strict=false") as err:
        run(cfg_of([*MORE, *change, "trainer.resume=auto"]), tmp_path)
    for k in keys:
        assert f"{k}: checkpoint" in str(err.value), str(err.value)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_strict_false_resumes_anyway(tmp_path):
    run(cfg_of(BASE), tmp_path)
    run(
        cfg_of([*MORE, "model.lmbda=0.05", "trainer.resume=auto", "trainer.resume_strict=false"]),
        tmp_path,
    )
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3
    assert trained_steps(tmp_path) == [1, 2, 3]


def test_a_resume_checkpoint_with_a_hostile_config_is_refused(tmp_path):
    run(cfg_of(BASE), tmp_path / "a")
    state = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    state["config"]["model"]["encoder"]["_target_"] = "numpy.savetxt"
    evil = save_checkpoint(state, tmp_path / "evil.pt")
    with pytest.raises(UnsafeConfigError, match=r"numpy\.savetxt.*evil\.pt|evil\.pt.*numpy"):
        run(cfg_of([*MORE, f"trainer.resume={evil}"]), tmp_path / "b")


def test_a_requeued_slurm_job_continues_from_its_own_directory(tmp_path, monkeypatch):
    run(cfg_of(BASE), tmp_path)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run(cfg_of(MORE), tmp_path)
    assert trained_steps(tmp_path) == [1, 2, 3]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    run(cfg_of(MORE), tmp_path / "new")
    assert trained_steps(tmp_path / "new") == [1, 2, 3]
