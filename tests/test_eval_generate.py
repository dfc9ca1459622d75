"""Generation from fitted class models (ctrl_csc.eval.generate), against numpy's SVD and synthetic
players whose answers are known."""

import numpy as np
import pytest
import torch
from torch import nn

from ctrl_csc.eval.generate import (
    class_consistency,
    fit_class_models,
    generation_report,
    interpolate_features,
    sample_features,
    traversal_features,
)

D, K = 6, 3


def clustered(n_per_class=40, seed=0):
    """Features of ``K`` classes, each on its own 2-d subspace of the unit sphere in ``D``
    dimensions (orthogonal across classes): a perfectly separable case."""
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(K * n_per_class, D, dtype=torch.float64)
    for c in range(K):
        z[c * n_per_class : (c + 1) * n_per_class, 2 * c : 2 * c + 2] = torch.randn(
            n_per_class, 2, generator=g, dtype=torch.float64
        ) + torch.tensor([3.0, 0.0], dtype=torch.float64)
    y = torch.arange(K).repeat_interleave(n_per_class)
    return nn.functional.normalize(z, dim=1), y


class Identity(nn.Module):
    """Encoder and decoder in one: an "image" is its feature (``(N, D, 1, 1)``)."""

    def __init__(self, normalize=True):
        super().__init__()
        self.normalize = normalize
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, t):
        if t.dim() == 4:  # encode
            z = t.flatten(1) * self.scale
            return nn.functional.normalize(z, dim=1) if self.normalize else z
        return t[:, :, None, None] * self.scale  # decode


def test_class_models_are_numpys_svd_of_the_centred_features():
    z, y = clustered()
    models = fit_class_models(z, y, n_components=2)
    assert [m.label for m in models] == [0, 1, 2]
    for m in models:
        zc = z[y == m.label].numpy()
        mean = zc.mean(0)
        _, s, vt = np.linalg.svd(zc - mean, full_matrices=False)
        np.testing.assert_allclose(m.mean.numpy(), mean, rtol=0, atol=1e-12)
        np.testing.assert_allclose(m.variances.numpy(), s[:2] ** 2 / (len(zc) - 1), rtol=1e-10)
        for u, v in zip(m.directions.numpy(), vt[:2], strict=True):  # up to sign
            assert abs(abs(float(u @ v)) - 1) < 1e-10
    one = fit_class_models(z, None, n_components=3)  # no labels: one class
    assert len(one) == 1 and one[0].count == len(z)


def test_samples_and_traversals_stay_in_their_class_subspace():
    z, y = clustered()
    models = fit_class_models(z, y, n_components=2)
    samples, labels = sample_features(
        models, 50, sphere=True, generator=torch.Generator().manual_seed(1)
    )
    assert torch.allclose(samples.norm(dim=1), torch.ones(len(samples), dtype=torch.float64))
    for c in range(K):  # class c's samples have no energy outside its coordinates 2c, 2c+1
        own = samples[labels == c]
        outside = own.clone()
        outside[:, 2 * c : 2 * c + 2] = 0
        assert outside.abs().max() < 1e-12
    walk = traversal_features(models[1], n_directions=2, steps=5, span=2.0, sphere=False)
    assert walk.shape == (10, D)
    torch.testing.assert_close(walk[2], models[1].mean)  # t = 0 is the mean
    step = walk[1] - walk[0]
    assert abs(float(step.norm()) - float(models[1].variances[0].sqrt())) < 1e-12  # 1σ per step


def test_spherical_interpolation_follows_the_great_circle():
    g = torch.Generator().manual_seed(0)
    a = nn.functional.normalize(torch.randn(4, D, generator=g, dtype=torch.float64), dim=1)
    b = nn.functional.normalize(torch.randn(4, D, generator=g, dtype=torch.float64), dim=1)
    path = interpolate_features(a, b, 7, sphere=True)
    torch.testing.assert_close(path[:, 0], a)
    torch.testing.assert_close(path[:, -1], b)
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(4, 7, dtype=torch.float64))
    angles = torch.arccos((path[:, 1:] * path[:, :-1]).sum(-1).clamp(-1, 1))  # equal arcs
    torch.testing.assert_close(angles, angles[:, :1].expand_as(angles))
    chord = interpolate_features(a, b, 3, sphere=False)
    torch.testing.assert_close(chord[:, 1], (a + b) / 2)


def test_consistency_is_one_when_separable_and_chance_for_random_labels():
    z, y = clustered(60)
    f = Identity()
    images = z[:, :, None, None]
    assert class_consistency(f, images, y, z, y, n_components=2) == 1.0
    g = torch.Generator().manual_seed(3)
    random_labels = torch.randint(0, K, (len(y),), generator=g)
    chance = class_consistency(f, images, random_labels, z, y, n_components=2)
    assert abs(chance - 1 / K) < 0.12


