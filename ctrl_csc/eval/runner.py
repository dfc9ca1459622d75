"""Evaluate an encoder/decoder pair on the reconstructions ``X̂ = g(f(X))`` of a data loader.

:func:`evaluate_reconstructions` makes one pass over the loader (no image is kept beyond a small
sample for the reconstruction grid) and returns an :class:`EvaluationResult`: the metrics as floats
plus that sample and the features/labels of the evaluated images (for the feature-subspace plot).
It is the one evaluation path: ``ctrl-csc-eval`` and the trainer's held-out evaluation
(:meth:`ctrl_csc.engine.Trainer.evaluate`) both call it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ctrl_csc.eval.dictionary import DictionaryProbe
from ctrl_csc.eval.metrics import (
    FeatureExtractor,
    GaussianStats,
    NetworkFeatureExtractor,
    build_inception_feature_extractor,
    frechet_distance,
    inception_score_from_logits,
    linear_probe_accuracy,
    nearest_subspace_accuracy,
    psnr,
    ssim,
)
from ctrl_csc.models import code_densities

__all__ = ["ALL_METRICS", "EvaluationResult", "evaluate_reconstructions"]

log = logging.getLogger(__name__)

#: Metric names accepted by :func:`evaluate_reconstructions` (setting ``eval.metrics``).
ALL_METRICS = (
    "psnr",
    "ssim",
    "fid",
    "is",
    "density",
    "dictionary",
    "nearest_subspace",
    "linear_probe",
)


@dataclass
class EvaluationResult:
    """What :func:`evaluate_reconstructions` returns.

    Attributes:
        metrics: name → float. Keys (those requested): ``psnr`` and ``ssim`` (means over images),
            ``psnr_mean_image`` (with ``mean_image``), ``fid``, ``is`` and ``is_std``,
            ``density/enc{i}`` and ``density/dec{i}`` (fraction of non-zero code entries of stage
            ``i``, mean over images), ``dictionary/enc{i}/moved``,
            ``…/residual`` and ``…/residual_init`` (CSC stage ``i``'s dictionary: see
            :mod:`ctrl_csc.eval.dictionary`), ``nearest_subspace`` and ``linear_probe``
            (accuracies in ``[0, 1]``), and always ``num_images``.
        inputs: the first ``num_samples`` inputs ``(n, C, H, W)`` on the CPU, in ``[-1, 1]``.
        reconstructions: their reconstructions, same shape, clamped to ``[-1, 1]``.
        features: ``(N, d)`` encoder features of all evaluated images (CPU, float32).
        labels: ``(N,)`` their labels, or ``None`` when the loader yields none.
        probe: ``(features, labels)`` of the probe images the accuracies were fitted on (CPU,
            float32), when they were computed: what generation fits its class models on, so the
            probe images are encoded once.
    """

    metrics: dict[str, float]
    inputs: Tensor
    reconstructions: Tensor
    features: Tensor | None = None
    labels: Tensor | None = None
    probe: tuple[Tensor, Tensor] | None = None


def _split_batch(batch) -> tuple[Tensor, Tensor | None]:
    """A loader item → ``(images, labels | None)``: a tensor, or ``(images, labels, …)``."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, tuple | list) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 else None
        if y is not None and not isinstance(y, Tensor):
            try:
                y = torch.as_tensor(y)
            except (TypeError, ValueError):
                y = None
        if y is not None and (y.dim() != 1 or y.dtype.is_floating_point or y.is_complex()):
            y = None  # not class labels (e.g. targets of another kind)
        return batch[0], y
    raise ValueError(
        f"evaluation loader yields {type(batch).__name__}; expected images (N, C, H, W) or "
        "(images, labels) pairs"
    )


def _progress(iterable: Iterable, enabled: bool, desc: str, total: int | None = None):
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        disable=not (enabled and sys.stderr.isatty()),
        leave=False,
        dynamic_ncols=True,
    )


def _forward(model: nn.Module, t: Tensor, codes: bool) -> tuple[Tensor, list[float | None] | None]:
    """``model(t)`` and, when ``codes``, the densities of the codes it returns with
    ``forward_with_codes`` (``None`` for a model without that method)."""
    fn = getattr(model, "forward_with_codes", None) if codes else None
    if not callable(fn):
        return model(t), None
    out, stage_codes = fn(t)
    return out, code_densities(stage_codes)


