"""The solver's memory-saving backward modes and its fused step, against independent truth.

* ``checkpoint``: the same values and gradients as ``unrolled`` (float64, to rounding: the
  replayed segments add the same terms in another order), with fewer bytes saved for backward.
* ``implicit``: the gradient of the converged Lasso solution, against central finite differences
  of an independent high-accuracy solver (cyclic coordinate descent on the dense matrix).
* ``compile``: the fused step agrees with the eager one in value and gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dense_reference import F64, coordinate_descent, dense_matrix

from ctrl_csc.models import CSCDecoder, CSCEncoder
from ctrl_csc.nn import CSCLayer, SparseDeconvLayer
from ctrl_csc.nn.compiled import compile_available
from ctrl_csc.nn.saved import SavedBytes


def _loss_weights(z):
    return torch.arange(z.numel(), dtype=z.dtype).reshape(z.shape).sin()


def _grads(layer, x, mode):
    layer.solver.backward = mode
    layer.zero_grad()
    x.grad = None
    z = layer(x)
    (z * _loss_weights(z)).sum().backward()
    return z.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("algorithm", ["ista", "fista"])
@pytest.mark.parametrize(
    "options",
    [
        dict(nonnegative=True, learn_lmbda=True, learn_step=True),
        dict(nonnegative=False, mu=0.2, learn_lmbda=True, learn_step=True),
        dict(nonnegative=True, lmbda=0.3, lmbda_relative=True, learn_step=True),
    ],
    ids=["nonneg", "signed-mu", "relative"],
)
@pytest.mark.parametrize("n_iter", [2, 4, 7, 10])
def test_checkpoint_gradients_equal_unrolled(algorithm, options, n_iter):
    layer = CSCLayer(3, 5, 3, n_iter=n_iter, algorithm=algorithm, **options).double()
    x = torch.randn(2, 3, 7, 6, dtype=F64, requires_grad=True)
    layer(x)
    layer.solver.refresh_lipschitz = False  # one step size for both backwards
    z0, gx0, gp0 = _grads(layer, x, "unrolled")
    z1, gx1, gp1 = _grads(layer, x, "checkpoint")
    assert torch.equal(z0, z1)
    assert gx0.abs().max() > 0
    torch.testing.assert_close(gx1, gx0, rtol=1e-12, atol=1e-14)
    assert gp0.keys() == gp1.keys()
    for name in gp0:
        assert gp0[name].abs().max() > 0, name
        torch.testing.assert_close(gp1[name], gp0[name], rtol=1e-12, atol=1e-14, msg=name)


def test_checkpoint_in_inverse_csc_and_gradcheck():
    layer = SparseDeconvLayer(
        3, 2, 3, stride=2, kind="inverse_csc", lmbda=0.05, n_iter=6, learn_lmbda=True,
        backward="checkpoint",
    ).double()  # fmt: skip
    z = torch.randn(2, 3, 3, 3, dtype=F64, requires_grad=True)
    layer(z, (5, 6))
    layer.solver.refresh_lipschitz = False  # a constant step for the finite differences
    w = layer.weight.detach().clone().requires_grad_()
    r = layer.solver.raw_lmbda.detach().clone().requires_grad_()

    def run(z, w, r):
        params = {"weight": w, "solver.raw_lmbda": r}
        return torch.func.functional_call(layer, params, (z, (5, 6)))

    assert torch.autograd.gradcheck(run, (z, w, r), eps=1e-6, atol=1e-6, rtol=1e-4)


def _saved(layer, x):
    counter = SavedBytes()
    with counter.hooks():
        z = layer(x)
        after_forward = counter.live
        z.square().sum().backward()
    return after_forward, counter.peak


def test_saved_memory_of_checkpoint_and_implicit_does_not_grow_like_unrolled():
    """The issue's target: at T = 10 checkpoint and implicit save ≤ 1.5× what T = 2 unrolled
    saves (a 16→16 stage; the ratio depends only on how many code-size tensors are kept)."""
    x = torch.randn(4, 16, 16, 16, requires_grad=True)

    def saved(n_iter, mode):
        torch.manual_seed(0)
        layer = CSCLayer(16, 16, 3, n_iter=n_iter, backward=mode)
        return _saved(layer, x)

    base, _ = saved(2, "unrolled")
    unrolled10, _ = saved(10, "unrolled")
    checkpoint10, checkpoint_peak = saved(10, "checkpoint")
    implicit10, implicit_peak = saved(10, "implicit")
    assert unrolled10 > 3 * base  # what there is to save
    assert checkpoint10 <= 1.5 * base
    assert implicit10 <= 1.5 * base
    assert implicit_peak == implicit10  # nothing is replayed
    assert checkpoint10 < checkpoint_peak < unrolled10  # one segment at a time is replayed


@pytest.mark.parametrize(
    "nonnegative, mu, relative",
    [(True, 0.0, False), (True, 0.2, True), (False, 0.0, True), (False, 0.2, False)],
)
def test_implicit_gradient_is_that_of_the_converged_solution(nonnegative, mu, relative):
    """Implicit gradients at T = 3000 (input, dictionary through the atom normalisation, learned
    λ, and λ_max when relative) equal central differences of coordinate descent's solution."""
    size = (6, 5)
    layer = CSCLayer(
        2, 3, 3, stride=2, lmbda=0.3 if relative else 0.15, mu=mu, n_iter=3000,
        nonnegative=nonnegative, learn_lmbda=True, lmbda_relative=relative,
        init_power_iters=300, backward="implicit",
    ).double()  # fmt: skip
    x = torch.randn(2, 2, *size, dtype=F64, requires_grad=True)
    z = layer(x)
    layer.solver.refresh_lipschitz = False  # a constant step for the finite differences
    density = float((z != 0).double().mean())
    assert 0.1 < density < 0.95  # a genuine support
    g = torch.randn_like(z)
    (z * g).sum().backward()
    x0, w0, r0 = x.detach(), layer.weight.detach(), layer.solver.raw_lmbda.detach()

    starts = [None, None]

    def loss(xv, wv, rv):
        weight = F.normalize(wv.flatten(1), dim=1).view_as(wv)
        code_shape = (layer.out_channels, *layer.code_size(size))
        m = dense_matrix(layer.operator(size, weight).apply, code_shape)
        total = 0.0
        for i in range(2):
            u = xv[i].reshape(-1)
            lam = float(torch.sigmoid(rv) if relative else F.softplus(rv))  # ρ < 1 / λ > 0
            if relative:
                corr = m.T @ u
                lam *= float(corr.clamp_min(0).max() if nonnegative else corr.abs().max())
            solution = coordinate_descent(m, u, lam, mu, nonnegative, starts[i], 20000, 1e-14)
            if starts[i] is None:  # the unperturbed solution: warm start for the differences
                starts[i] = solution
                torch.testing.assert_close(solution, z[i].detach().reshape(-1), rtol=0, atol=1e-9)
            total += float(solution @ g[i].reshape(-1))
        return total

    loss(x0, w0, r0)

    eps = 1e-6
    cases = [
        (x.grad, lambda d: loss(x0 + d, w0, r0)),
        (layer.weight.grad, lambda d: loss(x0, w0 + d, r0)),
        (layer.solver.raw_lmbda.grad, lambda d: loss(x0, w0, r0 + d)),
    ]
    for grad, fn in cases:
        d = torch.randn_like(grad)
        fd = (fn(eps * d) - fn(-eps * d)) / (2 * eps)
        assert float((grad * d).sum()) == pytest.approx(fd, rel=2e-5, abs=1e-8)


