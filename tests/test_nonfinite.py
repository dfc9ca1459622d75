"""A non-finite objective saves the state from before the failing step and names the player and
the step; a state with non-finite weights is never written."""

import pytest
import torch
from tiny_players import assert_same_weights, make_trainer, resumable_trainer

from ctrl_csc.engine import CTRLStep, NonFiniteObjectiveError, load_checkpoint
from ctrl_csc.losses import CTRLObjective


class DecoderExplodesAt(CTRLStep):
    """The decoder's objective becomes NaN in step ``at`` (1-based), *after* that step's
    ``encoder_steps`` encoder updates were applied."""

    def __init__(self, at, **kw):
        super().__init__(CTRLObjective("samplewise"), noise_std=0.05, **kw)
        self.at, self.calls = at, 0

    def __call__(self, game, x, y):
        self.calls += 1
        if self.calls != self.at:
            return super().__call__(game, x, y)
        check = game.check_finite

        def poisoned(value, what):
            check(value * float("nan") if what == "decoder objective" else value, what)

        game.check_finite = poisoned
        try:
            return super().__call__(game, x, y)
        finally:
            del game.check_finite


def test_decoder_failure_after_encoder_updates_saves_the_state_from_before_the_step(tmp_path):
    # the truth: an uninterrupted run of the same trainer to step 5
    good = resumable_trainer(tmp_path / "good")
    good.max_steps = 5
    good.fit()
    reference = load_checkpoint(tmp_path / "good" / "checkpoints" / "last.pt")

    bad = resumable_trainer(tmp_path / "bad")
    bad.step_fn = DecoderExplodesAt(6, encoder_steps=2)
    with pytest.raises(NonFiniteObjectiveError) as err:
        bad.fit()
    msg = str(err.value)
    assert "decoder objective" in msg and "training step 6" in msg, msg
    assert "encoder 2x" in msg and "after step 5; last good state saved" in msg, msg
    saved = load_checkpoint(tmp_path / "bad" / "checkpoints" / "last.pt")
    assert saved["step"] == 5
    for part in ("encoder", "decoder"):
        for k, v in reference["models"][part].items():
            assert torch.equal(saved["models"][part][k], v), (part, k)
    for name, opt in reference["optimizers"].items():
        for i, st in opt["state"].items():
            for k, v in st.items():
                assert torch.equal(saved["optimizers"][name]["state"][i][k], v), (name, i, k)
    assert torch.equal(saved["rng"]["torch"], reference["rng"]["torch"])

    # and a run resumed from it continues exactly like the uninterrupted one
    full = resumable_trainer(tmp_path / "full")
    full.fit()
    resumed = resumable_trainer(tmp_path / "resumed")
    resumed.fit(resume=tmp_path / "bad" / "checkpoints" / "last.pt")
    assert_same_weights(full, resumed)


def test_without_rollback_a_mid_step_state_is_not_saved(tmp_path):
    trainer = make_trainer(
        tmp_path, max_steps=8, checkpoint_every=2, rollback_nonfinite=False, step=None
    )
    trainer.step_fn = DecoderExplodesAt(4)
    with pytest.raises(NonFiniteObjectiveError, match="training step 4.*was not saved"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 2


def test_an_encoder_failure_before_any_update_names_the_encoder(tmp_path):
    class EncoderExplodes(CTRLStep):
        def __call__(self, game, x, y):
            game.check_finite(torch.tensor(float("inf")), "encoder objective")

    trainer = make_trainer(tmp_path, max_steps=4, step=EncoderExplodes(CTRLObjective("binary")))
    with pytest.raises(NonFiniteObjectiveError) as err:
        trainer.fit()
    msg = str(err.value)
    assert "encoder objective" in msg and "training step 1" in msg and "update" not in msg
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 0


def test_a_state_with_non_finite_weights_is_never_written(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit()
    path = tmp_path / "checkpoints" / "last.pt"
    before = path.read_bytes()
    with torch.no_grad():
        next(trainer.decoder.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteObjectiveError, match=r"decoder's fc\.weight is not finite"):
        trainer.save("last.pt")
    assert path.read_bytes() == before


def test_rollback_keeps_only_what_a_failure_can_corrupt(tmp_path):
    """Before a step the trainer copies buffers, scaler and RNG; the game copies a player only
    before an update that a check can follow: the encoder's in the CTRL step, nothing in the
    reconstruction step (its one update is its last)."""
    from ctrl_csc.engine import ReconstructionStep

    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit()
    assert set(trainer.game._kept) == {"encoder"}
    params, opt_state = trainer.game._kept["encoder"]
    assert len(params) == len(list(trainer.encoder.parameters())) and opt_state["state"] == {}
    ae = make_trainer(tmp_path / "ae", max_steps=1, step=ReconstructionStep())
    ae.fit()
    assert ae.game._kept == {}
    assert set(trainer._snapshot()) == {"buffers", "scaler", "rng"}
