"""Metrics of reconstruction and feature quality.

Images are NCHW tensors in ``[-1, 1]`` (``data_range = 2``) unless stated otherwise; features
are ``(N, d)`` rows. Every metric is a plain function (or a small streaming accumulator) so that
it can be tested against an independent formula and reused outside the evaluation runner.

- Pixel fidelity: :func:`psnr`, :func:`ssim` (per image).
- Distribution fidelity: :func:`frechet_distance`, :func:`fid_from_features`,
  :func:`inception_score_from_logits`, :class:`GaussianStats` (streaming mean/covariance),
  computed on the features of a :class:`FeatureExtractor` — any network, the standard one being
  Inception-v3 (:func:`build_inception_feature_extractor`, torch-fidelity's
  ``FeatureExtractorInceptionV3`` as used by torchmetrics' FID).
- Sparsity: :func:`code_density`.
- Feature quality: :func:`nearest_subspace_accuracy`, :func:`linear_probe_accuracy`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from collections.abc import Iterable
from contextlib import contextmanager, redirect_stdout

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "INCEPTION_WEIGHTS_URL",
    "PYTORCH_FID_WEIGHTS_URL",
    "FeatureExtractor",
    "GaussianStats",
    "InceptionFeatureExtractor",
    "NetworkFeatureExtractor",
    "build_inception_feature_extractor",
    "code_density",
    "compute_fid",
    "compute_inception_score",
    "fid_from_features",
    "frechet_distance",
    "images_to_uint8",
    "inception_score_from_logits",
    "linear_probe_accuracy",
    "nearest_subspace_accuracy",
    "psnr",
    "ssim",
]

log = logging.getLogger(__name__)

#: Where torch-fidelity (and so torchmetrics) fetches the FID Inception-v3 weights: TensorFlow's
#: ``inception-2015-12-05`` graph converted to PyTorch (file hash prefix ``6726825d``).
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
#: The same weights as published by pytorch-fid (``pt_inception-2015-12-05``, same hash prefix);
#: either file loads.
PYTORCH_FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)


# --------------------------------------------------------------------------------------------------
# Pixel fidelity
# --------------------------------------------------------------------------------------------------
def _check_pair(x: Tensor, y: Tensor, name: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected images (N, C, H, W), got shape {tuple(x.shape)}")


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio of each image pair, in dB.

    ``PSNR = 10 log10(data_range² / MSE)`` with the MSE taken over ``(C, H, W)`` of each image.

    Args:
        x, y: images ``(N, C, H, W)`` (default range ``[-1, 1]``, i.e. ``data_range = 2``).
        data_range: max − min of the pixel range.

    Returns:
        ``(N,)`` float tensor; ``inf`` for identical images.
    """
    _check_pair(x, y, "psnr")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse)).to(torch.promote_types(x.dtype, torch.float32))


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    x: Tensor,
    y: Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Structural similarity (Wang et al., 2004) of each image pair, in the published convention.

    The images are first mapped from ``value_range`` to ``[0, 1]`` and SSIM is computed there with
    ``L = 1`` — the convention of the reference implementation, scikit-image and every published
    SSIM. (The luminance term ``2 μx μy + C1`` is not shift-invariant, so SSIM on ``[-1, 1]`` with
    ``L = 2`` is a different number.) Local statistics use an ``window_size × window_size``
    Gaussian window (std ``sigma``) over the valid region (no padding); per pixel and channel

        SSIM = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)),
        C1 = k1², C2 = k2²,

    averaged over channels and positions. Computed in float64.

    Args:
        x, y: images ``(N, C, H, W)`` with values in ``value_range`` and ``H, W >= window_size``.
        value_range: ``(min, max)`` of the pixel range (the project's images are in ``[-1, 1]``).

    Returns:
        ``(N,)`` tensor in ``[-1, 1]``; 1 for identical images.
    """
    _check_pair(x, y, "ssim")
    n, c, h, w = x.shape
    if h < window_size or w < window_size:
        raise ValueError(f"ssim: images of {h}x{w} px are smaller than the {window_size}-px window")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"ssim: value_range must be (min, max) with max > min, got {value_range}")
    xd, yd = (x.double() - lo) / (hi - lo), (y.double() - lo) / (hi - lo)
    win = _gaussian_window(window_size, sigma, torch.float64, x.device)
    win = win.expand(c, 1, window_size, window_size)

    def filt(t: Tensor) -> Tensor:
        return F.conv2d(t, win, groups=c)

    mu_x, mu_y = filt(xd), filt(yd)
    sxx = filt(xd * xd) - mu_x**2
    syy = filt(yd * yd) - mu_y**2
    sxy = filt(xd * yd) - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).flatten(1).mean(dim=1).to(torch.promote_types(x.dtype, torch.float32))


# --------------------------------------------------------------------------------------------------
# Fréchet distance and Inception score
# --------------------------------------------------------------------------------------------------
def _as_f64(a: Tensor | np.ndarray) -> Tensor:
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    return a.detach().to(device="cpu", dtype=torch.float64)


def _sym_sqrt(a: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix via eigendecomposition (negative eigenvalues → 0)."""
    evals, evecs = torch.linalg.eigh((a + a.T) / 2)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(
    mu1: Tensor | np.ndarray,
    sigma1: Tensor | np.ndarray,
    mu2: Tensor | np.ndarray,
    sigma2: Tensor | np.ndarray,
) -> float:
    """Fréchet (2-Wasserstein) distance² between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})`` in float64, where
    ``tr (Σ1 Σ2)^{1/2} = Σ_i sqrt(λ_i(Σ1^{1/2} Σ2 Σ1^{1/2}))`` (the same eigenvalues, but of a
    symmetric PSD matrix, so no complex square root and no ``eps`` offset are needed).

    Args:
        mu1, mu2: means ``(D,)``; sigma1, sigma2: covariances ``(D, D)``.

    Returns:
        The distance as a python float (≥ 0 up to rounding).
    """
    m1, m2, s1, s2 = _as_f64(mu1), _as_f64(mu2), _as_f64(sigma1), _as_f64(sigma2)
    if m1.shape != m2.shape or m1.dim() != 1:
        raise ValueError(f"frechet_distance: means must be (D,), got {m1.shape} and {m2.shape}")
    d = m1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: covariances must be ({d}, {d}), got {tuple(s1.shape)} and "
            f"{tuple(s2.shape)}"
        )
    r1 = _sym_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    value = (m1 - m2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return float(value)


class GaussianStats:
    """Streaming mean and covariance of features, accumulated in float64.

    ``update`` takes ``(n, D)`` batches; nothing but ``Σ f`` ``(D,)`` and ``Σ f fᵀ`` ``(D, D)`` is
    kept, so statistics of any number of images use constant memory.
    """

    def __init__(self) -> None:
        self.count = 0
        self._sum: Tensor | None = None
        self._outer: Tensor | None = None

    def update(self, features: Tensor) -> None:
        f = _as_f64(features).flatten(1)
        if self._sum is None:
            self._sum = torch.zeros(f.shape[1], dtype=torch.float64)
            self._outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        elif f.shape[1] != self._sum.shape[0]:
            raise ValueError(f"GaussianStats: feature dim {f.shape[1]} != {self._sum.shape[0]}")
        self.count += f.shape[0]
        self._sum += f.sum(dim=0)
        self._outer += f.T @ f

    def mean(self) -> Tensor:
        """``(D,)`` float64 mean."""
        if self._sum is None or self.count == 0:
            raise ValueError("GaussianStats: no features accumulated")
        return self._sum / self.count

    def cov(self) -> Tensor:
        """``(D, D)`` float64 unbiased covariance (needs at least 2 samples)."""
        if self.count < 2:
            raise ValueError(f"GaussianStats: covariance needs >= 2 samples, got {self.count}")
        mu = self.mean()
        return (self._outer - self.count * torch.outer(mu, mu)) / (self.count - 1)


def fid_from_features(f_real: Tensor | np.ndarray, f_fake: Tensor | np.ndarray) -> float:
    """FID between two feature sets ``(N1, D)`` and ``(N2, D)``: Fréchet distance of their
    Gaussian fits (means and unbiased covariances, float64)."""
    s_real, s_fake = GaussianStats(), GaussianStats()
    s_real.update(_as_f64(f_real))
    s_fake.update(_as_f64(f_fake))
    return frechet_distance(s_real.mean(), s_real.cov(), s_fake.mean(), s_fake.cov())


def inception_score_from_logits(
    logits: Tensor | np.ndarray, splits: int = 10
) -> tuple[float, float]:
    """Inception score ``exp(E_x KL(p(y|x) ‖ p(y)))`` from class logits ``(N, K)``.

    The samples are cut, in order, into ``splits`` equal chunks (as Salimans et al.); ``p(y)`` is
    the mean of ``p(y|x)`` within each chunk. Computed in float64.

    Returns:
        ``(mean, std)`` of the per-chunk scores; 1 for uniform predictions, ``K`` for confident
        predictions spread evenly over ``K`` classes.
    """
    lg = _as_f64(logits)
    if lg.dim() != 2:
        raise ValueError(
            f"inception_score_from_logits: logits must be (N, K), got {tuple(lg.shape)}"
        )
    n = lg.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"inception_score_from_logits: need 1 <= splits <= N={n}, got {splits}")
    log_p = torch.log_softmax(lg, dim=1)
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits : (i + 1) * n // splits]
        log_py = torch.logsumexp(chunk, dim=0) - math.log(chunk.shape[0])
        kl = (chunk.exp() * (chunk - log_py)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


# --------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------
class FeatureExtractor(nn.Module):
    """Maps images ``(N, C, H, W)`` in ``[-1, 1]`` to ``(features (N, D), logits (N, K) | None)``.

    Subclasses implement :meth:`forward`; ``provides_logits`` says whether logits (for the Inception
    score) are returned. Extractors are frozen and always run in eval mode.
    """

    provides_logits: bool = False

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)


