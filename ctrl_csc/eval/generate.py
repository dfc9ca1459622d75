"""Generation from the learned representation: decode features that did not come from an image.

From the features ``Z = f(X)`` of training images, each class ``j`` (one class when the data has
no labels) is modelled by its mean ``μ_j`` and its top ``k`` principal directions ``u_{j,1..k}``
(right singular vectors of the centred features) with their variances ``σ²_{j,i} = s_i²/(n_j−1)``
(:func:`fit_class_models`). Then

* **samples** (:func:`sample_features`): ``z = μ_j + Σ_i σ_{j,i} ε_i u_{j,i}``, ``ε ~ N(0, I)``;
* **traversals** (:func:`traversal_features`): ``z = μ_j + t σ_{j,i} u_{j,i}`` for ``t`` from
  ``−span`` to ``span``, one row per direction (the CTRL reference code's
  ``plot_linear_gen_on_images`` walks ``t`` from 0 to a range);
* **interpolations** (:func:`interpolate_features`): between the features of two images, along
  the great circle (spherical interpolation) when the features live on the unit sphere;

each projected back to the unit sphere when the encoder normalises its features
(``encoder.normalize``), and decoded by ``g``. Features that are not on a sphere (the conv
autoencoders') are used as they are, and interpolated along the chord.

**Class consistency** (:func:`class_consistency`): re-encode each decoded image and classify its
feature by the nearest class subspace fitted on real training features
(:func:`~ctrl_csc.eval.metrics.nearest_subspace_predict`); the fraction that lands in the class
it was generated from. :func:`generation_report` gives it for samples, for the real held-out
images themselves (the encoder's own accuracy: what no decoded image can exceed on average), for
their reconstructions (what the decoder keeps of it) and for decoded random features (the floor:
uniform on the sphere, or Gaussian with the features' per-coordinate mean and spread; each with a
random class).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ctrl_csc.eval.metrics import nearest_subspace_accuracy

__all__ = [
    "ClassModel",
    "collect_images",
    "encode_loader",
    "GenerationReport",
    "class_consistency",
    "fit_class_models",
    "generation_report",
    "interpolate_features",
    "sample_features",
    "traversal_features",
]


@dataclass
class ClassModel:
    """A class's features: ``mean`` ``(d,)``, ``directions`` ``(k, d)`` (orthonormal rows, the
    top principal directions of the centred features, largest variance first) and their
    ``variances`` ``(k,)``; ``count`` features were fitted."""

    label: int
    mean: Tensor
    directions: Tensor
    variances: Tensor
    count: int


def _on_sphere(z: Tensor, sphere: bool) -> Tensor:
    return torch.nn.functional.normalize(z, dim=-1) if sphere else z


def fit_class_models(
    features: Tensor, labels: Tensor | None = None, n_components: int = 8
) -> list[ClassModel]:
    """Per class (sorted labels; one class ``0`` when ``labels`` is ``None``): mean and top
    ``n_components`` principal directions of ``features`` ``(n, d)`` (float64 SVD of the centred
    features; fewer directions for a class with fewer than ``n_components + 1`` features)."""
    z = features.detach().cpu().double().flatten(1)
    y = torch.zeros(len(z), dtype=torch.long) if labels is None else labels.detach().cpu().long()
    if y.shape != (len(z),):
        raise ValueError(f"labels must be ({len(z)},), got {tuple(y.shape)}")
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    models = []
    for c in torch.unique(y).tolist():
        zc = z[y == c]
        if len(zc) < 2:
            continue  # no spread to fit
        mean = zc.mean(0)
        _, s, vh = torch.linalg.svd(zc - mean, full_matrices=False)
        k = min(n_components, len(zc) - 1, vh.shape[0])
        models.append(ClassModel(int(c), mean, vh[:k], s[:k] ** 2 / (len(zc) - 1), len(zc)))
    if not models:
        raise ValueError("no class has at least 2 features to fit")
    return models


def sample_features(
    models: list[ClassModel], per_class: int, sphere: bool, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``per_class`` Gaussian samples on each class's top directions: ``(features, labels)``."""
    feats, labels = [], []
    for m in models:
        eps = torch.randn(per_class, len(m.variances), generator=generator, dtype=torch.float64)
        feats.append(m.mean + (eps * m.variances.sqrt()) @ m.directions)
        labels.append(torch.full((per_class,), m.label))
    return _on_sphere(torch.cat(feats), sphere), torch.cat(labels)


