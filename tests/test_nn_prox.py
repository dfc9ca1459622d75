"""Prox operators against brute-force 1-D minimisers; power iteration on a known spectrum."""

import math

import pytest
import torch

from ctrl_csc.nn import power_iteration, prox_elastic_net, shrink
from ctrl_csc.nn.iteration import fista_momentum

GRID = torch.linspace(-5.0, 5.0, 100001, dtype=torch.float64)  # spacing 1e-4
VALUES = [-3.7, -1.2, -0.31, -0.05, 0.0, 0.04, 0.29, 0.8, 2.5]


def brute_force_prox(step: float, lmbda: float, mu: float, nonnegative: bool) -> torch.Tensor:
    """argmin_z ½(z − v)² + η(λ|z| + μ/2 z²) (z ≥ 0) by dense search on a grid, per v in VALUES."""
    z = GRID[GRID >= 0] if nonnegative else GRID
    v = torch.tensor(VALUES, dtype=torch.float64)[:, None]
    f = 0.5 * (z - v) ** 2 + step * (lmbda * z.abs() + 0.5 * mu * z**2)
    return z[torch.argmin(f, dim=1)]


@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("theta", [0.0, 0.3, 1.0])
def test_shrink_matches_brute_force(theta, nonnegative):
    v = torch.tensor(VALUES, dtype=torch.float64)
    expected = brute_force_prox(1.0, theta, 0.0, nonnegative)
    got_float = shrink(v, theta, nonnegative)
    got_tensor = shrink(v, torch.tensor(theta, dtype=torch.float64), nonnegative)
    torch.testing.assert_close(got_float, expected.to(v), atol=1e-4, rtol=0)
    torch.testing.assert_close(got_tensor, got_float, atol=1e-15, rtol=0)


@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize(
    ("step", "lmbda", "mu"), [(0.5, 0.4, 0.0), (0.7, 0.2, 1.5), (2.0, 0.0, 0.8)]
)
def test_prox_elastic_net_matches_brute_force(step, lmbda, mu, nonnegative):
    v = torch.tensor(VALUES, dtype=torch.float64)
    expected = brute_force_prox(step, lmbda, mu, nonnegative)
    got = prox_elastic_net(v, step, lmbda, mu, nonnegative)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_shrink_rejects_negative_threshold():
    with pytest.raises(ValueError, match="theta"):
        shrink(torch.ones(3), -0.1)


def test_shrink_gradient_wrt_threshold():
    v = torch.tensor([-2.0, -0.1, 0.05, 1.5], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, t: shrink(a, t), (v, theta))
    assert torch.autograd.gradcheck(lambda a, t: shrink(a, t, True), (v, theta))


def test_power_iteration_on_known_spectrum():
    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(9, 9, generator=gen, dtype=torch.float64))
    sigma = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    m = u[:, :9] @ torch.diag(sigma) @ w.T  # singular values sigma, so ‖MᵀM‖ = 9
    v0 = torch.randn(9, generator=gen, dtype=torch.float64)
    lip, v = power_iteration(lambda x: m @ x, lambda y: m.T @ y, v0, 60)
    assert lip.requires_grad is False
    assert math.isclose(float(lip), 9.0, rel_tol=1e-12)
    assert math.isclose(float(v.norm()), 1.0, rel_tol=1e-12)
    # a lower bound at every stage, increasing towards L
    few, _ = power_iteration(lambda x: m @ x, lambda y: m.T @ y, v0, 2)
    assert float(few) <= 9.0 + 1e-12
    with pytest.raises(ValueError, match="n_iter"):
        power_iteration(lambda x: m @ x, lambda y: m.T @ y, v0, 0)


def test_fista_momentum_sequence():
    betas = fista_momentum(4)
    tau1 = (1 + math.sqrt(5)) / 2
    tau2 = (1 + math.sqrt(1 + 4 * tau1**2)) / 2
    tau3 = (1 + math.sqrt(1 + 4 * tau2**2)) / 2
    assert betas == pytest.approx([0.0, (tau1 - 1) / tau2, (tau2 - 1) / tau3], rel=1e-15)
    assert fista_momentum(1) == []