class NetworkFeatureExtractor(FeatureExtractor):
    """Wraps any network as a :class:`FeatureExtractor`.

    Args:
        network: maps images ``(N, C, H, W)`` in ``[-1, 1]`` to features (flattened to ``(N, D)``),
            or to a pair ``(features, logits)``.
        logits_head: optional module mapping the ``(N, D)`` features to logits ``(N, K)``.
    """

    def __init__(self, network: nn.Module, logits_head: nn.Module | None = None) -> None:
        super().__init__()
        self.network = network
        self.logits_head = logits_head
        self.requires_grad_(False)
        self.eval()

    @property
    def provides_logits(self) -> bool:  # type: ignore[override]
        return self.logits_head is not None or bool(getattr(self.network, "provides_logits", False))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.network(images)
        logits = None
        if isinstance(out, tuple | list):
            out, logits = out[0], out[1]
        feats = out.flatten(1)
        if self.logits_head is not None:
            logits = self.logits_head(feats)
        return feats, logits


def images_to_uint8(images: Tensor) -> Tensor:
    """``[-1, 1]`` float images ``(N, C, H, W)`` → uint8 ``(N, 3, H, W)`` in ``0..255`` (rounded;
    1-channel images replicated to RGB), the input Inception feature extractors expect."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1|3, H, W) images, got shape {tuple(images.shape)}")
    u8 = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8


_PATCH_LOCK = threading.Lock()


@contextmanager
def _inject_state_dict(module, state_dict: dict):
    """Make torch-fidelity's constructor use an already (safely) loaded state dict instead of
    fetching and unpickling the weights itself (it loads them with ``weights_only=False``)."""
    with _PATCH_LOCK:
        original = module.load_state_dict_from_url
        module.load_state_dict_from_url = lambda *args, **kwargs: state_dict
        try:
            yield
        finally:
            module.load_state_dict_from_url = original


def _offline_message(cause: BaseException) -> str:
    return (
        "could not fetch the Inception-v3 weights used for FID/IS "
        f"({type(cause).__name__}: {cause}). Without a network, download the FID Inception "
        f"weights {PYTORCH_FID_WEIGHTS_URL} (or the same file as {INCEPTION_WEIGHTS_URL}) "
        "on a machine that has one and pass its path as "
        "eval.inception_weights=PATH (Python: inception_weights=PATH), or put the file in "
        f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}; or leave 'fid' and 'is' out of "
        "eval.metrics."
    )


def _load_inception_state_dict(weights: str | os.PathLike | None) -> dict:
    """Load the Inception state dict without unpickling objects: from ``weights`` (a ``.pth``
    state dict or ``.safetensors`` file), else from torch.hub's cache, downloading it if needed."""
    if weights is not None:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"eval.inception_weights={path!r}: no such file (expected the Inception-v3 FID "
                f"weights from {INCEPTION_WEIGHTS_URL})"
            )
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise RuntimeError(
                f"eval.inception_weights={path!r} is not a loadable tensor state dict "
                f"({type(exc).__name__}: {exc}); expected the file {INCEPTION_WEIGHTS_URL}"
            ) from exc
    try:
        with redirect_stdout(sys.stderr):  # torch.hub announces downloads on stdout
            return torch.hub.load_state_dict_from_url(
                INCEPTION_WEIGHTS_URL, map_location="cpu", check_hash=True, weights_only=True
            )
    except OSError as exc:  # URLError, socket and SSL errors, timeouts
        raise RuntimeError(_offline_message(exc)) from exc


