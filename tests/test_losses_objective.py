"""CTRLObjective: every variant against a class-loop float64 reference; signs; errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from rate_reference import EPS, ref_pair, ref_R

import ctrl_csc.losses.rate as rate_mod
from ctrl_csc.losses import (
    CTRLObjective,
    ObjectiveTerms,
    pairwise_rate_reduction,
    samplewise_rate_reduction,
)


def ref_multiclass(Z, Zh, y, K, gammas=(1.0, 1.0, 1.0), eps_sq=EPS):
    n = Z.shape[0]
    rc_z = rc_zh = cw = 0.0
    for j in range(K):
        m = y == j
        nj = int(m.sum())
        if nj == 0:
            continue
        rc_z += nj / n * ref_R(Z[m], eps_sq)
        rc_zh += nj / n * ref_R(Zh[m], eps_sq)
        cw += ref_pair(Z[m], Zh[m], eps_sq)
    g1, g2, g3 = gammas
    return g1 * (ref_R(Z, eps_sq) - rc_z) + g2 * (ref_R(Zh, eps_sq) - rc_zh) + g3 * cw


def unit(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def close(a, b, rel):
    a, b = float(a), float(b)
    return abs(a - b) <= rel * max(abs(b), 1e-12)


def data(n=48, d=8, K=4, seed=0):
    Z = unit(n, d, seed)
    Zh = F.normalize(Z + 0.5 * unit(n, d, seed + 100), dim=1)
    y = torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(seed))
    return Z, Zh, y


# ----------------------------------------------------------------- values


def test_binary():
    Z, Zh, _ = data()
    t = CTRLObjective("binary", eps_sq=EPS)(Z, Zh)
    assert isinstance(t, ObjectiveTerms)
    assert close(t.total, ref_pair(Z, Zh), 1e-10)
    assert float(t.decoder_total) == float(t.total)
    assert close(t.terms["delta_R_Z_Zh"], pairwise_rate_reduction(Z, Zh), 1e-12)
    assert close(t.terms["R_Z"], ref_R(Z), 1e-10)
    assert close(t.terms["R_Z_union_Zh"], ref_R(torch.cat([Z, Zh])), 1e-10)
    t32 = CTRLObjective("binary")(Z.float(), Zh.float())
    assert t32.total.dtype == torch.float32 and close(t32.total, ref_pair(Z, Zh), 1e-3)


@pytest.mark.parametrize("n,d,K", [(48, 8, 4), (20, 16, 50), (200, 6, 3)])
@pytest.mark.parametrize("gammas", [(1.0, 1.0, 1.0), (0.5, 2.0, 1.5)])
def test_multiclass_matches_class_loop(n, d, K, gammas):
    Z, Zh, y = data(n, d, K)
    obj = CTRLObjective("multiclass", eps_sq=EPS, num_classes=K, gammas=gammas)
    t = obj(Z, Zh, y)
    expect = ref_multiclass(Z, Zh, y, K, gammas)
    assert close(t.total, expect, 1e-10)
    assert float(t.decoder_total) == float(t.total)
    g1, g2, g3 = gammas
    parts = (
        g1 * t.terms["delta_R_Z"] + g2 * t.terms["delta_R_Zh"] + g3 * t.terms["delta_R_classwise"]
    )
    assert close(parts, t.total, 1e-12)
    assert close(t.terms["delta_R_Z"], t.terms["R_Z"] - t.terms["Rc_Z"], 1e-12)
    assert close(obj(Z.float(), Zh.float(), y).total, expect, 1e-3)
    obj64 = CTRLObjective("multiclass", num_classes=K, gammas=gammas, float64=True)
    assert close(obj64(Z.float(), Zh.float(), y).total, expect, 1e-5)


@pytest.mark.parametrize("distance", ["rate", "l2", "cosine"])
def test_samplewise_signs_and_distances(distance):
    Z, Zh, _ = data()
    Zh = 0.9 * Zh  # not unit: exercises the general formulas
    beta = 0.7
    t = CTRLObjective("samplewise", eps_sq=EPS, beta=beta, distance=distance, encoder_beta=None)
    t = t(Z, Zh)  # encoder_beta=None: u-CTRL as written, the penalty in both players' objectives
    dist = {
        "rate": samplewise_rate_reduction(Z, Zh),
        "l2": ((Z - Zh) ** 2).sum(1),
        "cosine": 1 - (Z * Zh).sum(1) / (Z.norm(dim=1) * Zh.norm(dim=1)),
    }[distance].mean()  # the mean over samples, not the sum
    dr = ref_pair(Z, Zh)
    assert close(t.terms["samplewise_distance"], dist, 1e-10)
    assert close(t.total, ref_R(Z) + dr - beta * dist, 1e-10)  # what the encoder maximises
    assert close(t.decoder_total, dr + beta * dist, 1e-10)  # what the decoder minimises


def test_samplewise_encoder_beta_weighs_the_encoders_penalty_only():
    Z, Zh, _ = data()
    t = CTRLObjective("samplewise", eps_sq=EPS, beta=5.0, distance="l2", encoder_beta=0.5)(Z, Zh)
    dist = ((Z - Zh) ** 2).sum(1).mean()
    dr = ref_pair(Z, Zh)
    assert close(t.total, ref_R(Z) + dr - 0.5 * dist, 1e-10)
    assert close(t.decoder_total, dr + 5.0 * dist, 1e-10)
    with pytest.raises(ValueError, match="encoder_beta"):
        CTRLObjective("samplewise", encoder_beta=-1.0)


def test_samplewise_defaults_are_the_shipped_critic():
    """Given only its variant, the objective is the one the shipped configs train with: β = 10
    in the decoder's objective, none in the encoder's (the critic, R(Z) + ΔR(Z, Ẑ))."""
    Z, Zh, _ = data()
    t = CTRLObjective("samplewise", eps_sq=EPS)(Z, Zh)
    dist = ((Z - Zh) ** 2).sum(1).mean()
    dr = ref_pair(Z, Zh)
    assert close(t.total, ref_R(Z) + dr, 1e-10)
    assert close(t.decoder_total, dr + 10.0 * dist, 1e-10)


def test_samplewise_rate_distance_zero_at_perfect_reconstruction():
    Z, _, _ = data()
    t = CTRLObjective("samplewise", beta=3.0, distance="rate")(Z, Z.clone())
    assert abs(float(t.terms["samplewise_distance"])) < 1e-12
    assert abs(float(t.decoder_total)) < 1e-10
    assert close(t.total, ref_R(Z), 1e-10)


def test_as_dict_and_needs_labels():
    Z, Zh, y = data()
    obj = CTRLObjective("multiclass", num_classes=4)
    assert obj.needs_labels
    assert not CTRLObjective("binary").needs_labels
    assert not CTRLObjective("samplewise").needs_labels
    d = obj(Z, Zh, y).as_dict()
    assert set(d) >= {"total", "decoder_total", "delta_R_Z", "delta_R_Zh", "delta_R_classwise"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in d.values())
    assert "variant='multiclass'" in repr(obj)


def test_label_free_variants_ignore_labels_and_gather_is_noop_without_distributed():
    Z, Zh, y = data()
    a = CTRLObjective("binary", gather=True)(Z, Zh, y).total
    b = CTRLObjective("binary", gather=False)(Z, Zh).total
    assert float(a) == float(b)


def test_absent_classes_and_singletons():
    Z, Zh, _ = data(n=12, d=8)
    y = torch.tensor([0, 0, 5, 5, 5, 9, 2, 2, 2, 2, 7, 0])  # singletons, gaps, K > n
    t = CTRLObjective("multiclass", num_classes=20)(Z, Zh, y)
    assert close(t.total, ref_multiclass(Z, Zh, y, 20), 1e-10)


# ----------------------------------------------------------------- gradients


@pytest.mark.parametrize("variant", ["binary", "multiclass", "samplewise"])
@pytest.mark.parametrize("use_gram", [None, True, False])
def test_gradcheck(variant, use_gram, monkeypatch):
    if use_gram is not None:  # force the Gram or the d×d path everywhere: both must be exact
        monkeypatch.setattr(rate_mod, "_use_gram", lambda *a: use_gram)
    Z, Zh, y = data(n=9, d=4, K=3, seed=3)
    Z.requires_grad_()
    Zh.requires_grad_()
    obj = CTRLObjective(variant, num_classes=3, gammas=(1.0, 0.5, 2.0), beta=0.3)

    def both(a, b):
        t = obj(a, b, y)
        return t.total, t.decoder_total

    assert torch.autograd.gradcheck(both, (Z, Zh))


# ----------------------------------------------------------------- errors


def test_errors():
    Z, Zh, y = data()
    mc = CTRLObjective("multiclass", num_classes=4)
    with pytest.raises(ValueError, match="needs labels"):
        mc(Z, Zh)
    with pytest.raises(ValueError, match="out of range.*num_classes=3"):
        CTRLObjective("multiclass", num_classes=3)(Z, Zh, torch.arange(48) % 4)
    with pytest.raises(ValueError, match=">= 0"):
        mc(Z, Zh, y - 1)
    with pytest.raises(ValueError, match="labels must have shape"):
        mc(Z, Zh, y[:-1])
    with pytest.raises(ValueError, match="integer"):
        mc(Z, Zh, y.double())
    with pytest.raises(ValueError, match="same shape"):
        mc(Z, Zh[:-1], y)
    with pytest.raises(ValueError, match="shape"):
        CTRLObjective()(Z[None], Zh[None])
    bad = Zh.clone()
    bad[4, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*Zh"):
        CTRLObjective()(Z, bad)
    with pytest.raises(ValueError, match="non-finite.*Zh"):
        mc(Z, bad, y)
    with pytest.raises(FloatingPointError):  # a training loop's non-finite handler catches it too
        CTRLObjective("samplewise")(bad, Zh)
    for kwargs, name in [
        ({"variant": "ternary"}, "variant"),
        ({"distance": "l1"}, "distance"),
        ({"eps_sq": -1.0}, "eps_sq"),
        ({"gammas": (1.0, 1.0)}, "gammas"),
        ({"beta": -0.1}, "beta"),
        ({"num_classes": 0}, "num_classes"),
    ]:
        with pytest.raises(ValueError, match=name):
            CTRLObjective(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["binary", "multiclass", "samplewise"])
def test_cuda_matches_cpu(variant):
    Z, Zh, y = data(n=600, d=128, K=1000)
    Z, Zh = Z.float(), Zh.float()
    obj = CTRLObjective(variant, num_classes=1000)
    outs = []
    for device in ("cpu", "cuda"):
        a = Z.to(device).requires_grad_()
        b = Zh.to(device).requires_grad_()
        t = obj(a, b, y.to(device))
        ga, gb = torch.autograd.grad(t.total, [a, b])
        outs.append((float(t.total), float(t.decoder_total), ga.cpu(), gb.cpu()))
    (t0, d0, ga0, gb0), (t1, d1, ga1, gb1) = outs
    assert t1 == pytest.approx(t0, rel=1e-4) and d1 == pytest.approx(d0, rel=1e-4)
    torch.testing.assert_close(ga1, ga0, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(gb1, gb0, rtol=1e-3, atol=1e-5)