def density_names(encoder: nn.Module, decoder: nn.Module) -> list[str] | None:
    """The ``density/enc{i}`` and ``density/dec{i}`` keys that the metric ``density`` gives for
    these models, without running them; ``None`` when a model returns codes but does not say
    which of its stages' outputs are codes (only this package's models do)."""
    names = []
    for tag, model in (("enc", encoder), ("dec", decoder)):
        if not callable(getattr(model, "forward_with_codes", None)):
            continue
        is_code = getattr(model, "_is_code", None)
        if not callable(is_code):
            return None
        names += [f"density/{tag}{i}" for i, code in enumerate(is_code()) if code]
    return names


def _loader_len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


@torch.no_grad()
def _probe_features(encoder: nn.Module, loader, device, num_images: int | None, progress: bool):
    feats, labels = [], []
    seen = 0
    for batch in _progress(loader, progress, "probe features", _loader_len(loader)):
        x, y = _split_batch(batch)
        if y is None:
            return None, None
        if num_images is not None:
            x, y = x[: num_images - seen], y[: num_images - seen]
        feats.append(encoder(x.to(device, torch.float32)).float().cpu())
        labels.append(y.cpu().long())
        seen += x.shape[0]
        if num_images is not None and seen >= num_images:
            break
    if not feats:
        return None, None
    return torch.cat(feats), torch.cat(labels)


