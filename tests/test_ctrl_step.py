"""The closed-loop game, through :class:`CTRLStep`'s own ``__call__`` (DESIGN §2).

Tiny players, plain SGD (an update is ``lr`` times the gradient, so its sign and size can be read
off the parameters), every objective variant. The reference is a straightforward step written
here from DESIGN §2 — ``k`` times: ``X̂ = g(f(X))`` without gradient, ascend ``total`` of
``(f(X), f(X̂))`` in f's parameters; then once: ``Z = f(X)`` without gradient, descend
``decoder_total`` of ``(Z, f(g(Z)))`` in g's parameters — and the step must match it.
"""

import copy

import pytest
import torch
from torch import nn

from ctrl_csc.engine import CTRLStep, Game
from ctrl_csc.engine.distributed import DistContext
from ctrl_csc.losses import CTRLObjective
from ctrl_csc.models import DCGANDecoder, DCGANEncoder

N, D, K = 32, 8, 3  # batch, feature dimension, classes
LR_F, LR_G = 2e-3, 0.05  # small enough that one update moves each quantity the right way

VARIANTS = {
    "binary": {"variant": "binary"},
    "multiclass": {"variant": "multiclass", "num_classes": K},
    # the two players' quantities differ: R(Z) + ΔR − βD for f, ΔR + βD for g
    "samplewise_l2": {"variant": "samplewise", "distance": "l2", "beta": 2.0},
    "samplewise_rate": {"variant": "samplewise", "distance": "rate", "beta": 1.0},
}


class MLPEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, D)

    def forward(self, x):
        return nn.functional.normalize(self.fc(torch.relu(self.conv(x)).flatten(1)), dim=1)


class MLPDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, 32)
        self.fc2 = nn.Linear(32, 64)

    def forward(self, z):
        return torch.tanh(self.fc2(torch.relu(self.fc1(z)))).view(-1, 1, 8, 8)


# CTRLStep options that must not change the step of players without batch statistics
STEP_OPTIONS = {"apart": {}, "joint_batch": {"joint_batch": True}}