class InceptionFeatureExtractor(FeatureExtractor):
    """The standard FID/IS Inception-v3 (torch-fidelity's ``FeatureExtractorInceptionV3``, the
    network of torchmetrics' FID) as a :class:`FeatureExtractor`.

    Input ``[-1, 1]`` images are rounded to uint8 (grayscale replicated to RGB) and resized by the
    network to 299 px with TensorFlow-1-compatible bilinear interpolation. Returns the 2048-d pool
    features and the 1008-way ``logits_unbiased`` (torch-fidelity's choice for the Inception score).

    Args:
        weights: local path of the weights (``weights-inception-2015-12-05-6726825d.pth`` from
            :data:`INCEPTION_WEIGHTS_URL`, or the same state dict as ``.safetensors``); ``None``
            uses torch.hub's cache or downloads — offline that raises a ``RuntimeError`` saying
            how to provide the file (setting ``eval.inception_weights``).
        feature_layer: torch-fidelity feature name used for FID (``"2048"``, ``"768"``, ``"192"``,
            ``"64"``).
    """

    provides_logits = True

    def __init__(
        self, weights: str | os.PathLike | None = None, feature_layer: str = "2048"
    ) -> None:
        super().__init__()
        if feature_layer not in ("64", "192", "768", "2048"):
            raise ValueError(f"feature_layer must be one of 64/192/768/2048, got {feature_layer!r}")
        state_dict = _load_inception_state_dict(weights)  # first: fails fast when offline
        try:
            import torch_fidelity.feature_extractor_inceptionv3 as fe_module
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise RuntimeError("FID/IS need torch-fidelity: pip install torch-fidelity") from exc
        self.feature_layer = feature_layer
        try:
            with _inject_state_dict(fe_module, state_dict):
                self.net = fe_module.FeatureExtractorInceptionV3(
                    "inception-v3-compat", [feature_layer, "logits_unbiased"]
                )
        except RuntimeError as exc:  # missing / unexpected keys, wrong shapes
            where = (
                "the downloaded file" if weights is None else f"eval.inception_weights={weights}"
            )
            raise RuntimeError(
                f"{where} does not hold the Inception-v3 FID weights ({exc}); expected "
                f"{PYTORCH_FID_WEIGHTS_URL}"
            ) from exc
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        feats, logits = self.net(images_to_uint8(images))
        return feats.float(), logits.float()