def traversal_features(
    model: ClassModel, n_directions: int, steps: int, span: float, sphere: bool
) -> Tensor:
    """``(n_directions·steps, d)``: from the class mean along each of its top ``n_directions``
    directions, ``t σ_i u_i`` for ``steps`` values of ``t`` in ``[−span, span]`` (row-major: one
    direction after the other)."""
    k = min(n_directions, len(model.variances))
    t = torch.linspace(-span, span, steps, dtype=torch.float64)
    walk = t[None, :, None] * (
        model.variances[:k].sqrt()[:, None, None] * model.directions[:k, None]
    )
    return _on_sphere((model.mean + walk).reshape(k * steps, -1), sphere)


def interpolate_features(z0: Tensor, z1: Tensor, steps: int, sphere: bool) -> Tensor:
    """``(n, steps, d)`` from each ``z0[i]`` to ``z1[i]`` (``(n, d)``): along the great circle
    through them when ``sphere`` (spherical linear interpolation of the unit vectors), else
    along the chord."""
    t = torch.linspace(0, 1, steps, dtype=torch.float64)[None, :, None]
    a, b = z0.double()[:, None], z1.double()[:, None]
    if not sphere:
        return a + t * (b - a)
    a, b = _on_sphere(a, True), _on_sphere(b, True)
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    near = sin.abs() < 1e-6  # (anti)parallel: the chord, renormalised
    safe = torch.where(near, torch.ones_like(sin), sin)
    w0 = torch.where(near, 1 - t, torch.sin((1 - t) * omega) / safe)
    w1 = torch.where(near, t, torch.sin(t * omega) / safe)
    return _on_sphere(w0 * a + w1 * b, True)


