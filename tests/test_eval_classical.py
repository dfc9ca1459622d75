"""The classical dictionary and the comparison at equal density (ctrl_csc.eval.classical),
against data made by a known non-negative convolutional sparse model."""

from __future__ import annotations

import pytest
import torch

from ctrl_csc.eval.classical import (
    classical_comparison,
    code_at_density,
    learn_classical_dictionary,
    stage_inputs,
)
from ctrl_csc.models import CSCEncoder
from ctrl_csc.nn import CSCLayer


def _synthetic(n: int = 96, seed: int = 0):
    """``u = D z`` with 6 unit atoms (1 x 4 x 4, stride 2) and 8 % non-zero codes ≥ 0."""
    gen = torch.Generator().manual_seed(seed)
    layer = CSCLayer(1, 6, kernel_size=4, stride=2, padding=1, nonnegative=True)
    true = torch.randn(6, 1, 4, 4, generator=gen)
    true = true / true.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    z = torch.rand(n, 6, 8, 8, generator=gen) * (torch.rand(n, 6, 8, 8, generator=gen) < 0.08)
    u = layer.operator((16, 16), dictionary=true).apply(z)
    return layer, true, u


def test_bisection_reaches_the_density_and_the_true_atoms_code_best():
    layer, true, u = _synthetic()
    random = torch.randn(true.shape, generator=torch.Generator().manual_seed(5))
    random = random / random.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    z, lam, res_true = code_at_density(layer, true, u, 0.08)
    assert abs(float((z != 0).float().mean()) - 0.08) < 0.01 and 0 < lam < 1
    _, _, res_random = code_at_density(layer, random, u, 0.08)
    assert res_true < 0.25 < res_random
    with pytest.raises(ValueError, match="density"):
        code_at_density(layer, true, u, 1.5)


def test_the_classical_dictionary_learns_the_generating_atoms():
    layer, true, u = _synthetic()
    learned = learn_classical_dictionary(layer, u, 0.08, steps=100, batch_size=32, lr=0.1, seed=1)
    assert torch.allclose(learned.flatten(1).norm(dim=1), torch.ones(6), atol=1e-5)
    res_learned = code_at_density(layer, learned, u, 0.08)[2]
    start = learn_classical_dictionary(layer, u, 0.08, steps=0, seed=1)
    res_start = code_at_density(layer, start, u, 0.08)[2]
    assert res_learned < 0.6 * res_start, (res_learned, res_start)
    # half the generating atoms are found exactly (alternating minimisation has local minima:
    # the others come out as mixtures and shifts)
    cos = (true.flatten(1) @ learned.flatten(1).T).max(dim=1).values
    assert int((cos > 0.95).sum()) >= 3, cos


def test_comparison_reports_every_csc_stage_of_an_encoder():
    torch.manual_seed(0)
    stages = [{"out_channels": 4, "stride": 2}, {"out_channels": 8, "stride": 2}]
    enc = CSCEncoder(1, 16, stages, feature_dim=8)
    images = [torch.rand(8, 1, 16, 16) * 2 - 1 for _ in range(2)]
    captured = stage_inputs(enc, images)
    assert captured[0][0].shape == (16, 1, 16, 16) and captured[1][0].shape == (16, 4, 8, 8)
    metrics, atoms = classical_comparison(enc, images, images[:1], steps=5)
    for i, layer in enumerate(enc.stages):
        assert atoms[i].shape == layer.weight.shape
        key = f"dictionary/enc{i}"
        assert 0 < metrics[f"{key}/density"] < 1
        assert metrics[f"{key}/residual_at_density"] >= 0
        assert metrics[f"{key}/residual_classical"] >= 0
        assert f"{key}/residual_init_at_density" not in metrics
    # an encoder that has not trained is its own start: the initial atoms code exactly as well
    metrics, _ = classical_comparison(enc, images, images[:1], steps=5, initial_encoder=enc)
    torch.manual_seed(1)
    other = CSCEncoder(1, 16, stages, feature_dim=8)
    other_metrics, _ = classical_comparison(enc, images, images[:1], steps=5, initial_encoder=other)
    for i in range(2):
        key = f"dictionary/enc{i}"
        assert metrics[f"{key}/residual_init_at_density"] == metrics[f"{key}/residual_at_density"]
        assert other_metrics[f"{key}/residual_init_at_density"] != pytest.approx(
            other_metrics[f"{key}/residual_at_density"], rel=1e-6
        )


def test_the_eval_command_compares_each_stage_with_a_classical_dictionary(tmp_path):
    from hydra import compose, initialize_config_dir

    from ctrl_csc.cli import evaluate as eval_cli
    from ctrl_csc.cli.common import config_dir

    over = [
        "checkpoint=quickstart", "eval.metrics=[psnr,density]", "eval.num_images=32",
        "eval.classical_steps=3", "eval.classical_images=32",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("eval", overrides=over)
    metrics = eval_cli.run(cfg, tmp_path)
    for i in range(3):
        key = f"dictionary/enc{i}"
        assert metrics[f"{key}/density"] == pytest.approx(metrics[f"density/enc{i}"], abs=1e-6)
        assert (
            0 <= metrics[f"{key}/residual_classical"] and 0 <= metrics[f"{key}/residual_at_density"]
        )
        assert 0 <= metrics[f"{key}/residual_init_at_density"]  # the release's seed re-creates it
    assert (tmp_path / "dictionary.png").stat().st_size > 0
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        bad = compose("eval", overrides=["eval.classical_steps=-1"])
    with pytest.raises(ValueError, match="eval.classical_steps must be an integer >= 0"):
        eval_cli.run(bad, tmp_path / "bad")