def build_inception_feature_extractor(
    inception_weights: str | os.PathLike | None = None,
) -> InceptionFeatureExtractor:
    """The standard Inception-v3 extractor, weights from ``inception_weights`` or fetched by the
    library (see :class:`InceptionFeatureExtractor`)."""
    return InceptionFeatureExtractor(weights=inception_weights)


def _batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterable[Tensor]:
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
    else:
        yield from images


@torch.no_grad()
def compute_fid(
    real: Tensor | Iterable[Tensor],
    fake: Tensor | Iterable[Tensor],
    feature_extractor: FeatureExtractor,
    batch_size: int = 64,
) -> float:
    """FID between two image sets (tensors ``(N, C, H, W)`` in ``[-1, 1]`` or iterables of such
    batches), features streamed through ``feature_extractor`` (on the images' device)."""
    stats = []
    for images in (real, fake):
        s = GaussianStats()
        for batch in _batches(images, batch_size):
            s.update(feature_extractor(batch)[0])
        stats.append(s)
    return frechet_distance(stats[0].mean(), stats[0].cov(), stats[1].mean(), stats[1].cov())


@torch.no_grad()
def compute_inception_score(
    images: Tensor | Iterable[Tensor],
    feature_extractor: FeatureExtractor,
    splits: int = 10,
    batch_size: int = 64,
) -> tuple[float, float]:
    """Inception score ``(mean, std)`` of an image set, from ``feature_extractor``'s logits."""
    logits = []
    for batch in _batches(images, batch_size):
        lg = feature_extractor(batch)[1]
        if lg is None:
            raise ValueError("compute_inception_score: the feature extractor returns no logits")
        logits.append(lg.float().cpu())
    return inception_score_from_logits(torch.cat(logits), splits=splits)


