"""evaluate_reconstructions end to end with tiny fake models and a small feature network."""

import contextlib
import logging
import math
import urllib.error

import pytest
import torch
from tiny_players import CodedTinyDecoder, TinyEncoder
from torch.utils.data import DataLoader, TensorDataset

from ctrl_csc.eval import metrics as M
from ctrl_csc.eval.runner import ALL_METRICS, evaluate_reconstructions

IMG = (1, 12, 12)


def tiny_encoder():
    """A one-stage encoder of 12x12 images (stride 2, threshold 0.1) and a stage with no code."""
    return TinyEncoder(size=12, stride=2, threshold=0.1, codeless_stage=True)


def tiny_decoder():
    """A decoder of 12x12 images that reports a code of density 0.25."""
    return CodedTinyDecoder(size=12)


class Identity(torch.nn.Module):
    """A perfect 'autoencoder' half: flatten / unflatten."""

    def __init__(self, to_image):
        super().__init__()
        self.to_image = to_image

    def forward(self, t):
        return t.view(-1, *IMG) if self.to_image else t.flatten(1)


def feature_net(with_logits=True):
    torch.manual_seed(7)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2)
    )
    head = torch.nn.Linear(24, 5) if with_logits else None
    return M.NetworkFeatureExtractor(net, logits_head=head)


def labelled_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.rand(n, *IMG, generator=g) * 0.5 - 0.25 + (y.view(-1, 1, 1, 1) - 1) * 0.5
    return x.clamp(-1, 1), y


def test_end_to_end_all_metrics(caplog):
    x, y = labelled_data(40, 0)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    probe = DataLoader(TensorDataset(*labelled_data(60, 1)), batch_size=16)
    enc, dec = tiny_encoder(), tiny_decoder()
    enc.train()
    dec.eval()
    with caplog.at_level(logging.WARNING):
        res = evaluate_reconstructions(
            enc,
            dec,
            loader,
            num_images=30,
            feature_extractor=feature_net(),
            probe_loader=probe,
            subspace_components=3,
            is_splits=3,
            num_samples=12,
            progress=False,
        )
    m = res.metrics
    for key in (
        "psnr",
        "ssim",
        "fid",
        "is",
        "is_std",
        "density/enc0",
        "density/dec0",
        "nearest_subspace",
        "linear_probe",
        "num_images",
    ):
        assert key in m and math.isfinite(m[key]), key
    assert "density/enc1" not in m  # a stage without a sparse code reports None: left out
    assert m["num_images"] == 30
    assert m["density/dec0"] == pytest.approx(0.25)
    assert 0 <= m["nearest_subspace"] <= 1 and 0 <= m["linear_probe"] <= 1
    assert 1 <= m["is"] <= 5
    assert res.inputs.shape == (12, *IMG) and res.reconstructions.shape == (12, *IMG)
    assert res.features.shape == (30, 8) and res.labels.tolist() == y[:30].tolist()
    assert enc.training and not dec.training  # modes restored
    assert not caplog.records
    # PSNR / SSIM means equal a direct computation on the same images
    with torch.no_grad():
        enc.eval()
        xh = dec(enc(x[:30])).clamp(-1, 1)
    assert m["psnr"] == pytest.approx(float(M.psnr(x[:30], xh).mean()), rel=1e-5)
    assert m["ssim"] == pytest.approx(float(M.ssim(x[:30], xh).mean()), abs=1e-6)
    torch.testing.assert_close(res.reconstructions, xh[:12])


def test_densities_over_images_mean_image_and_autocast(caplog):
    """Densities are exact per-image means of the returned codes (batches of 4, 4, 2); a model
    pair without ``forward_with_codes`` gets no density, with a warning; ``mean_image`` adds its
    PSNR; the models run in the ``autocast`` context."""
    x, _ = labelled_data(10, 8)
    loader = DataLoader(x, batch_size=4)
    enc, dec = tiny_encoder(), tiny_decoder()
    entered = []

    @contextlib.contextmanager
    def counting():
        entered.append(True)
        yield

    mean = x.mean(0, keepdim=True)
    res = evaluate_reconstructions(
        enc, dec, loader, metrics=("psnr", "density"), progress=False, autocast=counting,
        mean_image=mean,
    )  # fmt: skip
    with torch.no_grad():
        code = enc.forward_with_codes(x)[1][0]
    per_image = (code != 0).flatten(1).double().mean(1)
    assert res.metrics["density/enc0"] == pytest.approx(float(per_image.mean()), rel=1e-6)
    want = float(M.psnr(x, mean.expand_as(x)).double().mean())
    assert res.metrics["psnr_mean_image"] == pytest.approx(want, rel=1e-6)
    assert len(entered) == 3
    with caplog.at_level(logging.WARNING, logger="ctrl_csc.eval.runner"):
        res = evaluate_reconstructions(
            Identity(False), Identity(True), loader, metrics=("psnr", "density"), progress=False
        )
    assert set(res.metrics) == {"psnr", "num_images"}
    assert "metric 'density' skipped" in caplog.text


