"""Operators of the CSC / sparse-deconvolution stages: adjointness, shapes, Lipschitz constant,
errors, state dict and code density."""

import io
import math

import pytest
import torch
from dense_reference import F64, dense_matrix

from ctrl_csc.nn import CSCLayer, SparseDeconvLayer


def inner(a, b):
    return float((a * b).sum().detach())


SIZES = [(5, 5), (6, 6), (5, 8), (7, 6)]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_csc_adjointness_and_shapes(stride, size, kernel_size):
    layer = CSCLayer(3, 4, kernel_size, stride=stride).double()
    x = torch.randn(2, 3, *size, dtype=F64)
    code = layer.analyze(x)
    expected = (2, 4, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    assert code.shape == expected
    z = torch.randn(expected, dtype=F64)
    dz = layer.synthesize(z, size)
    assert dz.shape == x.shape
    assert inner(dz, x) == pytest.approx(inner(z, code), rel=1e-12, abs=1e-12)
    assert layer(x).shape == expected


@pytest.mark.parametrize("kind", ["synthesis", "inverse_csc"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("coarse", [(3, 3), (4, 5)])
def test_deconv_adjointness_and_shapes(kind, stride, coarse):
    layer = SparseDeconvLayer(4, 3, 3, stride=stride, kind=kind).double()
    z = torch.randn(2, 4, *coarse, dtype=F64)
    fine_sizes = [(coarse[0] * stride, coarse[1] * stride)]
    if stride == 2:  # odd fine sizes (2h − 1) reach the same code size
        fine_sizes.append((2 * coarse[0] - 1, 2 * coarse[1] - 1))
    for fine in fine_sizes:
        op = layer.operator(coarse, fine)
        coarse_t = torch.randn(2, 4, *coarse, dtype=F64)
        fine_t = torch.randn(2, 3, *fine, dtype=F64)
        if kind == "synthesis":  # D': coarse -> fine
            lhs, rhs = inner(op.apply(coarse_t), fine_t), inner(coarse_t, op.adjoint(fine_t))
        else:  # B: fine -> coarse
            lhs, rhs = inner(op.apply(fine_t), coarse_t), inner(fine_t, op.adjoint(coarse_t))
        assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)
        out = layer(z, fine if fine != fine_sizes[0] else None)
        assert out.shape == (2, 3, *fine)


@pytest.mark.parametrize("stride", [1, 2])
def test_csc_lipschitz_matches_dense_spectral_norm(stride):
    size = (6, 5)
    layer = CSCLayer(2, 3, 3, stride=stride, init_power_iters=200).double()
    h, w = layer.code_size(size)
    matrix = dense_matrix(lambda z: layer.synthesize(z, size), (3, h, w)).detach()
    true = float(torch.linalg.matrix_norm(matrix, ord=2)) ** 2
    est = float(layer.lipschitz(size))
    assert est <= true * (1 + 1e-12)  # power iteration never overestimates
    assert est == pytest.approx(true, rel=1e-6)
    # forward at that size uses the cached estimate (eval mode: no new iterations)
    layer.eval()
    layer(torch.randn(1, 2, *size, dtype=F64))
    assert float(layer.lipschitz()) == est


def test_inverse_csc_lipschitz_matches_dense_spectral_norm():
    layer = SparseDeconvLayer(3, 2, 3, stride=2, kind="inverse_csc", init_power_iters=1500)
    layer = layer.double()
    coarse, fine = (3, 3), (5, 6)
    op = layer.operator(coarse, fine)
    matrix = dense_matrix(op.apply, (2, *fine)).detach()
    true = float(torch.linalg.matrix_norm(matrix, ord=2)) ** 2
    est = float(layer.lipschitz(coarse, fine))
    assert est <= true * (1 + 1e-12)
    assert est == pytest.approx(true, rel=1e-6)


def test_lipschitz_tracks_dictionary_changes_in_eval():
    layer = CSCLayer(2, 3, 3, init_power_iters=300).double().eval()
    x = torch.randn(1, 2, 6, 6, dtype=F64)
    layer(x)
    before = float(layer.lipschitz())
    with torch.no_grad():
        layer.weight[0].mul_(-1.0)  # atom signs change D (and L) but not the norms
        layer.weight[1].add_(layer.weight[2])
    layer(x)
    after = float(layer.lipschitz())
    h, w = layer.code_size((6, 6))
    matrix = dense_matrix(lambda z: layer.synthesize(z, (6, 6)), (3, h, w)).detach()
    true = float(torch.linalg.matrix_norm(matrix, ord=2)) ** 2
    assert after == pytest.approx(true, rel=1e-6)
    assert after != before


def test_eval_reuses_the_estimate_until_the_weight_changes(monkeypatch):
    import ctrl_csc.nn.lipschitz as lipschitz_module

    calls = []
    real = lipschitz_module.power_iteration
    monkeypatch.setattr(
        lipschitz_module, "power_iteration", lambda *a: calls.append(a[-1]) or real(*a)
    )
    layer = CSCLayer(2, 3, 3, init_power_iters=7).eval()
    x = torch.randn(1, 2, 6, 6)
    layer(x)
    layer(x)
    assert calls == [7]  # the second forward reuses the estimate
    other = CSCLayer(2, 3, 3)
    layer.load_state_dict(other.state_dict())  # new values, same tensor objects and sizes
    layer(x)
    layer(x)
    assert calls == [7, 7]
    with torch.no_grad():
        layer.weight.copy_(layer.weight.clone())  # written in place but equal: nothing to redo
    layer(x)
    assert calls == [7, 7]


def test_training_mode_refreshes_each_forward_and_not_through_autograd():
    layer = CSCLayer(2, 3, 3, power_iters=1, init_power_iters=2)
    x = torch.randn(2, 2, 8, 8)
    layer(x)
    first = layer.lipschitz()
    layer(x)
    assert float(layer.lipschitz()) != float(first)
    assert not layer.solver.power_vector.requires_grad
    assert not layer.solver.lipschitz_estimate.requires_grad


def test_error_messages():
    layer = CSCLayer(3, 4, 3)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*got \(2, 5, 8, 8\)"):
        layer(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match=r"got \(3, 8, 8\)"):
        layer(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="lmbda"):
        CSCLayer(3, 4, 3, lmbda=-0.1)
    with pytest.raises(ValueError, match="mu"):
        CSCLayer(3, 4, 3, mu=-1.0)
    with pytest.raises(ValueError, match="n_iter"):
        CSCLayer(3, 4, 3, n_iter=0)
    with pytest.raises(ValueError, match="algorithm"):
        CSCLayer(3, 4, 3, algorithm="admm")
    with pytest.raises(ValueError, match="stride"):
        CSCLayer(3, 4, 3, stride=0)
    with pytest.raises(ValueError, match="learn_lmbda"):
        CSCLayer(3, 4, 3, lmbda=0.0, learn_lmbda=True)
    with pytest.raises(ValueError, match="too small"):
        CSCLayer(3, 4, 7, padding=0)(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="kind"):
        SparseDeconvLayer(4, 3, 3, kind="deconv")
    with pytest.raises(ValueError, match="inverse_csc"):
        SparseDeconvLayer(4, 3, 3, kind="synthesis", learn_lmbda=True)
    deconv = SparseDeconvLayer(4, 3, 3, stride=2, kind="inverse_csc")
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        deconv(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="output_padding"):
        deconv(torch.randn(1, 4, 4, 4), output_size=(9, 8))  # 4 -> 7..8 only
    with pytest.raises(ValueError, match="output_padding"):
        even_k = SparseDeconvLayer(4, 3, 4, stride=2, kind="synthesis")  # p = k // 2
        even_k(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="output size"):
        layer.synthesize(torch.randn(1, 4, 8, 8), (9, 8))
    with pytest.raises(RuntimeError, match="forward"):
        CSCLayer(3, 4, 3).lipschitz()
    with pytest.raises(ValueError, match="inverse_csc"):
        SparseDeconvLayer(4, 3, 3, kind="synthesis").lipschitz()


def test_even_kernel_with_suitable_padding_upsamples_exactly():
    layer = SparseDeconvLayer(4, 3, 4, stride=2, padding=1, kind="inverse_csc")
    assert layer(torch.randn(1, 4, 5, 5)).shape == (1, 3, 10, 10)


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_round_trip_across_sizes():
    src = CSCLayer(3, 4, 3, stride=2, learn_lmbda=True, learn_step=True)
    x = torch.randn(2, 3, 9, 7)
    src(x)
    state = _roundtrip(src.state_dict())
    assert state["solver.power_vector"].shape == (1, 4, 5, 4)

    dst = CSCLayer(3, 4, 3, stride=2, learn_lmbda=True, learn_step=True)
    dst(torch.randn(1, 3, 6, 6))  # buffers of another shape
    dst.load_state_dict(state)
    fresh = CSCLayer(3, 4, 3, stride=2, learn_lmbda=True, learn_step=True)
    fresh.load_state_dict(state)
    for other in (dst, fresh):
        for name, value in src.state_dict().items():
            torch.testing.assert_close(other.state_dict()[name], value, rtol=0, atol=0)
        assert float(other.lipschitz()) == float(src.lipschitz())
    # the same warm-started training step on every copy
    expected = src(x)
    torch.testing.assert_close(dst(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    # saved after an optimiser step: both re-check the estimate (warm) before evaluating
    with torch.no_grad():
        src.weight.add_(1e-3)
    dst.load_state_dict(src.state_dict())
    src.eval(), dst.eval()
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    assert float(dst.lipschitz()) == float(src.lipschitz())
    # an unused layer's state resets a used one
    dst.load_state_dict(CSCLayer(3, 4, 3, stride=2, learn_lmbda=True, learn_step=True).state_dict())
    with pytest.raises(RuntimeError):
        dst.lipschitz()


def test_deconv_state_dict_round_trip():
    src = SparseDeconvLayer(4, 3, 3, stride=2, kind="inverse_csc")
    z = torch.randn(2, 4, 4, 4)
    src(z)
    dst = SparseDeconvLayer(4, 3, 3, stride=2, kind="inverse_csc")
    dst.load_state_dict(_roundtrip(src.state_dict()))
    torch.testing.assert_close(dst(z), src(z), rtol=0, atol=0)


def test_codes_are_sparse_and_densities_are_counted_from_them():
    """A stage's density is counted from the code it returns (the layers keep no state of their
    last forward): exact non-zeros, strictly between 0 and 1 at these λ."""
    from ctrl_csc.models import code_densities

    layer = CSCLayer(3, 8, 3, lmbda=0.5)
    z = layer(torch.randn(4, 3, 8, 8))
    (d,) = code_densities([z])
    assert d == pytest.approx(float((z != 0).float().mean()))
    assert 0.0 < d < 1.0
    deconv = SparseDeconvLayer(8, 3, 3, kind="inverse_csc", lmbda=0.2)
    v = deconv(z)
    assert code_densities([v])[0] == pytest.approx(float((v != 0).float().mean()))
    assert SparseDeconvLayer(8, 3, 3, kind="synthesis")(z).shape == (4, 3, 8, 8)
    assert code_densities([None]) == [None]


def test_normalized_atoms_and_float32():
    layer = CSCLayer(3, 5, 3, normalize_atoms=True)
    with torch.no_grad():
        layer.weight.mul_(7.0)
    norms = torch.linalg.vector_norm(layer.dictionary(), dim=(1, 2, 3))
    torch.testing.assert_close(norms, torch.ones(5))
    deconv = SparseDeconvLayer(4, 3, 3, kind="inverse_csc")
    torch.testing.assert_close(
        torch.linalg.vector_norm(deconv.dictionary(), dim=(0, 2, 3)), torch.ones(3)
    )
    x = torch.randn(2, 3, 8, 8)
    z32 = layer(x)
    layer64 = CSCLayer(3, 5, 3)
    layer64.load_state_dict(layer.state_dict())
    layer64 = layer64.double()
    assert z32.dtype == torch.float32
    torch.testing.assert_close(layer64(x.double()).float(), z32, atol=1e-4, rtol=1e-4)


def test_init_std_sets_the_stored_scale_not_the_operator():
    torch.manual_seed(0)
    unit = CSCLayer(4, 64, 4, stride=2, padding=1)
    torch.manual_seed(0)
    small = CSCLayer(4, 64, 4, stride=2, padding=1, init_std=0.05)
    norms = torch.linalg.vector_norm(unit.weight, dim=(1, 2, 3))
    torch.testing.assert_close(norms, torch.ones(64))
    assert abs(float(small.weight.detach().std()) - 0.05) < 0.005
    # same Gaussian draw, so the operators' unit-norm atoms coincide
    torch.testing.assert_close(small.dictionary(), unit.dictionary())
    deconv = SparseDeconvLayer(8, 3, 4, stride=2, padding=1, kind="inverse_csc", init_std=0.1)
    assert abs(float(deconv.weight.detach().std()) - 0.1) < 0.02
    for bad in (0.0, -1.0, True):
        with pytest.raises(ValueError, match="init_std"):
            CSCLayer(4, 8, 3, init_std=bad)


@pytest.mark.parametrize("kernel_size, padding", [(3, 1), (3, 0), (3, 2), (4, 1), (1, 0), (3, 3)])
@pytest.mark.parametrize("transposed", [True, False])
def test_stride_one_transposed_convolution_is_the_library_one(kernel_size, padding, transposed):
    """At stride 1 the transposed convolution runs as a convolution with the flipped kernel
    (padding k − 1 − p; p ≥ k falls back to conv_transpose2d): the same values and gradients as
    torch's conv_transpose2d, in float64."""
    from ctrl_csc.nn import StridedConv

    w = torch.randn(5, 3, kernel_size, kernel_size, dtype=F64, requires_grad=True)
    op = StridedConv(w, 1, padding, (0, 0), transposed)
    x = torch.randn(2, 5, 7, 6, dtype=F64, requires_grad=True)  # coarse: weight.shape[0] channels
    got = op.apply(x) if transposed else op.adjoint(x)
    want = torch.nn.functional.conv_transpose2d(x, w, None, 1, padding)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    grads = torch.autograd.grad((got * g).sum(), (x, w))
    expected = torch.autograd.grad((want * g).sum(), (x, w))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