@torch.no_grad()
def _decode(decoder: nn.Module, z: Tensor, device, batch_size: int = 256) -> Tensor:
    p = next(decoder.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    out = [decoder(z[i : i + batch_size].to(device, dtype)).float().clamp(-1, 1).cpu()
           for i in range(0, len(z), batch_size)]  # fmt: skip
    return torch.cat(out)


@torch.no_grad()
def _encode(encoder: nn.Module, x: Tensor, device, batch_size: int = 256) -> Tensor:
    p = next(encoder.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    out = [encoder(x[i : i + batch_size].to(device, dtype)).double().cpu()
           for i in range(0, len(x), batch_size)]  # fmt: skip
    return torch.cat(out)


def _first_images(loader, num_images: int | None, progress: bool = False, desc: str = "read"):
    """``(images, labels or None)`` batches of ``loader`` up to ``num_images`` in all."""
    from ctrl_csc.eval.runner import _loader_len, _progress, _split_batch

    seen = 0
    for batch in _progress(loader, progress, desc, _loader_len(loader)):
        x, y = _split_batch(batch)
        if num_images is not None:
            x = x[: num_images - seen]
            y = None if y is None else y[: num_images - seen]
        if len(x) == 0:
            break
        yield x, y
        seen += len(x)
        if num_images is not None and seen >= num_images:
            break


def _joined(parts: list[Tensor], labels: list[Tensor | None]) -> tuple[Tensor, Tensor | None]:
    if not parts:
        raise ValueError("the loader yielded no images")
    y = None if any(t is None for t in labels) else torch.cat([t.cpu().long() for t in labels])
    return torch.cat(parts), y


@torch.no_grad()
def encode_loader(
    encoder: nn.Module, loader, device, num_images: int | None = None, progress: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``(features (n, d) float64, labels (n,) or None)`` of the first ``num_images`` of
    ``loader``, streamed (a progress bar on a terminal with ``progress``)."""
    feats, labels = [], []
    for x, y in _first_images(loader, num_images, progress, "encode"):
        feats.append(_encode(encoder, x, device))
        labels.append(y)
    return _joined(feats, labels)


def collect_images(loader, num_images: int | None = None) -> tuple[Tensor, Tensor | None]:
    """``(images (n, C, H, W) on the CPU, labels (n,) or None)``: the first ``num_images``."""
    images, labels = [], []
    for x, y in _first_images(loader, num_images):
        images.append(x.float().cpu())
        labels.append(y)
    return _joined(images, labels)


def class_consistency(
    encoder: nn.Module,
    images: Tensor,
    labels: Tensor,
    train_features: Tensor,
    train_labels: Tensor,
    n_components: int,
    device: torch.device | str = "cpu",
) -> float:
    """The fraction of ``images`` whose re-encoded feature is nearest to the subspace of the
    class in ``labels`` (subspaces: top ``n_components`` singular vectors of each class's
    ``train_features``, as :func:`~ctrl_csc.eval.metrics.nearest_subspace_accuracy`)."""
    z = _encode(encoder, images, device)
    return nearest_subspace_accuracy(train_features, train_labels, z, labels, n_components)


@dataclass
class GenerationReport:
    """What :func:`generation_report` returns: ``metrics`` (``consistency/samples``,
    ``consistency/real``, ``consistency/reconstructions``, ``consistency/random``), the decoded
    ``samples`` with their ``sample_labels``, ``traversals``
    ``(classes, directions·steps, C, H, W)`` and ``interpolations`` ``(pairs, steps, C, H, W)``
    (CPU, ``[-1, 1]``) with each pair's two labels ``pair_labels`` (``None`` without test
    labels) and the fitted class ``models``."""

    metrics: dict[str, float]
    samples: Tensor
    sample_labels: Tensor
    traversals: Tensor
    interpolations: Tensor
    models: list[ClassModel]
    pair_labels: list[tuple[int, int]] | None = None
    sample_pool: Tensor | None = None  # every decoded sample (at least 64 per class), for FID/IS


def generation_report(
    encoder: nn.Module,
    decoder: nn.Module,
    train_features: Tensor,
    train_labels: Tensor | None,
    test_images: Tensor,
    test_labels: Tensor | None = None,
    n_components: int = 8,
    per_class: int = 8,
    directions: int = 4,
    steps: int = 8,
    span: float = 2.0,
    pairs: int = 8,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> GenerationReport:
    """Fit :func:`fit_class_models` on ``train_features`` and decode samples (``per_class``
    each; the consistency uses ``max(per_class, 64)`` per class), traversals (``directions`` ×
    ``steps`` per class, ``t ∈ [−span, span]``) and interpolations (``pairs`` pairs of
    ``test_images``, ``steps`` each); measure their class consistency.

    Without labels everything is one class and the consistency measures are 1 by definition
    (they are left out). ``seed`` makes the samples, random points and pairs reproducible.
    """
    encoder.eval()
    decoder.eval()
    sphere = bool(getattr(encoder, "normalize", False))
    gen = torch.Generator().manual_seed(seed)
    models = fit_class_models(train_features, train_labels, n_components)
    z_s, y_s = sample_features(models, max(per_class, 64), sphere, gen)
    x_s = _decode(decoder, z_s, device)
    walks = [traversal_features(m, directions, steps, span, sphere) for m in models]
    k = min(len(w) for w in walks)
    traversals = torch.stack([_decode(decoder, w[:k], device) for w in walks])
    n = min(pairs, len(test_images) // 2)
    order = torch.randperm(len(test_images), generator=gen)[: 2 * n]
    z_t = _encode(encoder, test_images[order], device)
    path = interpolate_features(z_t[:n], z_t[n:], steps, sphere)
    interpolations = _decode(decoder, path.flatten(0, 1), device).unflatten(0, (n, steps))
    metrics: dict[str, float] = {}
    if train_labels is not None and len(models) > 1:
        fitted = (train_features, train_labels, n_components, device)
        metrics["consistency/samples"] = class_consistency(encoder, x_s, y_s, *fitted)
        if test_labels is not None:
            z_real = _encode(encoder, test_images, device)
            metrics["consistency/real"] = nearest_subspace_accuracy(
                train_features, train_labels, z_real, test_labels, n_components
            )
            x_r = _decode(decoder, z_real, device)
            metrics["consistency/reconstructions"] = class_consistency(
                encoder, x_r, test_labels, *fitted
            )
        z_rand = torch.randn(len(z_s), z_s.shape[1], generator=gen, dtype=torch.float64)
        if not sphere:
            tf = train_features.double().flatten(1)
            z_rand = tf.mean(0) + z_rand * tf.std(0)
        classes = torch.tensor([m.label for m in models])
        y_rand = classes[torch.randint(len(classes), (len(z_s),), generator=gen)]
        x_rand = _decode(decoder, _on_sphere(z_rand, sphere), device)
        metrics["consistency/random"] = class_consistency(encoder, x_rand, y_rand, *fitted)
    keep = torch.cat([torch.nonzero(y_s == m.label)[:per_class, 0] for m in models])
    pair_labels = None
    if test_labels is not None:
        y_t = test_labels.cpu().long()[order]
        pair_labels = list(zip(y_t[:n].tolist(), y_t[n:].tolist(), strict=True))
    return GenerationReport(
        metrics, x_s[keep], y_s[keep], traversals, interpolations, models, pair_labels, x_s
    )
