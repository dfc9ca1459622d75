"""Coding-rate functions against independent float64 formulas, closed forms and identities."""

import math

import pytest
import torch
import torch.nn.functional as F
from rate_reference import EPS, ref_pair, ref_R, ref_Rc

import ctrl_csc.losses.rate as rate_mod
from ctrl_csc.losses import (
    coding_rate,
    compressed_coding_rate,
    pairwise_rate_reduction,
    rate_reduction,
    samplewise_rate_reduction,
)


def unit(n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def labels_for(n, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, K, (n,), generator=g)


def orthonormal(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def close(a, b, rel):
    a, b = float(a), float(b)
    return abs(a - b) <= rel * max(abs(b), 1e-12)


@pytest.fixture(params=["auto", "gram", "dxd"])
def path(request, monkeypatch):
    """Run a test with the automatic choice, and with each path forced: all must be exact."""
    forced = {"gram": True, "dxd": False}.get(request.param)
    if forced is not None:
        monkeypatch.setattr(rate_mod, "_use_gram", lambda *a: forced)
    return request.param


# shapes: n < d, n > d, classes smaller and larger than d, K > n, single samples
CLASS_CASES = [(40, 8, 3), (12, 16, 30), (90, 6, 2), (30, 32, 5), (7, 4, 1)]


# ----------------------------------------------------------------- against the reference


@pytest.mark.parametrize("n,d", [(1, 8), (5, 16), (64, 8), (16, 16)])
def test_coding_rate_matches_reference(n, d, path):
    Z = unit(n, d)
    assert close(coding_rate(Z, EPS), ref_R(Z), 1e-10)
    assert close(coding_rate(Z.float(), EPS), ref_R(Z), 1e-3)
    assert close(coding_rate(Z.float(), EPS, float64=True), ref_R(Z), 1e-6)


@pytest.mark.parametrize("n,d,K", CLASS_CASES)
def test_class_rates_match_reference(n, d, K, path):
    Z, y = unit(n, d), labels_for(n, K)
    rc, r = ref_Rc(Z, y, K), ref_R(Z)
    assert close(compressed_coding_rate(Z, y, K, EPS), rc, 1e-10)
    assert close(rate_reduction(Z, y, K, EPS), r - rc, 1e-10)
    assert close(rate_reduction(Z.float(), y, K, EPS), r - rc, 1e-3)
    assert close(rate_reduction(Z.float(), y, K, EPS, float64=True), r - rc, 1e-5)


@pytest.mark.parametrize("n,d", [(1, 8), (6, 16), (40, 8), (16, 16)])
def test_pairwise_matches_reference(n, d, path):
    Z, Zh = unit(n, d, seed=1), unit(n, d, seed=2)
    assert close(pairwise_rate_reduction(Z, Zh, EPS), ref_pair(Z, Zh), 1e-10)
    assert close(pairwise_rate_reduction(Z.float(), Zh.float(), EPS), ref_pair(Z, Zh), 1e-3)


def test_other_eps_sq():
    Z, y = unit(30, 8), labels_for(30, 3)
    for eps_sq in (0.01, 2.0):
        assert close(coding_rate(Z, eps_sq), ref_R(Z, eps_sq), 1e-10)
        rr = ref_R(Z, eps_sq) - ref_Rc(Z, y, 3, eps_sq)
        assert close(rate_reduction(Z, y, 3, eps_sq), rr, 1e-10)


# ----------------------------------------------------------------- closed forms


def test_closed_form_orthonormal_rows():
    d, n = 16, 6
    Z = orthonormal(d)[:n]  # rows orthonormal: ZᵀZ is a rank-n projection
    expect = n / 2 * math.log(1 + d / (n * EPS))
    assert close(coding_rate(Z, EPS), expect, 1e-12)


def test_closed_form_single_sample_and_zero():
    z = torch.tensor([[3.0, 4.0, 0.0, 0.0]], dtype=torch.float64)
    assert close(coding_rate(z, EPS), 0.5 * math.log(1 + 4 * 25 / EPS), 1e-12)
    assert float(coding_rate(torch.zeros(5, 4), EPS)) == 0.0


def test_identical_sets_have_zero_pairwise_rate_reduction(path):
    Z = unit(20, 8)
    assert abs(float(pairwise_rate_reduction(Z, Z, EPS))) < 1e-12
    assert abs(float(pairwise_rate_reduction(Z.float(), Z.float(), EPS))) < 1e-5


def test_closed_form_orthogonal_pair(path):
    d, n = 16, 4
    q = orthonormal(d)
    Z, Zh = q[:n], q[n : 2 * n]  # orthonormal rows in orthogonal subspaces
    expect = n * math.log(1 + d / (2 * n * EPS)) - n / 2 * math.log(1 + d / (n * EPS))
    assert close(pairwise_rate_reduction(Z, Zh, EPS), expect, 1e-12)


def test_closed_form_classes_on_orthogonal_subspaces(path):
    d, K, r = 24, 4, 3  # K classes of r orthonormal rows each, mutually orthogonal
    n = K * r
    Z = orthonormal(d)[:n]
    y = torch.arange(K).repeat_interleave(r)
    R = n / 2 * math.log(1 + d / (n * EPS))
    Rc = r / 2 * math.log(1 + d / (r * EPS))  # Σ_j (r/n)·(r/2)log(1 + d/(r ε²))
    assert close(compressed_coding_rate(Z, y, K, EPS), Rc, 1e-12)
    assert close(rate_reduction(Z, y, K, EPS), R - Rc, 1e-12)


def test_one_class_has_zero_rate_reduction():
    Z = unit(30, 8)
    assert abs(float(rate_reduction(Z, torch.zeros(30, dtype=torch.long), 1, EPS))) < 1e-12


def test_rate_reductions_are_nonnegative():
    for seed in range(3):
        Z, Zh = unit(25, 6, seed=seed), unit(25, 6, seed=seed + 10)
        assert float(rate_reduction(Z, labels_for(25, 4, seed), 4)) >= 0
        assert float(pairwise_rate_reduction(Z, Zh)) >= 0
        assert float(samplewise_rate_reduction(Z, Zh).min()) >= -1e-12


# ----------------------------------------------------------------- invariances


def test_invariant_to_rotations_and_permutations(path):
    n, d, K = 30, 12, 4
    Z, Zh, y = unit(n, d, seed=3), unit(n, d, seed=4), labels_for(n, K, 3)
    Q = orthonormal(d, seed=5)
    p = torch.randperm(n, generator=torch.Generator().manual_seed(6))
    for A, B, lab in ((Z @ Q, Zh @ Q, y), (Z[p], Zh[p], y[p])):
        assert close(coding_rate(A), coding_rate(Z), 1e-10)
        assert close(rate_reduction(A, lab, K), rate_reduction(Z, y, K), 1e-10)
        assert close(compressed_coding_rate(A, lab, K), compressed_coding_rate(Z, y, K), 1e-10)
        assert close(pairwise_rate_reduction(A, B), pairwise_rate_reduction(Z, Zh), 1e-10)
    # relabelling the classes changes nothing either
    assert close(rate_reduction(Z, (y + 1) % K, K), rate_reduction(Z, y, K), 1e-12)


# ----------------------------------------------------------------- gradients


@pytest.mark.parametrize("n,d,K", [(7, 3, 3), (4, 6, 2)])
def test_gradcheck(n, d, K, path):
    Z = unit(n, d, seed=7).requires_grad_()
    Zh = unit(n, d, seed=8).requires_grad_()
    y = labels_for(n, K, 7)
    assert torch.autograd.gradcheck(lambda z: coding_rate(z), (Z,))
    assert torch.autograd.gradcheck(lambda z: compressed_coding_rate(z, y, K), (Z,))
    assert torch.autograd.gradcheck(lambda z: rate_reduction(z, y, K), (Z,))
    assert torch.autograd.gradcheck(lambda a, b: pairwise_rate_reduction(a, b), (Z, Zh))
    assert torch.autograd.gradcheck(lambda a, b: samplewise_rate_reduction(a, b), (Z, Zh))


def test_gradient_matches_reference_autograd():
    n, d, K = 40, 8, 5
    Z, y = unit(n, d, seed=9).requires_grad_(), labels_for(n, K, 9)
    (g,) = torch.autograd.grad(rate_reduction(Z, y, K), Z)
    Zr = Z.detach().clone().requires_grad_()
    n_ = Zr.shape[0]
    ref = 0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + d / (n_ * EPS) * Zr.T @ Zr)
    for j in range(K):
        Zj = Zr[y == j]
        A = torch.eye(d, dtype=torch.float64) + d / (Zj.shape[0] * EPS) * Zj.T @ Zj
        ref = ref - Zj.shape[0] / n_ * 0.5 * torch.logdet(A)
    (gr,) = torch.autograd.grad(ref, Zr)
    torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------- edge cases


def test_absent_classes_contribute_nothing(path):
    Z = unit(20, 8)
    y = torch.tensor([0, 3] * 10)  # classes 1, 2, 4 absent
    y_compact = torch.tensor([0, 1] * 10)
    expect = rate_reduction(Z, y_compact, 2)
    assert close(rate_reduction(Z, y, 5), expect, 1e-12)
    assert close(rate_reduction(Z, y, 5), ref_R(Z) - ref_Rc(Z, y, 5), 1e-10)
    Zg = Z.clone().requires_grad_()
    (g,) = torch.autograd.grad(rate_reduction(Zg, y, 5), Zg)
    assert torch.isfinite(g).all()


def test_more_classes_than_samples_and_singletons(path):
    n, d, K = 10, 8, 1000
    Z, y = unit(n, d), torch.randperm(K)[:n]  # every class a singleton
    assert close(rate_reduction(Z, y, K), ref_R(Z) - ref_Rc(Z, y, K), 1e-10)


def test_zero_rows(path):
    Z = unit(12, 6)
    Z[::3] = 0.0
    y = labels_for(12, 3)
    assert close(rate_reduction(Z, y, 3), ref_R(Z) - ref_Rc(Z, y, 3), 1e-10)
    Zh = unit(12, 6, seed=1)
    assert close(pairwise_rate_reduction(Z, Zh), ref_pair(Z, Zh), 1e-10)
    Zs = Z[:6, :3].clone().requires_grad_()  # rows 0 and 3 are zero
    assert torch.autograd.gradcheck(lambda z: rate_reduction(z, y[:6], 3), (Zs,))


def test_samplewise_closed_form_matches_pairwise():
    Z, Zh = unit(6, 8, seed=11), unit(6, 8, seed=12)
    Zh[0] = Z[0]
    Zh[1] = -Z[1]
    Zh[2] = 0.3 * Zh[2]  # not unit
    got = samplewise_rate_reduction(Z, Zh)
    for i in range(6):
        assert close(got[i] + 1.0, ref_pair(Z[i : i + 1], Zh[i : i + 1]) + 1.0, 1e-12)
    assert abs(float(got[0])) < 1e-12 and abs(float(got[1])) < 1e-12


def test_dtypes_and_autocast():
    Z, y = unit(20, 8).float(), labels_for(20, 3)
    assert rate_reduction(Z, y, 3).dtype == torch.float32
    assert rate_reduction(Z.double(), y, 3).dtype == torch.float64
    assert rate_reduction(Z, y, 3, float64=True).dtype == torch.float32
    low = rate_reduction(Z.bfloat16(), y, 3)
    assert low.dtype == torch.float32
    assert close(low, rate_reduction(Z.bfloat16().float(), y, 3), 1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = rate_reduction(Z, y, 3)
    assert under.dtype == torch.float32 and close(under, rate_reduction(Z, y, 3), 1e-6)


# ----------------------------------------------------------------- errors


def test_clear_errors():
    Z, y = unit(10, 4), labels_for(10, 3)
    with pytest.raises(ValueError, match="shape"):
        coding_rate(Z[0])
    with pytest.raises(ValueError, match="empty"):
        coding_rate(Z[:0])
    with pytest.raises(ValueError, match="floating"):
        coding_rate(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="eps_sq"):
        coding_rate(Z, eps_sq=0.0)
    with pytest.raises(ValueError, match="same shape"):
        pairwise_rate_reduction(Z, Z[:5])
    with pytest.raises(ValueError, match="labels"):
        rate_reduction(Z, None, 3)
    with pytest.raises(ValueError, match="labels must have shape"):
        rate_reduction(Z, y[:5], 3)
    with pytest.raises(ValueError, match="integer"):
        rate_reduction(Z, y.float(), 3)
    with pytest.raises(ValueError, match="out of range.*num_classes=2"):
        rate_reduction(Z, torch.arange(10) % 3, 2)
    with pytest.raises(ValueError, match=">= 0"):
        compressed_coding_rate(Z, y - 1)
    with pytest.raises(ValueError, match="num_classes"):
        rate_reduction(Z, y, 0)
    bad = Z.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*Z"):
        coding_rate(bad)
    inf = Z.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite.*Zh"):
        pairwise_rate_reduction(Z, inf)
    with pytest.raises(ValueError, match="non-finite"):
        rate_reduction(bad, y, 3)
    with pytest.raises(ValueError, match="non-finite"):
        samplewise_rate_reduction(bad, Z)


def test_overflow_is_reported_clearly():
    with pytest.raises(ValueError, match="could not be computed"):
        coding_rate(torch.full((4, 3), 1e30))
