"""Metrics against independent computations (formulas written here, scipy, closed forms)."""

import math
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
from numpy.lib.stride_tricks import sliding_window_view

from ctrl_csc.eval import metrics as M


# ------------------------------------------------------------------------------------------- PSNR
def test_psnr_constant_offset_matches_formula():
    x = torch.rand(3, 2, 16, 16) - 0.5
    offsets = torch.tensor([0.1, 0.2, 0.05])
    y = x + offsets.view(-1, 1, 1, 1)
    got = M.psnr(x, y, data_range=2.0)
    want = 10 * torch.log10(4.0 / offsets.double() ** 2)
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)
    assert M.psnr(x, y, data_range=1.0)[0] == pytest.approx(10 * math.log10(1 / 0.01), abs=1e-4)


def test_psnr_identical_is_inf_and_shape_errors():
    x = torch.rand(2, 1, 8, 8)
    assert torch.isinf(M.psnr(x, x)).all()
    with pytest.raises(ValueError, match="shapes differ"):
        M.psnr(x, x[:1])


# ------------------------------------------------------------------------------------------- SSIM
def _ssim_numpy(x: np.ndarray, y: np.ndarray, L: float, win=11, sigma=1.5, k1=0.01, k2=0.03):
    """Wang et al. (2004) SSIM, Gaussian window, valid region; x, y: (C, H, W) float64."""
    r = np.arange(win) - (win - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    vals = []
    for xc, yc in zip(x, y):
        px = sliding_window_view(xc, (win, win))  # (H', W', win, win)
        py = sliding_window_view(yc, (win, win))
        mx = (px * w).sum(axis=(-1, -2))
        my = (py * w).sum(axis=(-1, -2))
        vx = (px**2 * w).sum(axis=(-1, -2)) - mx**2
        vy = (py**2 * w).sum(axis=(-1, -2)) - my**2
        cxy = (px * py * w).sum(axis=(-1, -2)) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        vals.append(s)
    return float(np.mean(vals))


def test_ssim_identical_is_one():
    x = torch.rand(2, 3, 20, 24) * 2 - 1
    torch.testing.assert_close(M.ssim(x, x), torch.ones(2), rtol=0, atol=1e-6)


def test_ssim_matches_direct_formula_and_skimage():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 24, 20, generator=g, dtype=torch.float64) * 2 - 1
    # structured + noisy versions: a range of SSIM values
    y = torch.stack(
        [
            x[0] * 0.5 + 0.1,
            x[1] + 0.3 * torch.randn(3, 24, 20, generator=g, dtype=torch.float64),
            -x[2],
        ]
    )
    y = y.clamp(-1, 1)
    got = M.ssim(x, y)  # images in [-1, 1]: mapped to [0, 1], L = 1
    x01, y01 = (x + 1) / 2, (y + 1) / 2
    want = torch.tensor(
        [_ssim_numpy(a.numpy(), b.numpy(), 1.0) for a, b in zip(x01, y01)], dtype=torch.float64
    )
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-10)
    # scikit-image on [0, 1] images with data_range=1 (the published convention), with the
    # reference implementation's settings (Gaussian σ 1.5, population covariance, borders
    # cropped). torchmetrics >= 1.x averages over reflect-padded borders, so it differs.
    from skimage.metrics import structural_similarity

    sk = [
        structural_similarity(
            a.numpy(),
            b.numpy(),
            data_range=1.0,
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for a, b in zip(y01, x01)
    ]
    torch.testing.assert_close(
        got.double(), torch.tensor(sk, dtype=torch.float64), rtol=0, atol=1e-8
    )
    # images already in [0, 1]: the same numbers
    torch.testing.assert_close(M.ssim(x01, y01, value_range=(0, 1)), got, rtol=0, atol=1e-12)
    # SSIM on [-1, 1] with L = 2 is a different number (the luminance term is not shift-invariant)
    assert not torch.allclose(
        got,
        torch.tensor(
            [_ssim_numpy(a.numpy(), b.numpy(), 2.0) for a, b in zip(x, y)], dtype=torch.float64
        ),
    )


def test_ssim_too_small_image_raises():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="window"):
        M.ssim(x, x)


