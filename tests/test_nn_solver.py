"""The unrolled solver against independent truth: DESIGN's iterations written out on dense
matrices, the Lasso optimality conditions, a coordinate-descent solver, a planted code, and
finite-difference gradients."""

import math

import pytest
import torch
from dense_reference import F64, coordinate_descent, dense_matrix
from torch.func import functional_call

from ctrl_csc.nn import CSCLayer, SparseDeconvLayer


def design_iterations(m, u, eta, lmbda, mu, n_iter, algorithm, nonnegative):
    """DESIGN §2 verbatim on a dense matrix. u: (N, rows) -> z: (N, cols)."""

    def prox(v):
        a = v / (1 + eta * mu)
        theta = eta * lmbda / (1 + eta * mu)
        if nonnegative:
            return torch.clamp(a - theta, min=0)
        return torch.sign(a) * torch.clamp(a.abs() - theta, min=0)

    z = torch.zeros(u.shape[0], m.shape[1], dtype=F64)
    z_prev, tau_prev = z, 1.0
    for t in range(n_iter):
        y = z
        if algorithm == "fista" and t > 0:
            tau = (1 + math.sqrt(1 + 4 * tau_prev**2)) / 2
            y = z + ((tau_prev - 1) / tau) * (z - z_prev)
            tau_prev = tau
        grad = (y @ m.T - u) @ m
        z_prev, z = z, prox(y - eta * grad)
    return z


def kkt_violation(m, u, z, lmbda, mu, nonnegative):
    """Max violation of the optimality conditions of ½‖u − Mz‖² + λ‖z‖₁ + μ/2‖z‖² (z ≥ 0)."""
    g = (u - z @ m.T) @ m - mu * z  # = λ s with s ∈ ∂‖z‖₁ (+ normal cone of z ≥ 0)
    active = z != 0
    if nonnegative:
        on = (g - lmbda).abs()
        off = torch.clamp(g - lmbda, min=0)
    else:
        on = (g - lmbda * torch.sign(z)).abs()
        off = torch.clamp(g.abs() - lmbda, min=0)
    return float(torch.where(active, on, off).max())


def csc_problem(nonnegative, mu=0.0, n_iter=2, algorithm="fista", lmbda=0.1, size=(6, 5)):
    layer = CSCLayer(
        2, 3, 3, stride=2, lmbda=lmbda, mu=mu, n_iter=n_iter, algorithm=algorithm,
        nonnegative=nonnegative, init_power_iters=300,
    ).double()  # fmt: skip
    h, w = layer.code_size(size)
    m = dense_matrix(lambda z: layer.synthesize(z, size), (3, h, w))
    x = torch.randn(2, 2, *size, dtype=F64)
    return layer, m, x