# --------------------------------------------------------------------------------------------------
# Sparsity and feature quality
# --------------------------------------------------------------------------------------------------
def code_density(code: Tensor, tol: float = 0.0) -> float:
    """Fraction of entries of ``code`` (any shape) with ``|c| > tol`` (1 − sparsity)."""
    if code.numel() == 0:
        raise ValueError("code_density: empty code")
    return float((code.detach().abs() > tol).float().mean())


def _labels_1d(y: Tensor | np.ndarray, name: str, n: int) -> Tensor:
    t = torch.as_tensor(y).detach().cpu().reshape(-1).long()
    if t.shape[0] != n:
        raise ValueError(f"{name}: {t.shape[0]} labels for {n} feature rows")
    return t


def nearest_subspace_accuracy(
    train_Z: Tensor,
    train_y: Tensor,
    test_Z: Tensor,
    test_y: Tensor,
    n_components: int,
) -> float:
    """Nearest-subspace classification accuracy of features.

    For each class ``j`` the top-``n_components`` right singular vectors ``U_j`` ``(d, r)`` of its
    (uncentred) training features ``Z_j`` span its principal subspace (``r`` is capped by the class
    size); a test feature ``z`` gets the class with the smallest residual ``‖(I − U_j U_jᵀ) z‖``.

    Args:
        train_Z: ``(n, d)``; train_y: ``(n,)`` int labels; test_Z: ``(m, d)``; test_y: ``(m,)``.
        n_components: subspace dimension, ``1 <= n_components <= d``.

    Returns:
        Accuracy in ``[0, 1]``.
    """
    yte = _labels_1d(test_y, "test_y", test_Z.shape[0])
    pred = nearest_subspace_predict(train_Z, train_y, test_Z, n_components)
    return float((pred == yte).double().mean())


def nearest_subspace_predict(
    train_Z: Tensor, train_y: Tensor, Z: Tensor, n_components: int
) -> Tensor:
    """The class of each row of ``Z`` ``(m, d)`` by nearest subspace (see
    :func:`nearest_subspace_accuracy`): ``(m,)`` labels taken from ``train_y``."""
    tr = train_Z.detach().cpu().double().flatten(1)
    te = Z.detach().cpu().double().flatten(1)
    ytr = _labels_1d(train_y, "train_y", tr.shape[0])
    if tr.shape[1] != te.shape[1]:
        raise ValueError(f"feature dims differ: train {tr.shape[1]}, test {te.shape[1]}")
    if not 1 <= n_components <= tr.shape[1]:
        raise ValueError(f"n_components must be in [1, d={tr.shape[1]}], got {n_components}")
    classes = torch.unique(ytr)
    sq_norm = te.pow(2).sum(dim=1)
    residuals = torch.empty(te.shape[0], classes.numel(), dtype=torch.float64)
    for k, c in enumerate(classes):
        _, _, vh = torch.linalg.svd(tr[ytr == c], full_matrices=False)
        u = vh[:n_components].T  # (d, r)
        residuals[:, k] = sq_norm - (te @ u).pow(2).sum(dim=1)
    return classes[residuals.argmin(dim=1)]


def linear_probe_accuracy(
    train_Z: Tensor,
    train_y: Tensor,
    test_Z: Tensor,
    test_y: Tensor,
    C: float = 1.0,
    max_iter: int = 1000,
) -> float:
    """Test accuracy of a multinomial logistic regression fitted on the training features.

    scikit-learn's ``LogisticRegression`` (L-BFGS, deterministic) with inverse regularisation
    strength ``C``. Features ``(n, d)`` / ``(m, d)``, labels ``(n,)`` / ``(m,)``; returns
    ``[0, 1]``.
    """
    from sklearn.linear_model import LogisticRegression

    tr = train_Z.detach().cpu().double().flatten(1).numpy()
    te = test_Z.detach().cpu().double().flatten(1).numpy()
    ytr = _labels_1d(train_y, "train_y", tr.shape[0]).numpy()
    yte = _labels_1d(test_y, "test_y", te.shape[0]).numpy()
    if np.unique(ytr).size < 2:
        raise ValueError("linear_probe_accuracy: the training labels hold a single class")
    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit(tr, ytr)  # a ConvergenceWarning, if any, reaches the caller
    return float((clf.predict(te) == yte).mean())