def test_implicit_forward_value_is_the_unrolled_one_and_differs_in_gradient_at_small_t():
    layer = CSCLayer(3, 5, 3, n_iter=3).double()
    x = torch.randn(2, 3, 7, 6, dtype=F64, requires_grad=True)
    layer(x)
    layer.solver.refresh_lipschitz = False  # one step size for every backward
    z0, gx0, _ = _grads(layer, x, "unrolled")
    z1, gx1, _ = _grads(layer, x, "implicit")
    assert torch.equal(z0, z1)
    assert not torch.allclose(gx0, gx1)  # the unrolled map is not the converged solution


def test_implicit_refuses_a_learned_step_and_unknown_modes_are_named():
    with pytest.raises(ValueError, match="learn_step"):
        CSCLayer(3, 4, 3, backward="implicit", learn_step=True)
    with pytest.raises(ValueError, match="learn_step"):
        SparseDeconvLayer(3, 4, 3, kind="inverse_csc", backward="implicit", learn_step=True)
    with pytest.raises(ValueError, match="backward must be one of"):
        CSCLayer(3, 4, 3, backward="reversible")
    with pytest.raises(ValueError, match=r"model\.encoder\.stages\[1\].*learn_step"):
        CSCEncoder(
            1, 8, [{"out_channels": 4}, {"out_channels": 4, "learn_step": True}],
            feature_dim=8, stage_defaults={"backward": "implicit"},
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"model\.decoder\.stages\[0\].*backward"):
        CSCDecoder(1, 8, [{"in_channels": 4, "backward": "nope"}], feature_dim=8)