@pytest.mark.parametrize("algorithm", ["ista", "fista"])
@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("mu", [0.0, 0.4])
def test_csc_iterations_follow_design(algorithm, nonnegative, mu):
    layer, m, x = csc_problem(nonnegative, mu, algorithm=algorithm)
    layer.eval()
    layer.lipschitz(x.shape[-2:])
    eta = float(layer.solver.step_size())
    u = x.reshape(2, -1)
    for n_iter in (1, 2, 3, 5):
        layer.solver.n_iter = n_iter
        with torch.no_grad():
            z = layer(x).reshape(2, -1)
        expected = design_iterations(m, u, eta, 0.1, mu, n_iter, algorithm, nonnegative)
        torch.testing.assert_close(z, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nonnegative", [False, True])
def test_inverse_csc_iterations_follow_design(nonnegative):
    layer = SparseDeconvLayer(
        3, 2, 3, stride=2, kind="inverse_csc", lmbda=0.05, n_iter=4, nonnegative=nonnegative
    )
    layer = layer.double().eval()
    coarse, fine = (3, 3), (5, 6)
    m = dense_matrix(layer.operator(coarse, fine).apply, (2, *fine))
    z = torch.randn(2, 3, *coarse, dtype=F64)
    layer.lipschitz(coarse, fine)
    eta = float(layer.solver.step_size())
    with torch.no_grad():
        v = layer(z, fine).reshape(2, -1)
    expected = design_iterations(m, z.reshape(2, -1), eta, 0.05, 0.0, 4, "fista", nonnegative)
    torch.testing.assert_close(v, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_converges_to_lasso_solution(nonnegative, mu):
    layer, m, x = csc_problem(nonnegative, mu, n_iter=1500, lmbda=0.15)
    layer.eval()
    with torch.no_grad():
        z = layer(x).reshape(2, -1)
    u = x.reshape(2, -1)
    assert kkt_violation(m, u, z, 0.15, mu, nonnegative) < 1e-8
    assert 0 < int((z != 0).sum()) < z.numel()  # a genuinely sparse solution
    for i in range(2):
        reference = coordinate_descent(m, u[i], 0.15, mu, nonnegative)
        assert kkt_violation(m, u[i : i + 1], reference[None], 0.15, mu, nonnegative) < 1e-10
        torch.testing.assert_close(z[i], reference, rtol=0, atol=1e-7)


def test_inverse_csc_converges_to_lasso_solution():
    layer = SparseDeconvLayer(3, 2, 3, stride=2, kind="inverse_csc", lmbda=0.05, mu=0.1)
    layer.solver.n_iter = 3000
    layer = layer.double().eval()
    coarse, fine = (3, 3), (6, 6)
    m = dense_matrix(layer.operator(coarse, fine).apply, (2, *fine))
    z = torch.randn(1, 3, *coarse, dtype=F64)
    with torch.no_grad():
        v = layer(z).reshape(1, -1)
    assert kkt_violation(m, z.reshape(1, -1), v, 0.05, 0.1, False) < 1e-8
    reference = coordinate_descent(m, z.reshape(-1), 0.05, 0.1, False)
    torch.testing.assert_close(v[0], reference, rtol=0, atol=1e-7)


@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_ista_objective_never_increases(nonnegative, mu):
    layer = CSCLayer(
        3, 6, 3, lmbda=0.2, mu=mu, n_iter=60, algorithm="ista", nonnegative=nonnegative
    ).double()
    trace = layer.objective_trace(torch.randn(2, 3, 8, 8, dtype=F64))
    assert trace.shape == (61, 2)
    steps = trace[1:] - trace[:-1]
    assert float(steps.max()) <= 1e-12 * float(trace.abs().max())
    assert bool((trace[-1] < 0.9 * trace[0]).all())


def test_fista_trace_and_forward_agree():
    layer = CSCLayer(3, 6, 3, lmbda=0.2, n_iter=8).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    trace = layer.objective_trace(x)
    with torch.no_grad():
        z = layer(x)
        r = x - layer.synthesize(z, (8, 8))
        final = 0.5 * r.square().sum((1, 2, 3)) + 0.2 * z.abs().sum((1, 2, 3))
    torch.testing.assert_close(trace[-1], final)


def test_planted_sparse_code_is_recovered():
    gen = torch.Generator().manual_seed(3)
    layer = CSCLayer(8, 4, 3, stride=2, lmbda=1e-3, n_iter=2000, init_power_iters=200).double()
    layer.eval()
    truth = torch.zeros(1, 4, 5, 5, dtype=F64)
    positions = [(0, 1, 1), (1, 3, 0), (2, 2, 4), (3, 4, 2), (1, 0, 3)]
    for (c, i, j), value in zip(positions, torch.rand(5, generator=gen, dtype=F64) + 1.0):
        truth[0, c, i, j] = value
    with torch.no_grad():
        x = layer.synthesize(truth, (10, 10))
        z = layer(x)
    support = z.abs() > 1e-2
    assert torch.equal(support, truth != 0)
    torch.testing.assert_close(z, truth, rtol=0, atol=5e-3)


def _gradcheck_layer(layer, inputs, extra=()):
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]

    def run(x, *values):
        return functional_call(layer, dict(zip(names, values)), (x, *extra))

    return torch.autograd.gradcheck(run, (inputs, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_csc_gradients_match_finite_differences(nonnegative, mu):
    layer = CSCLayer(
        2, 3, 3, stride=2, lmbda=0.05, mu=mu, n_iter=3, nonnegative=nonnegative,
        learn_lmbda=True, learn_step=True,
    ).double()  # fmt: skip
    x = torch.randn(2, 2, 5, 4, dtype=F64, requires_grad=True)
    layer(x)
    layer.solver.refresh_lipschitz = False  # a constant step for the finite differences
    assert [n for n, _ in layer.named_parameters()] == [
        "weight",
        "solver.raw_lmbda",
        "solver.raw_step_scale",
    ]
    assert _gradcheck_layer(layer, x)


@pytest.mark.parametrize("kind", ["synthesis", "inverse_csc"])
def test_deconv_gradients_match_finite_differences(kind):
    options = dict(learn_lmbda=True) if kind == "inverse_csc" else {}
    layer = SparseDeconvLayer(3, 2, 3, stride=2, kind=kind, lmbda=0.05, n_iter=3, **options)
    layer = layer.double()
    z = torch.randn(2, 3, 3, 3, dtype=F64, requires_grad=True)
    layer(z, (5, 6))
    if kind == "inverse_csc":
        layer.solver.refresh_lipschitz = False  # a constant step for the finite differences
    assert _gradcheck_layer(layer, z, extra=((5, 6),))


def test_learnable_parameters_receive_gradients():
    layer = CSCLayer(3, 4, 3, n_iter=3, learn_lmbda=True, learn_step=True)
    layer(torch.randn(2, 3, 8, 8)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert float(layer.lmbda.detach()) == pytest.approx(0.1)


def test_a_learned_relative_lambda_stays_below_lambda_max_and_recovers():
    """With ``lmbda_relative`` the learned fraction is ``sigmoid(ρ)``: it starts at ``lmbda``, no
    value of ``ρ`` reaches 1, and a stage pushed far up still codes and gets a gradient back."""
    layer = CSCLayer(3, 4, 3, n_iter=3, lmbda=0.2, learn_lmbda=True, lmbda_relative=True).double()
    assert float(layer.lmbda.detach()) == pytest.approx(0.2, rel=1e-6)  # stored in float32
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    with torch.no_grad():
        layer.solver.raw_lmbda.fill_(8.0)  # a fraction of 1 - 3e-4: what many steps up reach
    assert float(layer.lmbda.detach()) < 1
    code = layer(x)
    assert int((code != 0).sum()) > 0
    code.sum().backward()
    assert float(layer.solver.raw_lmbda.grad) < 0  # lowering λ raises the code: it comes back


def test_inference_mode_then_training():
    layer = CSCLayer(3, 4, 3, n_iter=3, learn_lmbda=True, learn_step=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        expected = layer.eval()(x)
    layer.train()
    layer(x).sum().backward()  # buffers made under inference_mode do not break autograd
    assert layer.weight.grad is not None
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_empty_batch():
    layer = CSCLayer(3, 4, 3)
    assert layer(torch.randn(0, 3, 8, 8)).shape == (0, 4, 8, 8)


@pytest.mark.parametrize("nonnegative", [True, False])
def test_lambda_max_is_the_smallest_lambda_with_zero_solution(nonnegative):
    """λ_max from the layer's operator equals ‖Mᵀu‖_∞ (max(Mᵀu)₊ with z ≥ 0) on the dense
    matrix, and the converged solution is zero just above it and non-zero just below it."""
    from ctrl_csc.nn.iteration import lambda_max

    layer, m, x = csc_problem(nonnegative)
    u = x.reshape(2, -1)
    corr = u @ m
    expected = corr.clamp_min(0).amax(1) if nonnegative else corr.abs().amax(1)
    got = lambda_max(x, layer.operator(x.shape[-2:]), nonnegative)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    for i in range(2):
        lam = float(expected[i])
        above = coordinate_descent(m, u[i], lam * (1 + 1e-9), 0.0, nonnegative)
        below = coordinate_descent(m, u[i], lam * 0.99, 0.0, nonnegative)
        assert int((above != 0).sum()) == 0 and int((below != 0).sum()) > 0


@pytest.mark.parametrize("algorithm", ["ista", "fista"])
@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("mu", [0.0, 0.4])
def test_relative_lambda_is_per_sample_absolute_lambda(algorithm, nonnegative, mu):
    """With lmbda_relative, sample n follows DESIGN's iterations with λ_n = ρ·λ_max(u_n)."""
    rho = 0.3
    layer, m, x = csc_problem(nonnegative, mu, n_iter=4, algorithm=algorithm, lmbda=rho)
    layer.solver.lmbda_relative = True
    layer.eval()
    x = x * torch.tensor([1.0, 7.0], dtype=F64).reshape(2, 1, 1, 1)  # two different scales
    layer.lipschitz(x.shape[-2:])
    eta = float(layer.solver.step_size())
    u = x.reshape(2, -1)
    corr = u @ m
    lam_max = corr.clamp_min(0).amax(1) if nonnegative else corr.abs().amax(1)
    with torch.no_grad():
        z = layer(x).reshape(2, -1)
    for i in range(2):
        expected = design_iterations(
            m, u[i : i + 1], eta, rho * float(lam_max[i]), mu, 4, algorithm, nonnegative
        )
        torch.testing.assert_close(z[i : i + 1], expected, rtol=1e-10, atol=1e-12)
    # scale invariance: the code of 7u is 7 times the code of u
    with torch.no_grad():
        z1 = layer(x[:1])
        z7 = layer(7.0 * x[:1])
    torch.testing.assert_close(z7, 7.0 * z1, rtol=1e-10, atol=1e-12)
    # the objective trace uses the same per-sample λ
    trace = layer.objective_trace(x)
    last = 0.5 * (u - z @ m.T).square().sum(1) + rho * lam_max * z.abs().sum(1)
    last = last + 0.5 * mu * z.square().sum(1)
    torch.testing.assert_close(trace[-1], last, rtol=1e-10, atol=1e-12)


def test_relative_lambda_in_inverse_csc_and_gradients():
    layer = SparseDeconvLayer(
        3, 2, 3, stride=2, kind="inverse_csc", lmbda=0.2, n_iter=3, lmbda_relative=True
    ).double().eval()  # fmt: skip
    z = torch.randn(2, 3, 3, 3, dtype=F64)
    with torch.no_grad():
        v1, v5 = layer(z), layer(5.0 * z)
    torch.testing.assert_close(v5, 5.0 * v1, rtol=1e-10, atol=1e-12)
    assert 0 < int((v1 != 0).sum()) < v1.numel()
    csc = CSCLayer(2, 3, 3, stride=2, lmbda=0.2, n_iter=3, lmbda_relative=True).double()
    x = torch.randn(2, 2, 6, 5, dtype=F64, requires_grad=True)
    csc(x)  # λ_n = ρ·λ_max(x_n) is differentiated through
    csc.solver.refresh_lipschitz = False  # a constant step for the finite differences
    assert _gradcheck_layer(csc, x)


def test_relative_lambda_must_be_a_fraction():
    with pytest.raises(ValueError, match="lmbda_relative"):
        CSCLayer(2, 3, 3, lmbda=1.0, lmbda_relative=True)
    with pytest.raises(ValueError, match="lmbda_relative"):
        SparseDeconvLayer(3, 2, 3, kind="inverse_csc", lmbda=1.5, lmbda_relative=True)


@pytest.mark.parametrize("algorithm, bound", [("ista", 2.0), ("fista", 1.0)])
def test_step_has_a_margin_and_a_learned_step_stays_bounded(algorithm, bound):
    """η = m/((1 + δ)L̂) ≤ m/L_true once the estimate is within δ, and a learned m stays below
    the algorithm's convergence bound however far its parameter is pushed."""
    layer, m, x = csc_problem(False, algorithm=algorithm)
    layer.eval()
    l_true = float(torch.linalg.eigvalsh(m.T @ m).max())
    l_hat = float(layer.lipschitz(x.shape[-2:]))
    assert l_hat <= l_true * (1 + 1e-9) and l_hat * (1 + layer.solver.STEP_MARGIN) >= l_true
    assert float(layer.solver.step_size()) * l_true <= 1.0 + 1e-9
    learned = CSCLayer(2, 3, 3, stride=2, algorithm=algorithm, learn_step=True).double().eval()
    learned.lipschitz(x.shape[-2:])
    start = float(learned.solver.step_scale.detach())
    assert start == pytest.approx(1.0 if algorithm == "ista" else 0.95)
    with torch.no_grad():
        learned.solver.raw_step_scale.fill_(50.0)
    assert float(learned.solver.step_scale.detach()) <= bound


def test_lambda_zero_is_least_squares_from_zero():
    """λ = 0 is a valid option (plain least squares): iterations from z₀ = 0 stay in the row
    space of D, so they converge to the minimum-norm solution pinv(D) x (dense float64)."""
    layer = CSCLayer(2, 3, 3, stride=2, lmbda=0.0, nonnegative=False, n_iter=4000).double()
    x = torch.randn(1, 2, 6, 5, dtype=F64)
    z = layer(x).detach()
    m = dense_matrix(lambda v: layer.synthesize(v, (6, 5)), (3, *layer.code_size((6, 5))))
    want = torch.linalg.pinv(m) @ x.flatten()
    torch.testing.assert_close(z.flatten(), want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("algorithm", ["ista", "fista"])
@pytest.mark.parametrize("nonnegative", [True, False])
def test_density_sets_each_samples_lambda_at_the_code_quantile(algorithm, nonnegative):
    """With ``density``, sample n follows DESIGN's iterations with λ_n the (k+1)-th largest
    entry of Mᵀu_n (signed: of |Mᵀu_n|), k = ⌈ρ·M⌉, read off a float64 sort of the dense
    correlations; the first step's code then has exactly k non-zeros, and ``lmbda`` is not read."""
    from ctrl_csc.nn.iteration import lambda_at_density

    rho = 0.3
    layer, m, x = csc_problem(nonnegative, n_iter=4, algorithm=algorithm, lmbda=0.9)
    layer.solver.density = rho
    layer.eval()
    x = x * torch.tensor([1.0, 7.0], dtype=F64).reshape(2, 1, 1, 1)
    layer.lipschitz(x.shape[-2:])
    eta = float(layer.solver.step_size())
    u = x.reshape(2, -1)
    corr = u @ m
    ranked = (corr if nonnegative else corr.abs()).sort(1, descending=True).values
    k = math.ceil(rho * m.shape[1])
    lam = ranked[:, k].clamp_min(0)
    got = lambda_at_density(x, layer.operator(x.shape[-2:]), rho, nonnegative)
    torch.testing.assert_close(got, lam, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        z = layer(x).reshape(2, -1)
    for i in range(2):
        expected = design_iterations(
            m, u[i : i + 1], eta, float(lam[i]), 0.0, 4, algorithm, nonnegative
        )
        torch.testing.assert_close(z[i : i + 1], expected, rtol=1e-10, atol=1e-12)
    layer.solver.n_iter = 1
    with torch.no_grad():
        assert (layer(x) != 0).flatten(1).sum(1).tolist() == [k, k]
    trace = layer.objective_trace(x)  # the objective at the same per-sample λ
    torch.testing.assert_close(trace[0], 0.5 * u.square().sum(1), rtol=1e-12, atol=1e-12)
    z1 = layer(x).reshape(2, -1).detach()
    last = 0.5 * (u - z1 @ m.T).square().sum(1) + lam * z1.abs().sum(1)
    torch.testing.assert_close(trace[-1], last, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backward", ["unrolled", "checkpoint"])
def test_density_gradients_match_finite_differences(backward):
    """λ_n from the quantile is differentiated through (the gradient reaches its entry)."""
    layer = CSCLayer(2, 3, 3, stride=2, n_iter=3, density=0.25, backward=backward).double()
    x = torch.randn(2, 2, 6, 5, dtype=F64, requires_grad=True)
    layer(x)
    layer.solver.refresh_lipschitz = False  # a constant step for the finite differences
    assert _gradcheck_layer(layer, x)
    deconv = SparseDeconvLayer(3, 2, 3, stride=2, kind="inverse_csc", n_iter=3, density=0.25)
    deconv = deconv.double()
    z = torch.randn(2, 3, 3, 3, dtype=F64, requires_grad=True)
    deconv(z, (5, 6))
    deconv.solver.refresh_lipschitz = False
    assert _gradcheck_layer(deconv, z, extra=((5, 6),))


def test_density_must_be_a_fraction_and_is_not_learned():
    for bad in (0, 1, 1.5, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="density must be a fraction in \\(0, 1\\)"):
            CSCLayer(2, 3, 3, density=bad)
    with pytest.raises(ValueError, match="no λ to learn"):
        CSCLayer(2, 3, 3, density=0.2, learn_lmbda=True)
    assert "density=0.2" in repr(CSCLayer(2, 3, 3, density=0.2))