# ------------------------------------------------------------------------------------ Fréchet
def _random_cov(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(8), _random_cov(8, rng)
    assert M.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = M.frechet_distance(mu1, np.diag(v1), torch.tensor(mu2), torch.tensor(np.diag(v2)))
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_frechet_full_covariance_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    d = 10
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(d, rng), _random_cov(d, rng)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_gaussian_stats_streaming_matches_numpy():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((50, 5)) * 3 + 10
    s = M.GaussianStats()
    for chunk in np.array_split(f, 4):
        s.update(torch.from_numpy(chunk).float())
    np.testing.assert_allclose(s.mean().numpy(), f.astype(np.float32).mean(0), rtol=1e-6)
    np.testing.assert_allclose(
        s.cov().numpy(), np.cov(f.astype(np.float32), rowvar=False), rtol=1e-5, atol=1e-6
    )


def test_fid_from_features_shifted_gaussian_closed_form():
    rng = np.random.default_rng(4)
    f_real = rng.standard_normal((400, 8)) * rng.uniform(0.5, 2, 8)
    delta = rng.standard_normal(8)
    # same covariance (shift-invariant), means differ by delta: FID = ||delta||^2 exactly
    assert M.fid_from_features(f_real, f_real + delta) == pytest.approx(np.sum(delta**2), rel=1e-8)
    assert M.fid_from_features(f_real, f_real) == pytest.approx(0.0, abs=1e-8)


class _LinearConvFeatures(torch.nn.Module):
    """A fixed random *linear* conv net: features(x + c) = features(x) + features(c·1)."""

    def __init__(self, channels=1):
        super().__init__()
        torch.manual_seed(123)
        self.conv = torch.nn.Conv2d(channels, 6, 3, stride=2, bias=False)

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 2).flatten(1)


def test_fid_through_feature_network():
    fe = M.NetworkFeatureExtractor(_LinearConvFeatures().double())
    x = torch.rand(64, 1, 12, 12, dtype=torch.float64) - 0.5
    assert M.compute_fid(x, x, fe, batch_size=16) == pytest.approx(0.0, abs=1e-8)
    c = 0.3
    shift = fe(torch.full((1, 1, 12, 12), c, dtype=torch.float64))[0][0]
    want = float((shift**2).sum())
    got = M.compute_fid(x, list((x + c).split(10)), fe)
    assert got == pytest.approx(want, rel=1e-8)


# --------------------------------------------------------------------------------------------- IS
def _is_numpy(logits: np.ndarray, splits: int) -> list[float]:
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out = []
    for chunk in np.array_split(p, splits):
        py = chunk.mean(0, keepdims=True)
        out.append(np.exp(np.mean(np.sum(chunk * (np.log(chunk) - np.log(py)), 1))))
    return out


def test_inception_score_uniform_and_one_hot():
    mean, std = M.inception_score_from_logits(torch.zeros(100, 7), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    k = 5
    logits = 60.0 * torch.eye(k).repeat(20, 1)  # 100 confident predictions, classes cycling
    mean, _ = M.inception_score_from_logits(logits, splits=10)
    assert mean == pytest.approx(k, rel=1e-6)


def test_inception_score_matches_numpy_formula():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((60, 9)) * 2
    for splits in (1, 6):
        mean, std = M.inception_score_from_logits(torch.tensor(logits), splits=splits)
        ref = _is_numpy(logits, splits)
        assert mean == pytest.approx(np.mean(ref), rel=1e-10)
        assert std == pytest.approx(np.std(ref), abs=1e-10)


def test_compute_inception_score_needs_logits():
    fe = M.NetworkFeatureExtractor(_LinearConvFeatures())
    with pytest.raises(ValueError, match="no logits"):
        M.compute_inception_score(torch.zeros(4, 1, 8, 8), fe, splits=1)
    fe = M.NetworkFeatureExtractor(_LinearConvFeatures(), logits_head=torch.nn.Linear(24, 3))
    mean, _ = M.compute_inception_score(torch.rand(8, 1, 8, 8), fe, splits=2, batch_size=3)
    assert 1.0 <= mean <= 3.0


# ------------------------------------------------------------------------- density, accuracies
def test_code_density():
    code = torch.tensor([[0.0, 1.0, -2.0, 0.0], [0.0, 0.0, 0.05, 3.0]])
    assert M.code_density(code) == pytest.approx(4 / 8)
    assert M.code_density(code, tol=0.1) == pytest.approx(3 / 8)


def _planted_subspaces(n_per, d=30, k=3, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k * r, generator=g, dtype=torch.float64))
    zs, ys = [], []
    for j in range(k):
        coeff = torch.randn(n_per, r, generator=g, dtype=torch.float64)
        z = coeff @ q[:, j * r : (j + 1) * r].T
        zs.append(z / z.norm(dim=1, keepdim=True))
        ys.append(torch.full((n_per,), j * 2 + 1))  # non-contiguous class ids
    return torch.cat(zs).float(), torch.cat(ys)


