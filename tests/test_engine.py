"""The trainer, its steps and checkpoints, on tiny models (no Hydra)."""

import json
import os
import pickle

import pytest
import torch
from tiny_players import (
    TinyEncoder,
    assert_same_weights,
    make_trainer,
    resumable_trainer,
    tiny_data,
)

from ctrl_csc.engine import (
    CheckpointError,
    CTRLStep,
    NonFiniteObjectiveError,
    ReconstructionStep,
    ResumableSampler,
    Trainer,
    build_loader,
    load_checkpoint,
    save_checkpoint,
)
from ctrl_csc.engine.checkpoint import load_module_state
from ctrl_csc.losses import CTRLObjective

# ------------------------------------------------------------------ checkpoints


def test_checkpoint_roundtrip_is_atomic_and_weights_only(tmp_path):
    state = {"step": 3, "models": {"w": torch.arange(4.0)}, "config": {"a": [1, 2]}}
    path = save_checkpoint(state, tmp_path / "c" / "x.pt")
    assert sorted(os.listdir(tmp_path / "c")) == ["x.pt"]  # no temporary file left behind
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3 and torch.equal(loaded["models"]["w"], torch.arange(4.0))
    assert loaded["config"] == {"a": [1, 2]}


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_object_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "ctrl_csc.checkpoint/1", "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="pickled object payload"):
        load_checkpoint(path)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"x": _Payload()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain)


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    path = save_checkpoint({"step": 1, "w": torch.randn(1000)}, tmp_path / "c.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a ctrl_csc checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_architecture_mismatch_names_the_keys():
    small, big = TinyEncoder(8), TinyEncoder(16)
    with pytest.raises(CheckpointError, match=r"fc\.weight: checkpoint \(16, 256\) vs model"):
        load_module_state(small, big.state_dict(), "encoder")
    with pytest.raises(CheckpointError, match="missing in checkpoint: conv.bias"):
        load_module_state(
            small, {k: v for k, v in small.state_dict().items() if k != "conv.bias"}, "encoder"
        )


# ------------------------------------------------------------------ data order


def test_resumable_sampler_shards_and_resumes():
    full = list(ResumableSampler(10, seed=3))
    assert sorted(full) == list(range(10))
    s = ResumableSampler(10, seed=3)
    s.set_position(0, 4)
    assert list(s) == full[4:]
    s.set_position(1)
    assert list(s) != full  # a new permutation each epoch
    shards = [list(ResumableSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert all(len(p) == 3 for p in shards)
    assert set().union(*map(set, shards)) == set(full[:9])


# ------------------------------------------------------------------ the steps
# (CTRLStep, the game itself, is tested through its own __call__ in test_ctrl_step.py)


def test_reconstruction_step_trains_an_autoencoder(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=40, step=ReconstructionStep("mse", code_l1=1e-4))
    trainer.fit()
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rec = [r["loss/reconstruction"] for r in rows if "loss/reconstruction" in r]
    assert rec[-1] < 0.8 * rec[0]


# ------------------------------------------------------------------ the loop


def test_fit_writes_outputs(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, baseline_images=32)
    metrics = trainer.fit()
    assert {"psnr", "psnr_mean_image"} <= set(metrics)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["step"] == 4 and "objective/total" in summary
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert list((tmp_path / "samples").glob("*.png"))
    assert (tmp_path / "objective.png").stat().st_size > 0


@pytest.mark.parametrize("family", ["csc", "dcgan"])
def test_metric_names_are_the_keys_evaluation_gives(tmp_path, family):
    """What ``monitor=`` is checked against before training is what the evaluation returns."""
    from ctrl_csc.models import CSCDecoder, CSCEncoder, DCGANDecoder, DCGANEncoder

    torch.manual_seed(0)
    if family == "csc":
        f = CSCEncoder(1, 8, feature_dim=8, stages=[{"out_channels": 4, "stride": 2}] * 2)
        g = CSCDecoder(1, 8, feature_dim=8, stages=[{"in_channels": 4, "stride": 2}] * 2)
    else:
        shape = {"image_size": 8, "feature_dim": 8, "base_channels": 4, "norm": "none"}
        f, g = DCGANEncoder(1, num_down=2, **shape), DCGANDecoder(1, num_up=2, **shape)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.0) for k, m in (("encoder", f), ("decoder", g))}
    for baseline in (0, 16):
        trainer = Trainer(
            f, g, CTRLStep(CTRLObjective("samplewise")), opts, build_loader(tiny_data(), 16),
            eval_loader=torch.utils.data.DataLoader(tiny_data(16, 1), batch_size=8),
            output_dir=tmp_path, max_steps=1, progress=False, baseline_images=baseline,
        )  # fmt: skip
        if baseline:
            trainer._mean_image = torch.zeros(1, 1, 8, 8)
        assert trainer.metric_names() == list(trainer.evaluate())
    assert make_trainer(tmp_path).metric_names() is None  # duck-typed models: not known ahead


def test_evaluate_is_the_eval_runner_and_leaves_the_random_state(tmp_path):
    from ctrl_csc.eval import evaluate_reconstructions

    trainer = make_trainer(tmp_path, max_steps=2, baseline_images=32)
    trainer.fit()
    state = torch.get_rng_state()
    metrics = trainer.evaluate()
    assert torch.equal(torch.get_rng_state(), state)
    assert trainer.encoder.training and trainer.decoder.training
    assert list(metrics) == ["psnr", "psnr_mean_image", "density/enc0"]
    direct = evaluate_reconstructions(
        trainer.encoder, trainer.decoder, trainer.eval_loader, metrics=("psnr", "density"),
        progress=False, mean_image=trainer._mean_image,
    ).metrics  # fmt: skip
    assert metrics == {k: v for k, v in direct.items() if k != "num_images"}
    assert (tmp_path / "samples" / "step_0000002.png").is_file()


def logged_rows(run_dir, after=0):
    """Every logged row past step ``after``, wall-clock times left out."""
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if not k.startswith("time/")} for r in rows if r["step"] > after
    ]