def test_backward_option_reaches_the_solver_from_the_model_config():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ctrl_csc.cli.common import config_dir

    overrides = [
        "model=csc_ctrl_mini",
        "+model.first_stage.backward=checkpoint",  # the encoder's first stage
        "+model.encoder.stage_defaults.compile=false",
        "model.decoder.stages=[{in_channels:128,stride:2},"  # the decoder's own list
        "{in_channels:64,stride:2,norm:none,backward:implicit},"
        "{in_channels:32,stride:2,kind:synthesis}]",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    enc = instantiate(cfg.model.encoder)
    dec = instantiate(cfg.model.decoder)
    assert [s.solver.backward for s in enc.stages] == ["checkpoint", "unrolled", "unrolled"]
    assert [s.solver.backward for s in dec.stages[:2]] == ["unrolled", "implicit"]
    x = torch.randn(2, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    dec(enc(x)).square().mean().backward()
    assert all(s.weight.grad is not None for s in [*enc.stages, *dec.stages])


@pytest.mark.slow  # compiling takes 10-30 s on CPU
@pytest.mark.parametrize(
    "mode, options",
    [
        ("unrolled", dict(nonnegative=True)),
        ("unrolled", dict(nonnegative=False, mu=0.1, lmbda_relative=True, lmbda=0.3)),
        ("checkpoint", dict(nonnegative=True, learn_step=True)),
    ],
)
def test_compiled_solver_agrees_with_eager(mode, options):
    """compile=True traces the iterations into one graph (per checkpoint segment): the same
    code and gradients as the eager solver, to float32 rounding."""
    if not compile_available():
        pytest.skip("torch.compile cannot build kernels here (no working C++ compiler)")
    torch.manual_seed(1)
    layer = CSCLayer(3, 5, 3, n_iter=5, learn_lmbda=True, **options)
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    layer(x)
    layer.solver.refresh_lipschitz = False  # one step size for compiled and eager
    z0, gx0, gp0 = _grads(layer, x, mode)
    layer.solver.compile = True
    z1, gx1, gp1 = _grads(layer, x, mode)
    torch.testing.assert_close(z1, z0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-5)
    for name in gp0:
        assert gp0[name].abs().max() > 0, name
        torch.testing.assert_close(gp1[name], gp0[name], rtol=1e-4, atol=1e-5, msg=name)


def test_mask_free_prox_inside_compile_is_the_prox():
    """Inside torch.compile the prox is written without a boolean mask ((v + |v|)/2 for max(v, 0),
    inductor stores masks slowly on CPU): the same values bit for bit, the same gradient except
    at v = 0 exactly, where it is ½."""
    from ctrl_csc.nn.iteration import apply_prox
    from ctrl_csc.nn.prox import shrink

    v = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    v.view(-1)[:4] = torch.tensor([0.0, -0.0, 1e-300, -1e-300], dtype=torch.float64)
    for nonnegative in (True, False):
        a = v.clone().requires_grad_(True)
        b = v.clone().requires_grad_(True)
        got = apply_prox(a, 0.3, nonnegative, traced=True)
        want = torch.relu(b) if nonnegative else shrink(b, 0.3)
        assert torch.equal(got, want)
        g = torch.randn_like(v)
        (ga,) = torch.autograd.grad((got * g).sum(), a)
        (gb,) = torch.autograd.grad((want * g).sum(), b)
        where = (v != 0) if nonnegative else ((v.abs() - 0.3) != 0)
        torch.testing.assert_close(ga[where], gb[where], rtol=0, atol=0)