def test_nearest_subspace_planted_orthogonal_subspaces():
    tr_z, tr_y = _planted_subspaces(40, seed=0)
    te_z, te_y = _planted_subspaces(25, seed=0)
    te_z, te_y = te_z[torch.randperm(len(te_y))], te_y  # labels no longer aligned: must fail
    assert M.nearest_subspace_accuracy(tr_z, tr_y, te_z, te_y, 4) < 0.9
    te_z, te_y = _planted_subspaces(25, seed=0)
    assert M.nearest_subspace_accuracy(tr_z, tr_y, te_z, te_y, 4) == 1.0
    assert M.nearest_subspace_accuracy(tr_z, tr_y, te_z, te_y, 2) == 1.0
    with pytest.raises(ValueError, match="n_components"):
        M.nearest_subspace_accuracy(tr_z, tr_y, te_z, te_y, 31)


def test_linear_probe_separable():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 6

    def sample(n):
        y = torch.arange(3).repeat_interleave(n)
        return centers[y] + torch.randn(3 * n, 8, generator=g), y

    (tr_z, tr_y), (te_z, te_y) = sample(30), sample(20)
    assert M.linear_probe_accuracy(tr_z, tr_y, te_z, te_y) >= 0.99
    with pytest.raises(ValueError, match="single class"):
        M.linear_probe_accuracy(tr_z, torch.zeros_like(tr_y), te_z, te_y)


# ------------------------------------------------------------------------------------- Inception
def test_images_to_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    u = M.images_to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 3, 2, 2)
    assert u[0, 2].flatten().tolist() == [0, 128, 255, 255]


def _offline(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_inception_offline_without_path_raises_clear_message(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError) as err:
        M.build_inception_feature_extractor()
    msg = str(err.value)
    assert "eval.inception_weights=PATH" in msg
    assert M.INCEPTION_WEIGHTS_URL in msg and M.PYTORCH_FID_WEIGHTS_URL in msg
    assert "pt_inception-2015-12-05" in msg


def test_inception_bad_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        M.build_inception_feature_extractor(tmp_path / "missing.pth")
    evil = tmp_path / "evil.pth"
    torch.save({"payload": _Payload()}, evil)  # a pickled object, not tensors
    with pytest.raises(RuntimeError, match="eval.inception_weights"):
        M.build_inception_feature_extractor(evil)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)  # tensors, but not this network's
    with pytest.raises(RuntimeError, match="does not hold the Inception-v3 FID weights"):
        M.build_inception_feature_extractor(wrong)


class _Payload:
    pass


@pytest.fixture(scope="module")
def local_inception(tmp_path_factory):
    """The real torch-fidelity architecture with random weights, saved as a plain state dict and
    loaded back through ``build_inception_feature_extractor(path)``."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe_module

    with pytest.MonkeyPatch.context() as m:
        m.setattr(fe_module, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe_module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = fe_module.FeatureExtractorInceptionV3("x", ["2048"])
    tmp = tmp_path_factory.mktemp("inception")
    path = tmp / "inception.pth"
    state = net.state_dict()
    torch.save(state, path)
    with pytest.MonkeyPatch.context() as m:
        _offline(m, tmp)  # a local path must not need the network
        fe = M.build_inception_feature_extractor(path)
    return fe, state


def test_inception_from_local_weights_file(local_inception):
    fe, state = local_inception
    assert fe.provides_logits and not fe.training
    loaded = fe.net.state_dict()
    assert loaded.keys() == state.keys()
    for k in ("Conv2d_1a_3x3.conv.weight", "fc.weight", "Mixed_7c.branch_pool.conv.weight"):
        torch.testing.assert_close(loaded[k], state[k], rtol=0, atol=0)
    assert all(not p.requires_grad for p in fe.parameters())


@pytest.mark.slow
def test_inception_forward_shapes(local_inception):
    fe, _ = local_inception
    with torch.no_grad():
        feats, logits = fe(torch.rand(1, 1, 16, 16) * 2 - 1)  # grayscale -> RGB uint8 -> 299 px
    assert feats.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.isfinite(feats).all() and torch.isfinite(logits).all()