@pytest.mark.parametrize("stopped_by", ["max_steps", "periodic_checkpoint"])
def test_resume_in_a_later_epoch_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, stopped_by):
    full = resumable_trainer(tmp_path / "full")
    full_metrics = full.fit()
    assert len(full.train_loader) == 4
    if stopped_by == "max_steps":  # a run that ended at step 6, continued to 10
        first = resumable_trainer(tmp_path / "part")
        first.max_steps = 6
        first.fit()
        checkpoint = tmp_path / "part" / "checkpoints" / "last.pt"
    else:  # a preempted job restarted from the uninterrupted run's step-6 checkpoint
        checkpoint = tmp_path / "full" / "checkpoints" / "step_0000006.pt"
    assert load_checkpoint(checkpoint)["step"] == 6
    resumed = resumable_trainer(tmp_path / "part")
    resumed_metrics = resumed.fit(resume=checkpoint)
    assert resumed.step == 10
    assert_same_weights(full, resumed)
    assert resumed_metrics == full_metrics
    # the same objective terms, held-out PSNR and densities at every logged step after 6
    after = logged_rows(tmp_path / "part", after=6)
    assert after == logged_rows(tmp_path / "full", after=6)
    assert {r["step"] for r in after if "psnr" in r} == {8, 10}
    if stopped_by == "max_steps":  # and the first part equals the uninterrupted run's too
        assert logged_rows(tmp_path / "part") == logged_rows(tmp_path / "full")
    # periodic checkpoints of the resumed run equal those of the uninterrupted one
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_0000009.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "step_0000009.pt")
    for part in ("encoder", "decoder"):
        for k, v in a["models"][part].items():
            assert torch.equal(b["models"][part][k], v)


def test_non_finite_objective_stops_after_saving_the_last_good_state(tmp_path):
    class Exploding(CTRLStep):
        calls = 0

        def __call__(self, game, x, y):
            self.calls += 1
            if self.calls == 3:  # the third step's objective is NaN, before any update
                game.check_finite(torch.tensor(float("nan")), "encoder objective")
            return super().__call__(game, x, y)

    trainer = make_trainer(tmp_path, max_steps=10, step=Exploding(CTRLObjective("binary")))
    with pytest.raises(NonFiniteObjectiveError, match="step 2; last good state saved"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 2
    for k, v in trainer.encoder.state_dict().items():
        assert torch.equal(state["models"]["encoder"][k], v)


def test_build_optimizers_linear_decay_and_none():
    """The engine builds the players' optimisers and lr schedules (cli and Python users alike):
    a linear decay reaches final_lr_factor × lr at max_steps; "none" has no schedulers."""
    from functools import partial

    from ctrl_csc.engine import build_optimizers

    enc, dec = torch.nn.Linear(2, 3), torch.nn.Linear(3, 2)
    adam = partial(torch.optim.Adam, lr=1e-3)
    optimizers, schedulers = build_optimizers(enc, dec, adam, adam, 10, "linear", 0.1)
    assert set(optimizers) == set(schedulers) == {"encoder", "decoder"}
    for _ in range(10):
        for o in optimizers.values():
            o.step()
        for s in schedulers.values():
            s.step()
    for o in optimizers.values():
        assert o.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert build_optimizers(enc, dec, adam, adam, 10, "none")[1] == {}
    with pytest.raises(ValueError, match="optim.lr_decay must be linear or none"):
        build_optimizers(enc, dec, adam, adam, 10, "cosine")


def test_vae_step_is_the_reparameterised_elbo_of_its_docstring(tmp_path):
    """One VAE step's gradient equals that of the loss written out in float64: MSE of the decoded
    reparameterised sample plus β·KL(N(μ, σ²) ‖ N(0, I)) per pixel."""
    from ctrl_csc.engine import Game, VAEStep
    from ctrl_csc.engine.distributed import DistContext
    from ctrl_csc.models import ConvDecoder, ConvVAEEncoder

    torch.manual_seed(0)
    shape = {"image_size": 8, "feature_dim": 4}
    f = ConvVAEEncoder(1, channels=[3, 5], norm="none", **shape).double()
    g = ConvDecoder(1, channels=[5, 3], norm="none", **shape).double()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64) * 2 - 1
    params = [*f.parameters(), *g.parameters()]
    torch.manual_seed(1)
    mean, log_var = f(x, with_log_variance=True)
    assert torch.equal(mean, f(x))  # forward alone is the mean
    z = mean + torch.randn_like(mean) * torch.exp(log_var / 2)
    kl = (0.5 * (mean**2 + log_var.exp() - 1 - log_var)).sum(1).mean()
    expected = ((g(z) - x) ** 2).mean() + 0.5 * kl / 64
    grads = torch.autograd.grad(expected, params)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1.0) for k, m in (("encoder", f), ("decoder", g))}
    before = [p.detach().clone() for p in params]
    torch.manual_seed(1)
    out = VAEStep(beta=0.5)(Game(f, g, opts, DistContext()), x, None)
    assert float(out["loss/total"]) == pytest.approx(float(expected.detach()), rel=1e-12)
    for p0, p1, gr in zip(before, params, grads, strict=True):
        torch.testing.assert_close(p0 - p1, gr, rtol=1e-10, atol=1e-12)