def _accuracy_inputs(feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    keep = labels >= 0  # negative labels mark unlabelled images (e.g. STL-10's unlabeled split)
    return feats[keep], labels[keep]


def evaluate_reconstructions(
    encoder: nn.Module,
    decoder: nn.Module,
    loader: Iterable,
    metrics: Sequence[str] = ALL_METRICS,
    num_images: int | None = None,
    feature_extractor: FeatureExtractor | nn.Module | None = None,
    inception_weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    probe_loader: Iterable | None = None,
    probe_num_images: int | None = None,
    subspace_components: int = 10,
    is_splits: int = 10,
    num_samples: int = 64,
    progress: bool = True,
    initial_encoder: nn.Module | None = None,
    autocast: Callable[[], AbstractContextManager] | None = None,
    mean_image: Tensor | None = None,
) -> EvaluationResult:
    """Measure ``X̂ = g(f(X))`` over ``loader`` (CTRL protocol: FID/IS of X̂ against the same X).

    Runs in eval mode under ``torch.no_grad`` (the models' train/eval modes are restored after) on
    at most ``num_images`` images. Reconstructions are clamped to ``[-1, 1]`` before any metric.
    PSNR/SSIM are averaged over images; FID features of X and X̂ are accumulated as streaming
    float64 mean/covariance and the logits of X̂ kept for IS — images themselves are not kept.
    Code densities are those of the codes ``encoder.forward_with_codes`` /
    ``decoder.forward_with_codes`` return (:func:`ctrl_csc.models.code_densities`), averaged over
    images; a stage whose output is not a code, or a model without that method, reports none.
    Feature accuracies fit on the features of ``probe_loader`` (e.g. the training split, at most
    ``probe_num_images`` images) and test on those of ``loader``; they are skipped with a warning
    when either has no labels, no probe loader is given, or the probe set has fewer than 2 classes.
    Dictionary metrics (``dictionary``) hook the encoder's CSC stages during the same pass: each
    stage's relative residual ``sqrt(Σ‖u − D z‖² / Σ‖u‖²)`` over the evaluated images, and with
    ``initial_encoder`` the distance moved from the initial dictionary and the residual of the
    initial dictionary on the same stage inputs; an encoder without CSC stages gets none.

    Args:
        encoder: ``(N, C, H, W)`` in ``[-1, 1]`` → ``(N, d)``; decoder: ``(N, d)`` → images.
        loader: yields images or ``(images, labels)``.
        metrics: subset of :data:`ALL_METRICS` (setting ``eval.metrics``).
        feature_extractor: network for FID/IS (a :class:`FeatureExtractor`, or a module mapping
            images to features, wrapped in :class:`NetworkFeatureExtractor`); ``None`` builds the
            standard Inception-v3 from ``inception_weights`` (``eval.inception_weights``) or
            torch.hub's cache/download — offline without either that raises a ``RuntimeError``.
        device: where to run; ``None`` keeps the encoder's device. Given, both models (and the
            feature extractor) are moved there.
        subspace_components: subspace dimension of the nearest-subspace classifier (capped at d).
        is_splits: number of splits of the Inception score (capped at the number of images).
        num_samples: how many inputs/reconstructions to return for the grid.
        progress: show a tqdm bar (only when stderr is a terminal).
        initial_encoder: the encoder at initialisation (same architecture), for the ``moved`` and
            ``residual_init`` dictionary metrics; ``None`` measures ``residual`` only.
        autocast: a factory of the context the two models run in (e.g. the trainer's mixed
            precision); ``None`` runs them as they are. Reconstructions are cast to float32.
        mean_image: ``(1, C, H, W)``, a trivial reconstruction (e.g. the training set's mean
            image): its mean PSNR against the evaluated images is ``psnr_mean_image``.

    Returns:
        :class:`EvaluationResult` (``.metrics`` holds the floats).
    """
    wanted = list(dict.fromkeys(metrics))
    unknown = [m for m in wanted if m not in ALL_METRICS]
    if unknown:
        raise ValueError(
            f"eval.metrics: unknown metric(s) {unknown}; choose from {list(ALL_METRICS)}"
        )
    if num_images is not None and num_images < 1:
        raise ValueError(f"eval.num_images must be >= 1 or None, got {num_images}")

    if device is None:
        p = next(encoder.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    else:
        device = torch.device(device)
        encoder.to(device)
        decoder.to(device)

    need_fe = "fid" in wanted or "is" in wanted
    fe: FeatureExtractor | None = None
    if need_fe:
        if feature_extractor is None:
            fe = build_inception_feature_extractor(inception_weights)
        elif isinstance(feature_extractor, FeatureExtractor):
            fe = feature_extractor
        else:
            fe = NetworkFeatureExtractor(feature_extractor)
        fe = fe.to(device).eval()
        if "is" in wanted and not fe.provides_logits:
            log.warning("metric 'is' skipped: the feature extractor provides no logits")
            wanted.remove("is")

    probe = None
    if "dictionary" in wanted:
        probe = DictionaryProbe(encoder, initial_encoder)
        if not probe:
            log.info("metric 'dictionary' skipped: the encoder has no CSC stages")
            probe = None

    modes = (encoder.training, decoder.training)
    encoder.eval()
    decoder.eval()
    try:
        with probe if probe is not None else nullcontext():  # hooks only for this pass
            result = _run(
                encoder,
                decoder,
                loader,
                wanted,
                num_images,
                fe,
                device,
                num_samples,
                is_splits,
                progress,
                probe,
                autocast or nullcontext,
                mean_image,
            )
        if "nearest_subspace" in wanted or "linear_probe" in wanted:
            _feature_accuracies(
                result,
                encoder,
                wanted,
                probe_loader,
                probe_num_images,
                device,
                subspace_components,
                progress,
            )
    finally:
        encoder.train(modes[0])
        decoder.train(modes[1])
    return result


@torch.no_grad()
def _run(
    encoder,
    decoder,
    loader,
    wanted,
    num_images,
    fe,
    device,
    num_samples,
    is_splits,
    progress,
    probe=None,
    autocast=nullcontext,
    mean_image=None,
):
    n_seen = 0
    p = next(encoder.parameters(), None)
    model_dtype = torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32
    sums = {"psnr": 0.0, "ssim": 0.0, "psnr_mean_image": 0.0}
    dens_sum: dict[str, float] = {}
    dens_count: dict[str, int] = {}
    stats_real, stats_fake = GaussianStats(), GaussianStats()
    logits: list[Tensor] = []
    feats: list[Tensor] = []
    labels: list[Tensor] | None = []
    sample_x: list[Tensor] = []
    sample_xh: list[Tensor] = []
    n_sample = 0
    total = _loader_len(loader)
    if num_images is not None and total is not None:
        bs = getattr(loader, "batch_size", None)
        total = min(total, math.ceil(num_images / bs)) if bs else total
    warned_density = False

    for batch in _progress(loader, progress, "evaluate", total):
        x, y = _split_batch(batch)
        if num_images is not None:
            x = x[: num_images - n_seen]
            y = None if y is None else y[: num_images - n_seen]
        if x.shape[0] == 0:
            break
        x = x.to(device, torch.float32)
        codes = "density" in wanted
        try:
            with autocast():
                z, enc_dens = _forward(encoder, x.to(model_dtype), codes)
                xh, dec_dens = _forward(decoder, z, codes)
            xh = xh.float().clamp(-1, 1)
        except RuntimeError as exc:  # shape errors from deep inside torch
            raise ValueError(
                f"the model failed on images of shape {tuple(x.shape)} ({exc}); check that "
                "dataset.image_size and dataset.channels match the model's"
            ) from exc
        if xh.shape != x.shape:
            raise ValueError(
                f"decoder output {tuple(xh.shape)} does not match the input {tuple(x.shape)}: "
                "the model's image_size/channels differ from the dataset's"
            )
        b = x.shape[0]
        if "psnr" in wanted:
            sums["psnr"] += float(psnr(x, xh).double().sum())
        if mean_image is not None:
            base = mean_image.to(x.device).expand_as(x)
            sums["psnr_mean_image"] += float(psnr(x, base).double().sum())
        if "ssim" in wanted:
            sums["ssim"] += float(ssim(x, xh).double().sum())
        if codes:
            found = False
            for tag, dens in (("enc", enc_dens), ("dec", dec_dens)):
                if dens is None:
                    continue
                found = True
                for i, d in enumerate(dens):
                    if d is not None and math.isfinite(d):
                        key = f"density/{tag}{i}"
                        dens_sum[key] = dens_sum.get(key, 0.0) + d * b
                        dens_count[key] = dens_count.get(key, 0) + b
            if not found and not warned_density:
                log.warning("metric 'density' skipped: the models have no forward_with_codes()")
                warned_density = True
        if fe is not None:
            f_fake, lg = fe(xh)
            if "fid" in wanted:
                stats_real.update(fe(x)[0])
                stats_fake.update(f_fake)
            if "is" in wanted:
                logits.append(lg.float().cpu())
        feats.append(z.detach().float().flatten(1).cpu())
        if labels is not None:
            labels = None if y is None else [*labels, y.cpu().long()]
        if n_sample < num_samples:
            take = min(num_samples - n_sample, b)
            sample_x.append(x[:take].cpu())
            sample_xh.append(xh[:take].cpu())
            n_sample += take
        n_seen += b
        if num_images is not None and n_seen >= num_images:
            break

    if n_seen == 0:
        raise ValueError("evaluation loader yielded no images (check the dataset split and path)")
    out: dict[str, float] = {}
    if "psnr" in wanted:
        out["psnr"] = sums["psnr"] / n_seen
    if mean_image is not None:
        out["psnr_mean_image"] = sums["psnr_mean_image"] / n_seen
    if "ssim" in wanted:
        out["ssim"] = sums["ssim"] / n_seen
    if "fid" in wanted:
        if n_seen < 2:
            log.warning("metric 'fid' skipped: needs at least 2 images, got %d", n_seen)
        else:
            out["fid"] = frechet_distance(
                stats_real.mean(), stats_real.cov(), stats_fake.mean(), stats_fake.cov()
            )
    if logits:
        lg = torch.cat(logits)
        out["is"], out["is_std"] = inception_score_from_logits(lg, max(1, min(is_splits, len(lg))))
    for key in dens_sum:  # insertion order: enc0, enc1, …, dec0, …
        out[key] = dens_sum[key] / dens_count[key]
    if probe is not None:
        out.update(probe.metrics())
    out["num_images"] = float(n_seen)
    return EvaluationResult(
        metrics=out,
        inputs=torch.cat(sample_x),
        reconstructions=torch.cat(sample_xh),
        features=torch.cat(feats),
        labels=None if not labels else torch.cat(labels),
    )


def _feature_accuracies(
    result, encoder, wanted, probe_loader, probe_num_images, device, n_components, progress
):
    names = [m for m in ("nearest_subspace", "linear_probe") if m in wanted]
    if result.labels is None:
        log.warning("%s skipped: the evaluation data has no labels", ", ".join(names))
        return
    if probe_loader is None:
        log.warning(
            "%s skipped: no probe_loader (labelled training split) given to fit them",
            ", ".join(names),
        )
        return
    tr_z, tr_y = _probe_features(encoder, probe_loader, device, probe_num_images, progress)
    if tr_z is None:
        log.warning("%s skipped: the probe data has no labels", ", ".join(names))
        return
    result.probe = (tr_z, tr_y)
    tr_z, tr_y = _accuracy_inputs(tr_z, tr_y)
    te_z, te_y = _accuracy_inputs(result.features, result.labels)
    if torch.unique(tr_y).numel() < 2 or te_y.numel() == 0:
        log.warning(
            "%s skipped: need >= 2 labelled classes in the probe data and labelled "
            "evaluation images",
            ", ".join(names),
        )
        return
    if "nearest_subspace" in wanted:
        k = min(n_components, tr_z.shape[1])
        result.metrics["nearest_subspace"] = nearest_subspace_accuracy(tr_z, tr_y, te_z, te_y, k)
    if "linear_probe" in wanted:
        result.metrics["linear_probe"] = linear_probe_accuracy(tr_z, tr_y, te_z, te_y)