def test_identity_autoencoder_fid_zero_and_fid_matches_direct():
    x, _ = labelled_data(32, 2)
    loader = DataLoader(x, batch_size=10)  # images only, no labels
    fe = feature_net()
    res = evaluate_reconstructions(
        Identity(False),
        Identity(True),
        loader,
        metrics=("psnr", "ssim", "fid"),
        feature_extractor=fe,
        progress=False,
    )
    assert res.metrics["fid"] == pytest.approx(0.0, abs=1e-6)
    assert res.metrics["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert math.isinf(res.metrics["psnr"])
    # streaming FID over batches == FID of the whole sets
    enc, dec = tiny_encoder(), tiny_decoder()
    res = evaluate_reconstructions(
        enc, dec, loader, metrics=("fid",), feature_extractor=fe, progress=False
    )
    with torch.no_grad():
        xh = dec(enc(x)).clamp(-1, 1)
        want = M.fid_from_features(fe(x)[0], fe(xh)[0])
    assert res.metrics["fid"] == pytest.approx(want, rel=1e-6)


def test_accuracies_skipped_without_labels_or_probe(caplog):
    x, y = labelled_data(16, 3)
    common = dict(metrics=("psnr", "nearest_subspace", "linear_probe"), progress=False)
    with caplog.at_level(logging.WARNING, logger="ctrl_csc.eval.runner"):
        res = evaluate_reconstructions(
            tiny_encoder(),
            tiny_decoder(),
            DataLoader(x, batch_size=8),
            probe_loader=DataLoader(TensorDataset(x, y)),
            **common,
        )
    assert set(res.metrics) == {"psnr", "num_images"} and res.labels is None
    assert "no labels" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctrl_csc.eval.runner"):
        res = evaluate_reconstructions(
            tiny_encoder(), tiny_decoder(), DataLoader(TensorDataset(x, y), batch_size=8), **common
        )
    assert "nearest_subspace" not in res.metrics and "probe_loader" in caplog.text
    caplog.clear()
    one_class = DataLoader(TensorDataset(x, torch.zeros_like(y)), batch_size=8)
    with caplog.at_level(logging.WARNING, logger="ctrl_csc.eval.runner"):
        res = evaluate_reconstructions(
            tiny_encoder(),
            tiny_decoder(),
            DataLoader(TensorDataset(x, y), batch_size=8),
            probe_loader=one_class,
            **common,
        )
    assert "linear_probe" not in res.metrics and ">= 2" in caplog.text


def test_is_skipped_when_extractor_has_no_logits(caplog):
    x, _ = labelled_data(8, 4)
    with caplog.at_level(logging.WARNING, logger="ctrl_csc.eval.runner"):
        res = evaluate_reconstructions(
            tiny_encoder(),
            tiny_decoder(),
            DataLoader(x, batch_size=4),
            metrics=("fid", "is"),
            feature_extractor=feature_net(False),
            progress=False,
        )
    assert "fid" in res.metrics and "is" not in res.metrics and "no logits" in caplog.text


def test_user_errors_are_clear(monkeypatch, tmp_path):
    x, _ = labelled_data(8, 5)
    loader = DataLoader(x, batch_size=4)
    with pytest.raises(ValueError, match="eval.metrics"):
        evaluate_reconstructions(tiny_encoder(), tiny_decoder(), loader, metrics=("psnr", "lpips"))
    with pytest.raises(ValueError, match="eval.num_images"):
        evaluate_reconstructions(tiny_encoder(), tiny_decoder(), loader, num_images=0)

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    with pytest.raises(RuntimeError, match="eval.inception_weights"):
        evaluate_reconstructions(tiny_encoder(), tiny_decoder(), loader, metrics=("fid",))
    small = torch.nn.Sequential(tiny_decoder(), torch.nn.Upsample(size=(10, 10)))
    with pytest.raises(ValueError, match="does not match"):
        evaluate_reconstructions(tiny_encoder(), small, loader, metrics=("psnr",), progress=False)
    with pytest.raises(ValueError, match="dataset.image_size"):
        evaluate_reconstructions(
            tiny_encoder(),
            tiny_decoder(),
            DataLoader(torch.rand(4, 1, 16, 16)),
            metrics=("psnr",),
            progress=False,
        )
    assert set(ALL_METRICS) >= {"psnr", "ssim", "fid", "is"}


@pytest.mark.gpu
def test_runner_on_cuda_matches_cpu():
    x, y = labelled_data(24, 6)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    probe = DataLoader(TensorDataset(*labelled_data(30, 7)), batch_size=8)
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        enc, dec = tiny_encoder(), tiny_decoder()
        res = evaluate_reconstructions(
            enc,
            dec,
            loader,
            feature_extractor=feature_net(),
            probe_loader=probe,
            device=device,
            subspace_components=3,
            is_splits=2,
            progress=False,
        )
        assert next(enc.parameters()).device.type == device
        results.append(res.metrics)
    cpu, gpu = results
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        assert gpu[k] == pytest.approx(cpu[k], rel=1e-3, abs=1e-4), k