def players(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        return MLPEncoder(), MLPDecoder()
    kw = {"image_size": 8, "feature_dim": D, "base_channels": 4, "norm": "none"}
    return DCGANEncoder(1, num_down=2, **kw), DCGANDecoder(1, num_up=2, **kw)


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(N, 1, 8, 8, generator=g) * 2 - 1
    return x, torch.randint(0, K, (N,), generator=g)


def sgd_game(f, g, lr_f=LR_F, lr_g=LR_G, game_cls=Game, **kw):
    opts = {
        "encoder": torch.optim.SGD(f.parameters(), lr=lr_f),
        "decoder": torch.optim.SGD(g.parameters(), lr=lr_g),
    }
    return game_cls(f, g, opts, DistContext(), **kw)


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def with_params(module, params):
    """A copy of ``module`` with the flat parameters ``params`` (e.g. those before a step)."""
    module = copy.deepcopy(module)
    torch.nn.utils.vector_to_parameters(params, module.parameters())
    return module


def clip(grads, max_norm):
    if max_norm is None:
        return grads
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return [g * min(1.0, max_norm / (float(norm) + 1e-6)) for g in grads]


def reference_step(f, g, obj, x, y, k, lr_f=LR_F, lr_g=LR_G, grad_clip=None):
    """DESIGN §2's training step with SGD, on copies; returns the updated copies and the
    encoder's gradient of ``-total`` in its last update."""
    f, g = copy.deepcopy(f), copy.deepcopy(g)
    labels = y if obj.needs_labels else None
    grads = None
    for _ in range(k):
        with torch.no_grad():
            x_hat = g(f(x))
        total = obj(f(x), f(x_hat), labels).total
        grads = clip(torch.autograd.grad(-total, list(f.parameters())), grad_clip)
        with torch.no_grad():
            for p, gr in zip(f.parameters(), grads):
                p.sub_(lr_f * gr)
    with torch.no_grad():
        z = f(x)
    decoder_total = obj(z, f(g(z)), labels).decoder_total
    grads_g = clip(torch.autograd.grad(decoder_total, list(g.parameters())), grad_clip)
    with torch.no_grad():
        for p, gr in zip(g.parameters(), grads_g):
            p.sub_(lr_g * gr)
    return f, g, grads


def assert_same_update(before, after, ref, rtol=1e-4):
    """``after - before`` equals ``ref - before`` up to ``rtol`` of its norm (and is not zero)."""
    step, expected = after - before, ref - before
    assert expected.norm() > 0
    assert (step - expected).norm() <= rtol * expected.norm(), (
        f"update off by {float((step - expected).norm() / expected.norm()):.3g} of its norm"
    )


class RecordingGame(Game):
    """A :class:`Game` that records, around each ``update``, both players' parameters and
    ``.grad`` (the backward pass happens inside ``update``)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls = []

    def _snapshot(self):
        return {
            name: [
                (p.detach().clone(), None if p.grad is None else p.grad.clone())
                for p in m.parameters()
            ]
            for name, m in self.modules.items()
        }

    def update(self, players, loss, last=False):
        before = self._snapshot()
        super().update(players, loss, last)
        self.calls.append((tuple(players), before, self._snapshot()))


def assert_untouched(before, after, what):
    for i, ((p0, g0), (p1, g1)) in enumerate(zip(before, after)):
        assert torch.equal(p0, p1), f"{what}: parameter {i} changed"
        assert (g0 is None) == (g1 is None), f"{what}: .grad {i} appeared or vanished"
        if g0 is not None:
            assert torch.equal(g0, g1), f"{what}: .grad {i} changed"


def encoder_quantity(f, g, obj, x, y, x_hat=None):
    """``total`` at ``(f(X), f(X̂))``, ``X̂ = g(f(X))`` unless given."""
    labels = y if obj.needs_labels else None
    with torch.no_grad():
        x_hat = g(f(x)) if x_hat is None else x_hat
        return obj(f(x), f(x_hat), labels).total.item()


def decoder_quantity(f, g, obj, x, y):
    labels = y if obj.needs_labels else None
    with torch.no_grad():
        z = f(x)
        return obj(z, f(g(z)), labels).decoder_total.item()


# ------------------------------------------------------------------ the whole step


@pytest.mark.parametrize("options", sorted(STEP_OPTIONS))
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("model", ["mlp", "dcgan"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_step_is_k_encoder_ascents_then_one_decoder_descent(variant, model, k, options):
    f, g = players(model)
    obj = CTRLObjective(**VARIANTS[variant])
    x, y = batch()
    ref_f, ref_g, _ = reference_step(f, g, obj, x, y, k)
    f0, g0 = flat(f), flat(g)
    game = sgd_game(f, g, game_cls=RecordingGame)
    out = CTRLStep(obj, encoder_steps=k, **STEP_OPTIONS[options])(game, x, y)
    assert [c[0] for c in game.calls] == [("encoder",)] * k + [("decoder",)]
    assert_same_update(f0, flat(f), flat(ref_f))
    assert_same_update(g0, flat(g), flat(ref_g))
    # what it returns is the objective of the decoder phase (on the updated encoder)
    labels = y if obj.needs_labels else None
    with torch.no_grad():
        z = ref_f(x)
        terms = obj(z, ref_f(with_params(g, g0)(z)), labels).as_dict()
    assert {"objective/total", "objective/decoder_total"} <= out.keys()
    for name, value in terms.items():
        if f"objective/{name}" in out:
            assert float(out[f"objective/{name}"]) == pytest.approx(value, rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------ each phase on its own


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encoder_phase_raises_total_and_leaves_the_decoder_alone(variant):
    f, g = players("mlp")
    obj = CTRLObjective(**VARIANTS[variant])
    x, y = batch()
    with torch.no_grad():
        x_hat = g(f(x))  # what the encoder sees as transcriptions in its update
    before = encoder_quantity(f, g, obj, x, y, x_hat)
    game = sgd_game(f, g, lr_g=0.0, game_cls=RecordingGame)  # only the encoder moves
    CTRLStep(obj)(game, x, y)
    assert encoder_quantity(f, g, obj, x, y, x_hat) > before + 1e-4
    players_, before, after = game.calls[0]
    assert players_ == ("encoder",)
    assert_untouched(before["decoder"], after["decoder"], "decoder during the encoder update")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decoder_phase_lowers_decoder_total(variant):
    f, g = players("mlp")
    obj = CTRLObjective(**VARIANTS[variant])
    x, y = batch()
    before = decoder_quantity(f, g, obj, x, y)
    game = sgd_game(f, g, lr_f=0.0)  # only the decoder moves
    f0 = flat(f)
    CTRLStep(obj)(game, x, y)
    assert torch.equal(flat(f), f0)
    assert decoder_quantity(f, g, obj, x, y) < before - 1e-4


@pytest.mark.parametrize("options", sorted(STEP_OPTIONS))
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decoder_phase_leaves_encoder_parameters_and_grads_unchanged(variant, k, options):
    f, g = players("mlp")
    obj = CTRLObjective(**VARIANTS[variant])
    x, y = batch()
    _, _, last_encoder_grads = reference_step(f, g, obj, x, y, k)
    game = sgd_game(f, g, game_cls=RecordingGame)
    CTRLStep(obj, encoder_steps=k, **STEP_OPTIONS[options])(game, x, y)
    players_, before, after = game.calls[-1]
    assert players_ == ("decoder",)
    assert all(gr is not None for _, gr in before["encoder"])  # the encoder's own update's
    assert_untouched(before["encoder"], after["encoder"], "encoder during the decoder update")
    # and what is left there is the encoder's gradient of -total from its last update
    left = torch.cat([p.grad.flatten() for p in f.parameters()])
    expected = torch.cat([gr.flatten() for gr in last_encoder_grads])
    assert (left - expected).norm() <= 1e-4 * expected.norm()
    assert all(p.requires_grad for p in f.parameters())


@pytest.mark.parametrize("k", [1, 2, 4])
def test_encoder_steps_makes_exactly_k_encoder_updates(k):
    f, g = players("mlp")
    obj = CTRLObjective(**VARIANTS["samplewise_l2"])
    x, y = batch()
    game = sgd_game(f, g, lr_g=0.0, game_cls=RecordingGame)
    f0 = flat(f)
    CTRLStep(obj, encoder_steps=k)(game, x, y)
    assert [c[0] for c in game.calls] == [("encoder",)] * k + [("decoder",)]
    changed = [
        not torch.equal(flat_of(b["encoder"]), flat_of(a["encoder"])) for _, b, a in game.calls
    ]
    assert changed == [True] * k + [False]
    for j in (k - 1, k + 1):  # one update fewer or more is another point
        ref_f, _, _ = reference_step(with_params(f, f0), g, obj, x, y, j)
        assert not torch.allclose(flat(f), flat(ref_f), rtol=0, atol=1e-6)
    ref_f, _, _ = reference_step(with_params(f, f0), g, obj, x, y, k)
    assert_same_update(f0, flat(f), flat(ref_f))


def flat_of(snapshot):
    return torch.cat([p.flatten() for p, _ in snapshot])


# ------------------------------------------------------------------ mixed precision, clipping


def test_bf16_autocast_step_on_cpu_runs_in_bf16_and_follows_the_fp32_step():
    f, g = players("mlp")
    obj = CTRLObjective(**VARIANTS["samplewise_l2"])
    x, y = batch()
    ref_f, ref_g, _ = reference_step(f, g, obj, x, y, 1)
    f0, g0 = flat(f), flat(g)
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)) for m in (f.fc, g.fc2)]
    game = sgd_game(f, g, amp=True, amp_dtype="bfloat16")
    out = CTRLStep(obj)(game, x, y)
    for h in hooks:
        h.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the players ran under autocast
    assert all(p.dtype == torch.float32 for p in [*f.parameters(), *g.parameters()])
    assert all(torch.isfinite(torch.tensor(float(v))) for v in out.values())
    # bf16 has ~3 significant digits: the update follows the fp32 one, not exactly
    assert_same_update(f0, flat(f), flat(ref_f), rtol=0.1)
    assert_same_update(g0, flat(g), flat(ref_g), rtol=0.1)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_grad_clip_bounds_each_players_update(max_norm):
    f, g = players("mlp")
    obj = CTRLObjective(**VARIANTS["samplewise_l2"])
    x, y = batch()
    ref_f, ref_g, _ = reference_step(f, g, obj, x, y, 1, grad_clip=max_norm)
    free_f, free_g, _ = reference_step(f, g, obj, x, y, 1)
    f0, g0 = flat(f), flat(g)
    game = sgd_game(f, g, grad_clip=max_norm)
    CTRLStep(obj)(game, x, y)
    assert_same_update(f0, flat(f), flat(ref_f))
    assert_same_update(g0, flat(g), flat(ref_g))
    if max_norm < 1:  # clipping active: each update has norm lr · max_norm
        assert float((flat(f) - f0).norm()) == pytest.approx(LR_F * max_norm, rel=1e-3)
        assert float((flat(g) - g0).norm()) == pytest.approx(LR_G * max_norm, rel=1e-3)
        assert not torch.allclose(flat(f), flat(free_f), rtol=0, atol=1e-6)
    else:  # inactive: the unclipped step
        assert torch.equal(flat(ref_f), flat(free_f)) and torch.equal(flat(ref_g), flat(free_g))


class BNEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, D)

    def forward(self, x):
        return nn.functional.normalize(self.fc(torch.relu(self.bn(self.conv(x))).flatten(1)), 1)


class BufferRecordingGame(Game):
    """Records the encoder's batch-norm buffers when each update starts and ends."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.records = []

    def _buffers(self):
        return [b.detach().clone() for b in self.raw_encoder.buffers()]

    def update(self, players, loss, last=False):
        start = self._buffers()
        super().update(players, loss, last)
        self.records.append((players, start, self._buffers()))


@pytest.mark.parametrize("joint", [False, True])
def test_decoder_phase_leaves_the_encoders_batch_statistics(joint):
    torch.manual_seed(0)
    f, g = BNEncoder(), MLPDecoder()
    game = sgd_game(f, g, game_cls=BufferRecordingGame)
    step = CTRLStep(CTRLObjective(**VARIANTS["samplewise_l2"]), joint_batch=joint)
    x, y = batch()
    step(game, x, y)
    (enc, _, after_encoder), (dec, before_decoder, _) = game.records
    assert enc == ("encoder",) and dec == ("decoder",)
    for a, b in zip(after_encoder, before_decoder):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class StateRecordingGame(Game):
    """Records both players' whole state (state dict: parameters, batch-norm statistics, solver
    buffers; and ``.grad``) when each update starts and ends."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.records = []

    def state(self):
        return {
            name: (
                {k: v.detach().clone() for k, v in m.state_dict().items()},
                [None if p.grad is None else p.grad.clone() for p in m.parameters()],
            )
            for name, m in self.modules.items()
        }

    def update(self, players, loss, last=False):
        start = self.state()
        super().update(players, loss, last)
        self.records.append((players, start, self.state()))


def assert_same_state(a, b, what):
    (sa, ga), (sb, gb) = a, b
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{what}: {k} moved"
    for i, (x, y) in enumerate(zip(ga, gb, strict=True)):
        assert (x is None and y is None) or torch.equal(x, y), f"{what}: .grad {i} changed"


@pytest.mark.parametrize("joint", [False, True])
def test_each_phase_leaves_the_other_players_whole_state(joint):
    """CSC players with batch norm and unrolled solvers: the encoder phase does not move the
    decoder (its running statistics, Lipschitz estimates, parameters, gradients), the decoder
    phase does not move the encoder."""
    from ctrl_csc.models import CSCDecoder, CSCEncoder

    torch.manual_seed(0)
    stages = [{"out_channels": 4, "stride": 2}, {"out_channels": 6, "stride": 2}]
    f = CSCEncoder(1, 8, feature_dim=D, stages=stages, norm="batch")
    mirrored = [{"in_channels": 6, "stride": 2}, {"in_channels": 4, "stride": 2}]
    g = CSCDecoder(1, 8, feature_dim=D, stages=mirrored, norm="batch")
    game = sgd_game(f, g, game_cls=StateRecordingGame)
    step = CTRLStep(CTRLObjective(**VARIANTS["samplewise_l2"]), encoder_steps=2, joint_batch=joint)
    x, y = batch()
    step(game, x, y)  # first use: each model's estimates are made for these sizes
    game.records.clear()
    start = game.state()
    step(game, x, y)
    end = game.state()
    *encoder_rounds, (last, _, _) = game.records
    assert [r[0] for r in encoder_rounds] == [("encoder",)] * 2 and last == ("decoder",)
    for _, before, after in encoder_rounds:
        assert_same_state(before["decoder"], start["decoder"], "encoder phase, decoder")
        assert_same_state(after["decoder"], start["decoder"], "encoder phase, decoder")
    assert_same_state(end["encoder"], encoder_rounds[-1][2]["encoder"], "decoder phase, encoder")
    # and each player's own phase does move its statistics and estimates
    for name in ("encoder", "decoder"):
        moved = [k for k in start[name][0] if not torch.equal(start[name][0][k], end[name][0][k])]
        assert any("running_mean" in k for k in moved), name
        assert any("lipschitz_estimate" in k for k in moved), name


def test_joint_batch_normalises_data_and_transcriptions_together():
    """With batch norm, the joint step's encoder update is that of the objective on
    ``f([X; X̂])`` (one batch's statistics), with ``X̂ = g(f(X))`` made without touching the
    running statistics; the running mean moves by the statistics of that joint batch only."""
    torch.manual_seed(0)
    f, g = BNEncoder(), MLPDecoder()
    obj = CTRLObjective(**VARIANTS["samplewise_l2"])
    x, y = batch()
    ref_f, ref_g = copy.deepcopy(f), copy.deepcopy(g)
    # reference, written out: statistics of X alone for X̂, then one pass on [X; X̂]
    with torch.no_grad():
        stats = [b.clone() for b in ref_f.buffers()]
        x_hat = ref_g(ref_f(x))
        for b, s in zip(ref_f.buffers(), stats):
            b.copy_(s)
        pre_bn = ref_f.conv(torch.cat([x, x_hat]))
    both = ref_f(torch.cat([x, x_hat]))
    total = obj(both[:N], both[N:]).total
    grads = torch.autograd.grad(-total, list(ref_f.parameters()))
    expected = flat(f) - LR_F * torch.cat([gr.flatten() for gr in grads])
    expected_mean = 0.9 * torch.zeros(4) + 0.1 * pre_bn.mean((0, 2, 3))

    game = sgd_game(f, g, game_cls=BufferRecordingGame)
    CTRLStep(obj, joint_batch=True)(game, x, y)
    _, _, after_encoder = game.records[0]
    assert_same_update(flat(ref_f), flat(f), expected)
    torch.testing.assert_close(after_encoder[0], expected_mean, rtol=1e-5, atol=1e-6)
    # encoded apart, X̂'s batch is normalised by its own statistics: a different update
    f2, g2 = copy.deepcopy(ref_f), copy.deepcopy(ref_g)
    game2 = sgd_game(f2, g2)
    CTRLStep(obj, joint_batch=False)(game2, x, y)
    assert (flat(f2) - expected).norm() > 1e-3 * (expected - flat(ref_f)).norm()


def csc_players_and_plain_step(encoder_stage):
    """Two-stage float64 CSC players (encoder stages ``encoder_stage``), the sample-wise ℓ2
    objective and a batch, each model's step sizes estimated; and a copy of the encoder after
    one step of the plain game: ``(f, g, objective, x, y, plain_f)``."""
    from ctrl_csc.models import CSCDecoder, CSCEncoder

    torch.manual_seed(0)
    f = CSCEncoder(1, 8, feature_dim=D, stages=[encoder_stage] * 2).double()
    g = CSCDecoder(1, 8, feature_dim=D, stages=[{"in_channels": 4, "stride": 2}] * 2).double()
    obj = CTRLObjective(**VARIANTS["samplewise_l2"])
    x, y = batch()
    x = x.double()
    with torch.no_grad():  # first use: each model estimates its step sizes for these sizes
        g(f(x))
    plain_f = copy.deepcopy(f)
    CTRLStep(obj)(sgd_game(plain_f, copy.deepcopy(g)), x, y)
    return f, g, obj, x, y, plain_f


@pytest.mark.parametrize("code_beta", [2.0, [3.0, 0.0]])
def test_code_consistency_term_is_added_to_the_decoders_quantity_only(code_beta):
    """With ``code_beta`` the decoder descends ``decoder_total + Σ β_l mean_i ‖c_l(x_i) −
    c_l(x̂_i)‖²/‖c_l(x_i)‖²`` (written out here from the encoder's codes); the encoder's update is
    that of the plain game."""
    f, g, obj, x, y, plain_f = csc_players_and_plain_step({"out_channels": 4, "stride": 2})
    ref_g = copy.deepcopy(g)
    out = CTRLStep(obj, code_beta=code_beta)(sgd_game(f, g), x, y)
    assert torch.equal(flat(f), flat(plain_f))  # the encoder's update is the game's
    # the reference decoder update, from the encoder as the step left it
    weights = [code_beta] * 2 if isinstance(code_beta, float) else code_beta
    from ctrl_csc.engine.steps import frozen_state

    with frozen_state(plain_f):  # as the step runs it: no refresh of its step sizes
        with torch.no_grad():
            z, codes = plain_f.forward_with_codes(x)
        z_hat, codes_hat = plain_f.forward_with_codes(ref_g(z))
    term = sum(
        w * ((c - ch).pow(2).sum((1, 2, 3)) / c.pow(2).sum((1, 2, 3))).mean()
        for w, c, ch in zip(weights, codes, codes_hat, strict=True)
    )
    total = obj(z, z_hat).decoder_total + term
    grads = torch.autograd.grad(total, list(ref_g.parameters()))
    expected = flat(ref_g) - LR_G * torch.cat([gr.flatten() for gr in grads])
    torch.testing.assert_close(flat(g), expected, rtol=1e-9, atol=1e-12)
    assert out["objective/code_distance"] == pytest.approx(float(term.detach()), rel=1e-9)


def test_code_beta_is_checked():
    obj = CTRLObjective("samplewise")
    for bad in (-1.0, [1.0, -0.5], [], "1", True):
        with pytest.raises(ValueError, match="loss.code_beta must be a number >= 0"):
            CTRLStep(obj, code_beta=bad)
    step = CTRLStep(obj, code_beta=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="has 3 weights but the encoder has 2 stages"):
        step.code_distance([torch.ones(2, 3)] * 2, [torch.zeros(2, 3)] * 2)


def _misfit_written_out(f, x):
    """``Σ_l mean_i (1 − cos²(u_l, D_l c_l))`` from the stages' codes, with the synthesis as
    torch's own transposed convolution of each stage's unit-norm dictionary."""
    with torch.no_grad():
        codes = f.stage_outputs(x)
    inputs = [x, *codes[:-1]]  # the stages of this encoder: no norm, identity activation
    total = 0.0
    for layer, u, c in zip(f.stages, inputs, codes, strict=True):
        fit = nn.functional.conv_transpose2d(
            c, layer.dictionary(), stride=layer.stride, padding=layer.padding
        )
        u, fit = u.flatten(1), fit.flatten(1)
        cos = (u * fit).sum(1) / (u.norm(dim=1) * fit.norm(dim=1))
        total = total + (1 - cos**2).mean()
    return total


def test_dictionary_fit_moves_the_encoders_dictionaries_only():
    """With ``dictionary_beta`` the encoder descends ``−total + β Σ_l mean_i (1 − cos²(u_l,
    D_l c_l))`` (written out here with torch's transposed convolution), whose second part reaches
    the dictionaries alone: every other parameter of the encoder moves as in the plain game."""
    stage = {"out_channels": 4, "stride": 2, "kernel_size": 4, "padding": 1}
    f, g, obj, x, y, plain_f = csc_players_and_plain_step(stage)
    ref_f = copy.deepcopy(f)
    beta = 0.7
    out = CTRLStep(obj, dictionary_beta=beta)(sgd_game(f, g), x, y)

    from ctrl_csc.engine.steps import frozen_state

    with torch.no_grad():  # the game's two passes, f(X) and f(X̂), each refresh the step sizes
        ref_f(x), ref_f(x)
    with frozen_state(ref_f):  # as the step runs it: no further refresh
        misfit = _misfit_written_out(ref_f, x)
    assert 0 < float(misfit.detach()) < 2  # a share of each of the two stages' inputs
    assert out["objective/dictionary_misfit"] == pytest.approx(float(misfit.detach()), rel=1e-9)
    dictionaries = {f"stages.{i}.weight" for i in range(2)}
    params = dict(ref_f.named_parameters())
    assert dictionaries <= params.keys()
    grads = dict(
        zip(params, torch.autograd.grad(beta * misfit, list(params.values()), allow_unused=True))
    )
    moved, plain = dict(f.named_parameters()), dict(plain_f.named_parameters())
    for name, p in moved.items():
        if name in dictionaries:  # the plain update, then the fit's gradient step
            expected = plain[name].detach() - LR_F * grads[name]
            assert grads[name].norm() > 0
            torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-12)
        else:
            assert grads[name] is None or not grads[name].any(), name
            torch.testing.assert_close(p.detach(), plain[name].detach(), rtol=1e-9, atol=1e-12)


def test_dictionary_beta_is_checked():
    obj = CTRLObjective("samplewise")
    for bad in (-1.0, [1.0], "1", True, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="loss.dictionary_beta must be a finite number >= 0"):
            CTRLStep(obj, dictionary_beta=bad)
    f, g = players("dcgan")
    x, y = batch()
    with pytest.raises(ValueError, match="DCGANEncoder has none; set loss.dictionary_beta=0"):
        CTRLStep(obj, dictionary_beta=1.0)(sgd_game(f, g), x, y)