@pytest.mark.parametrize("sphere", [True, False])
def test_report_of_an_identity_autoencoder(sphere):
    """Samples of the identity decoder are their class (consistency 1), reconstructions too,
    random points are at chance."""
    z, y = clustered(80)
    player = Identity(normalize=sphere)
    report = generation_report(
        player, player, z, y, z[:, :, None, None], y, n_components=2, per_class=5,
        directions=2, steps=4,
    )  # fmt: skip
    assert report.metrics["consistency/samples"] == 1.0
    assert report.metrics["consistency/reconstructions"] == 1.0
    assert report.metrics["consistency/real"] == 1.0
    assert report.metrics["consistency/random"] < 0.6
    assert report.samples.shape == (K * 5, D, 1, 1)
    assert report.traversals.shape == (K, 2 * 4, D, 1, 1)
    assert report.interpolations.shape == (8, 4, D, 1, 1) and len(report.pair_labels) == 8


def test_real_consistency_is_the_accuracy_of_the_held_out_features():
    """``consistency/real`` classifies the held-out images' own features: on separable classes
    with a third of the test labels made wrong, exactly the other two thirds are right."""
    z, y = clustered(60)
    z_t, y_t = clustered(30, seed=1)
    y_t = y_t.clone()
    y_t[::3] = (y_t[::3] + 1) % K
    player = Identity()
    report = generation_report(player, player, z, y, z_t[:, :, None, None], y_t, n_components=2)
    assert report.metrics["consistency/real"] == pytest.approx(2 / 3, abs=1e-12)


def test_the_eval_command_writes_each_picture_and_the_measures(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from ctrl_csc.cli import evaluate as eval_cli
    from ctrl_csc.cli.common import config_dir
    from ctrl_csc.eval import NetworkFeatureExtractor, compute_fid

    torch.manual_seed(0)
    stand_in = NetworkFeatureExtractor(nn.Conv2d(1, 4, 8, 8), nn.Linear(64, 5))  # not Inception
    from ctrl_csc.eval import runner

    for module in (eval_cli, runner):
        monkeypatch.setattr(module, "build_inception_feature_extractor", lambda w: stand_in)
    over = [
        "checkpoint=quickstart", "eval.generate=[samples,traversals,interpolations]",
        "eval.metrics=[psnr,fid,is]", "eval.num_images=200", "eval.probe_images=500",
        "eval.generate_per_class=3", "eval.generate_directions=2", "eval.generate_steps=5",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("eval", overrides=over)
    metrics = eval_cli.run(cfg, tmp_path)
    for name in ("samples", "traversals", "interpolations"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0, name
    assert metrics["consistency/samples"] >= 0.8  # the quickstart's digits (1.0 measured)
    assert metrics["consistency/random"] <= 0.3  # ten classes: chance is 0.1
    assert metrics["fid/samples"] > 0 and metrics["is/samples"] >= 1.0
    assert metrics["fid/samples"] != pytest.approx(metrics["fid"])  # not the reconstructions'
    assert compute_fid(torch.zeros(4, 1, 32, 32), torch.zeros(4, 1, 32, 32), stand_in) < 1e-6
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        bad = compose("eval", overrides=["eval.generate=[sample]"])
    with pytest.raises(ValueError, match=r"eval.generate: unknown \['sample'\]"):
        eval_cli.run(bad, tmp_path / "bad")


def test_generation_fits_on_the_probe_features_without_encoding_them_again(tmp_path, monkeypatch):
    """With a probe metric asked for, generation reuses its features: the same consistency
    measures as generation alone, and the probe images are not encoded a second time."""
    from hydra import compose, initialize_config_dir

    from ctrl_csc.cli import evaluate as eval_cli
    from ctrl_csc.cli.common import config_dir

    over = ["checkpoint=quickstart", "eval.generate=[samples]", "eval.num_images=100",
            "eval.probe_images=300", "eval.plots=false"]  # fmt: skip

    def run(metrics, where):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("eval", overrides=[*over, f"eval.metrics={metrics}"])
        return eval_cli.run(cfg, tmp_path / where)

    alone = run("[psnr]", "alone")

    def encoded_twice(*args, **kwargs):
        raise AssertionError("the probe images were encoded a second time")

    monkeypatch.setattr(eval_cli, "encode_loader", encoded_twice)
    with_probe = run("[psnr,nearest_subspace]", "with_probe")
    keys = [k for k in alone if k.startswith("consistency/")]
    assert len(keys) == 4
    assert {k: with_probe[k] for k in keys} == {k: alone[k] for k in keys}
