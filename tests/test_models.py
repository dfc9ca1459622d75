"""Every model config builds, round-trips shapes and ranges, and reports what it should.

Each ``conf/model/*.yaml`` is loaded with omegaconf, given the ``dataset`` keys its header states
("# Parameters (at S px, C channels): ..."), instantiated with ``hydra.utils.instantiate`` and run
once forward and backward at batch 2; the tests below read that one run.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ctrl_csc.cli.common import compose_model
from ctrl_csc.models import (
    Autoencoder,
    ConvDecoder,
    ConvEncoder,
    CSCDecoder,
    CSCEncoder,
    CSCStageSpec,
    DCGANDecoder,
    DCGANEncoder,
    ResNetDecoder,
    ResNetEncoder,
    add_noise,
    code_densities,
    count_parameters,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml"))
HEADER = re.compile(
    r"^# Parameters \(at (\d+) px, (\d+) channels?\): ([\d,]+) = encoder ([\d,]+) \+ "
    r"decoder ([\d,]+)\.$",
    re.MULTILINE,
)
# Extra geometries a config must also take (28 px grey MNIST for the 32 px configs).
EXTRA = [
    ("csc_ctrl_32", 1, 28),
    ("dcgan_ctrl_32", 1, 28),
    ("csc_ctrl_tiny", 3, 32),
]
BATCH = 2
# The autoencoder baselines' encoder; every other config is a CTRL pair (features on the sphere).
AUTOENCODER_ENCODERS = ("ctrl_csc.models.ConvEncoder", "ctrl_csc.models.ConvVAEEncoder")


def _int(s: str) -> int:
    return int(s.replace(",", ""))


def header(name: str) -> re.Match:
    m = HEADER.search((CONF / f"{name}.yaml").read_text())
    assert m, f"conf/model/{name}.yaml lacks the '# Parameters (at S px, C channels): ...' header"
    return m


def build(name: str, channels: int, image_size: int):
    model = compose_model(name, channels, image_size)
    return model, instantiate(model.encoder), instantiate(model.decoder)


def is_ctrl(cfg) -> bool:
    """Whether a model config is a CTRL pair (rather than an autoencoder baseline)."""
    return cfg.encoder._target_ not in AUTOENCODER_ENCODERS


def _nn_layers():
    from ctrl_csc.nn import CSCLayer, SparseDeconvLayer

    return CSCLayer, SparseDeconvLayer


def _cases():
    for name in CONFIGS:
        m = HEADER.search((CONF / f"{name}.yaml").read_text())
        c, s = (int(m.group(2)), int(m.group(1))) if m else (3, 32)
        yield pytest.param((name, c, s), id=f"{name}-{s}px-{c}ch")
    for name, c, s in EXTRA:
        yield pytest.param((name, c, s), id=f"{name}-{s}px-{c}ch")


@pytest.fixture(scope="module", params=list(_cases()))
def run(request):
    """Build a config and run it once in train mode: ``z = f(x)``, ``x̂ = g(z)`` (with their
    codes), then backward of a random projection of both."""
    name, c, s = request.param
    torch.manual_seed(0)
    cfg, enc, dec = build(name, c, s)
    x = torch.rand(BATCH, c, s, s) * 2 - 1
    z, enc_codes = enc.forward_with_codes(x)
    xh, dec_codes = dec.forward_with_codes(z)
    loss = (z * torch.randn_like(z)).sum().add((xh * torch.randn_like(xh)).sum())
    if hasattr(enc, "log_variance"):  # the VAE's second head, used by its training step only
        loss = loss + (enc(x, with_log_variance=True)[1] * torch.randn_like(z)).sum()
    loss.backward()
    return {
        "name": name, "channels": c, "size": s, "cfg": cfg, "enc": enc, "dec": dec,
        "x": x, "z": z.detach(), "xh": xh.detach(),
        "enc_dens": code_densities(enc_codes), "dec_dens": code_densities(dec_codes),
    }  # fmt: skip


def test_config_keys(run):
    cfg = run["cfg"]
    assert cfg.name == run["name"]
    # the paper configs use DESIGN's d = 128; the CPU quickstart's feature is its last code
    d = 2048 if run["name"] == "csc_ctrl_tiny" else 128
    assert cfg.encoder.feature_dim == d and cfg.decoder.feature_dim == d
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert raw["encoder"]["in_channels"] == "${dataset.channels}"
    assert raw["encoder"]["image_size"] == "${dataset.image_size}"
    assert raw["decoder"]["out_channels"] == "${dataset.channels}"
    assert raw["decoder"]["image_size"] == "${dataset.image_size}"


def test_header_states_the_parameter_count(run):
    m = header(run["name"])
    if (int(m.group(2)), int(m.group(1))) != (run["channels"], run["size"]):
        pytest.skip("the header counts another geometry")
    ne, nd = count_parameters(run["enc"]), count_parameters(run["dec"])
    assert (_int(m.group(3)), _int(m.group(4)), _int(m.group(5))) == (ne + nd, ne, nd)


@pytest.mark.parametrize("name", CONFIGS)
def test_header_names_a_comparable_model(name):
    """Baselines and CSC-CTRL models of one resolution cite each other with counts within 10%."""
    text = (CONF / f"{name}.yaml").read_text()
    refs = re.findall(
        r"^# (?:Baseline of the same size|CSC-CTRL of the same resolution): (\w+) "
        r"\(([\d,]+) parameters\)\.$",
        text,
        re.MULTILINE,
    )
    if name.startswith("csc_ctrl_") and name != "csc_ctrl_tiny":
        assert refs, f"{name} names no baseline of the same size"
    for other, count in refs:
        assert _int(count) == _int(header(other).group(3)), f"{name} quotes {other} wrongly"
        ratio = _int(header(name).group(3)) / _int(count)
        assert 0.9 < ratio < 1.1, f"{name} vs {other}: {ratio:.2f}"


@pytest.mark.parametrize("name", ["csc_ctrl_tiny", "csc_ctrl_mini"])
def test_model_level_lmbda_reaches_every_stage(name):
    model = compose_model(name, 1, 32)
    model.lmbda = 0.03
    model.n_iter = 3
    enc, dec = instantiate(model.encoder), instantiate(model.decoder)
    for spec in [*enc.specs, *dec.specs]:
        assert (spec.lmbda, spec.n_iter) == (0.03, 3)
    assert [layer.lmbda for layer in enc.stages] == [0.03] * len(enc.stages)


def test_the_decoder_mirrors_the_widths_unless_a_config_lists_its_stages():
    """conf/model/csc/: the encoder's stages come from model.widths (stride 2, first_stage's keys
    on the first), the decoder mirrors whatever the encoder's stages are, and the kernel is
    shared; a config listing decoder.stages keeps its own (csc_ctrl_tiny)."""
    model = compose_model("csc_ctrl_mini", 1, 32)
    model.widths = [8, 16]
    model.kernel_size = 2
    enc, dec = instantiate(model.encoder), instantiate(model.decoder)
    assert [(s.out_channels, s.stride, s.kernel_size, s.init_std) for s in enc.specs] == [
        (8, 2, 2, 0.05), (16, 2, 2, None)]  # fmt: skip
    assert [(s.in_channels, s.stride, s.kernel_size, s.kind, s.norm) for s in dec.specs] == [
        (16, 2, 2, "inverse_csc", "none"), (8, 2, 2, "synthesis", None)]  # fmt: skip
    model.encoder.stages = [{"out_channels": 4, "stride": 1, "kernel_size": 3, "padding": 1}]
    dec = instantiate(model.decoder)
    assert [(s.in_channels, s.stride, s.kernel_size, s.padding, s.kind) for s in dec.specs] == [
        (4, 1, 3, 1, "synthesis")]  # fmt: skip
    tiny = compose_model("csc_ctrl_tiny", 1, 32)
    assert [s["in_channels"] for s in tiny.decoder.stages] == [64, 32, 16]


def test_shapes_and_ranges(run):
    z, xh, x = run["z"], run["xh"], run["x"]
    assert z.shape == (BATCH, run["cfg"].encoder.feature_dim)
    assert torch.isfinite(z).all() and torch.isfinite(xh).all()
    if is_ctrl(run["cfg"]):
        torch.testing.assert_close(z.norm(dim=1), torch.ones(BATCH))
    assert xh.shape == x.shape
    assert xh.min() >= -1 and xh.max() <= 1


def test_gradients_reach_every_parameter(run):
    params = list(run["enc"].named_parameters()) + list(run["dec"].named_parameters())
    missing = [n for n, p in params if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reaches {missing}"


def test_gradients_reach_every_dictionary(run):
    CSCLayer, SparseDeconvLayer = _nn_layers()
    layers = [
        m
        for net in (run["enc"], run["dec"])
        for m in net.modules()
        if isinstance(m, (CSCLayer, SparseDeconvLayer))
    ]
    if not isinstance(run["enc"], CSCEncoder):
        assert not layers
        pytest.skip("not a CSC model")
    assert len(layers) == len(run["enc"].stages) + len(run["dec"].stages)
    for layer in layers:
        assert layer.weight.grad is not None and torch.any(layer.weight.grad != 0)


def test_densities(run):
    enc, dec = run["enc"], run["dec"]
    assert len(run["enc_dens"]) == len(enc.stages)
    assert len(run["dec_dens"]) == len(dec.stages)
    for d in run["enc_dens"] + run["dec_dens"]:
        assert d is None or (isinstance(d, float) and 0.0 <= d <= 1.0)
    if isinstance(enc, CSCEncoder):
        assert all(d is not None for d in run["enc_dens"])
        for spec, d in zip(dec.specs, run["dec_dens"]):
            assert (d is None) == (spec.kind == "synthesis")
    else:  # every block's output counts, but not an image
        assert all(d is not None for d in run["enc_dens"])
        image_last = isinstance(dec, (DCGANDecoder, ConvDecoder))
        assert [d is None for d in run["dec_dens"]] == [
            image_last and i == len(dec.stages) - 1 for i in range(len(dec.stages))
        ]


def test_forward_with_codes_is_forward(run):
    """The codes come with the very output ``forward`` gives; their densities are the fractions
    of exact non-zeros; nothing of the forward stays on the model."""
    enc, dec, x = run["enc"].eval(), run["dec"].eval(), run["x"]
    try:
        with torch.no_grad():
            z, codes = enc.forward_with_codes(x)
            xh, dec_codes = dec.forward_with_codes(z)
            torch.testing.assert_close(z, enc(x), rtol=0, atol=0)
            torch.testing.assert_close(xh, dec(z), rtol=0, atol=0)
    finally:
        enc.train(), dec.train()
    for code, d in zip(codes + dec_codes, code_densities(codes + dec_codes)):
        if code is not None:
            assert d == pytest.approx(float((code != 0).double().mean()), abs=1e-7)
    assert not any(k.endswith("densities") for k in vars(enc) | vars(dec))


def test_codes_nonnegative_where_configured(run):
    enc, dec = run["enc"], run["dec"]
    if not isinstance(enc, CSCEncoder):
        codes = enc.stage_outputs(run["x"])
        assert len(codes) >= len(enc.stages)
        pytest.skip("not a CSC model")
    with torch.no_grad():
        codes = enc.stage_outputs(run["x"])
        outs = dec.stage_outputs(run["z"])
    assert [tuple(c.shape[1:]) for c in codes] == [
        (s.out_channels, *hw) for s, hw in zip(enc.specs, enc.code_sizes)
    ]
    for spec, code in zip(enc.specs, codes):
        if spec.nonnegative:
            assert code.min() >= 0
    for spec, out in zip(dec.specs, outs):
        if spec.kind == "inverse_csc" and spec.nonnegative:
            assert out.min() >= 0


def test_decoder_mirrors_encoder_sizes(run):
    enc, dec = run["enc"], run["dec"]
    assert dec.out_sizes[-1] == (run["size"], run["size"])
    if run["name"] == "csc_ctrl_tiny":  # two 4x4/stride-2 CSC stages, a 3-stage decoder from 4x4
        assert (enc.code_shape[1:], dec.code_shape[1:]) == (
            (run["size"] // 4,) * 2,
            ((run["size"] // 8),) * 2,
        )
        assert enc.feature_dim == enc.code_shape[0] * (run["size"] // 4) ** 2  # no projection
        return
    assert dec.code_shape[1:] == enc.code_shape[1:]
    if isinstance(enc, CSCEncoder):
        assert dec.code_shape == enc.code_shape
        assert dec.out_sizes == [*enc.code_sizes[-2::-1], (run["size"], run["size"])]


def test_wrong_input_is_reported(run):
    enc, dec, c, s = run["enc"], run["dec"], run["channels"], run["size"]
    with pytest.raises(ValueError, match=rf"dataset\.channels.*expected {c}, got {c + 1}"):
        enc(torch.zeros(1, c + 1, s, s))
    t = s + 4
    with pytest.raises(ValueError, match=rf"dataset\.image_size.*expected {s}x{s}, got {t}x{t}"):
        enc(torch.zeros(1, c, t, t))
    with pytest.raises(ValueError, match="feature_dim"):
        dec(torch.zeros(1, 64))


# ----------------------------------------------------------------- construction and options


def test_image_too_small_is_reported_at_construction():
    stages = [{"out_channels": 4, "kernel_size": 5, "padding": 0}]
    with pytest.raises(ValueError, match=r"dataset\.image_size=4 .*stages\[0\]"):
        CSCEncoder(1, 4, stages)
    with pytest.raises(ValueError, match=r"dataset\.image_size=4 .*stages\[0\]"):
        CSCDecoder(1, 4, [{"in_channels": 4, "kernel_size": 5, "padding": 0}])
    with pytest.raises(ValueError, match=r"dataset\.image_size=4x4 .*num_down"):
        DCGANEncoder(1, 4, num_down=3)


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([], "non-empty"),
        ([{"out_channels": 4, "lambda": 0.1}], r"stages\[0\]: unknown keys \['lambda'\]"),
        ([{"stride": 2}], r"stages\[0\].*out_channels"),
        ([{"out_channels": 4}, {"out_channels": 4, "algorithm": "admm"}], r"stages\[1\]\.algo"),
        ([{"out_channels": 4, "norm": "layer"}], r"stages\[0\]\.norm"),
    ],
)
def test_bad_stage_specs_are_reported(stages, match):
    with pytest.raises(ValueError, match=match):
        CSCEncoder(1, 8, stages)


def test_bad_decoder_kind_and_defaults():
    with pytest.raises(ValueError, match=r"decoder\.stages\[0\]\.kind"):
        CSCDecoder(1, 8, [{"in_channels": 4, "kind": "deconv"}])
    with pytest.raises(ValueError, match=r"stage_defaults: unknown keys \['iters'\]"):
        CSCDecoder(1, 8, [{"in_channels": 4}], stage_defaults={"iters": 3})
    with pytest.raises(ValueError, match="output_activation"):
        CSCDecoder(1, 8, [{"in_channels": 4}], output_activation="sigmoid")
    with pytest.raises(ValueError, match=r"^model\.decoder\.stages\[0\]: learn_lmbda"):
        CSCDecoder(1, 8, [{"in_channels": 4, "kind": "synthesis", "learn_lmbda": True}])


def test_stage_specs_as_dataclasses_and_defaults():
    enc = CSCEncoder(
        1,
        8,
        [CSCStageSpec(out_channels=4, stride=2), {"out_channels": 6, "n_iter": 3}],
        feature_dim=5,
        norm="group",
        norm_groups=2,
        stage_defaults={"lmbda": 0.05, "n_iter": 1},
    )
    assert enc.specs[0].lmbda == 0.1  # dataclass stages are taken as given
    assert (enc.specs[1].lmbda, enc.specs[1].n_iter) == (0.05, 3)
    assert isinstance(enc.norms[0], torch.nn.GroupNorm)
    assert enc.code_shape == (6, 4, 4)
    z = enc(torch.rand(3, 1, 8, 8))
    assert z.shape == (3, 5)


def test_non_square_images():
    enc = CSCEncoder(2, (12, 20), [{"out_channels": 4, "stride": 2}], feature_dim=8)
    dec = CSCDecoder(2, (12, 20), [{"in_channels": 4, "stride": 2}], feature_dim=8)
    xh = dec(enc(torch.rand(2, 2, 12, 20)))
    assert xh.shape == (2, 2, 12, 20)


def test_encoder_unnormalised_and_synthesis_decoder_activation():
    enc = CSCEncoder(1, 8, [{"out_channels": 4}], feature_dim=6, normalize=False)
    z = enc(torch.rand(4, 1, 8, 8))
    assert not torch.allclose(z.norm(dim=1), torch.ones(4))
    dec = CSCDecoder(
        1, 8, [{"in_channels": 4, "kind": "synthesis"}, {"in_channels": 3}], feature_dim=6
    )
    assert isinstance(dec.activations[0], torch.nn.ReLU)  # "auto" after a synthesis stage
    assert dec(z).shape == (4, 1, 8, 8)


@pytest.mark.parametrize("size", [27, 28, 31, 32, 33])
def test_baselines_take_any_size(size):
    pairs = [
        (DCGANEncoder(1, size, base_channels=4), DCGANDecoder(1, size, base_channels=4)),
        (
            ResNetEncoder(1, size, base_channels=4, channel_mults=(1, 2)),
            ResNetDecoder(1, size, base_channels=4, channel_mults=(1, 2)),
        ),
        (ConvEncoder(1, size, channels=(4, 8)), ConvDecoder(1, size, channels=(8, 4))),
    ]
    for enc, dec in pairs:
        assert dec(enc(torch.rand(2, 1, size, size))).shape == (2, 1, size, size)


def test_sparse_autoencoder_exposes_its_code():
    enc = ConvEncoder(1, 8, feature_dim=16, channels=(4,), code_activation="relu")
    dec = ConvDecoder(1, 8, feature_dim=16, channels=(4,))
    z = enc(torch.rand(5, 1, 8, 8))  # normalize=False: the returned features are the code
    assert (z >= 0).all()
    (dec(z).square().mean() + 1e-3 * z.abs().mean()).backward()
    assert enc.projection.weight.grad is not None
    enc_n = ConvEncoder(1, 8, feature_dim=16, channels=(4,), normalize=True)
    x = torch.rand(5, 1, 8, 8)
    zn = enc_n(x)
    enc_n.normalize = False  # the same network's code, before the sphere
    torch.testing.assert_close(zn, torch.nn.functional.normalize(enc_n(x), dim=1))


def test_top_k_fraction_keeps_the_largest_entries_of_each_image():
    from ctrl_csc.models.conv_ae import TopKFraction

    torch.manual_seed(0)
    h = torch.randn(4, 3, 5, 5, requires_grad=True)
    out = TopKFraction(0.2)(h)
    k = 15  # ⌈0.2 · 75⌉
    for hi, oi in zip(h.detach(), out.detach(), strict=True):
        kept = hi.flatten().sort(descending=True).values[:k]
        torch.testing.assert_close(oi.flatten().sort(descending=True).values[:k], kept)
        assert int((oi != 0).sum()) == k
        assert (oi[oi != 0] >= hi.flatten().kthvalue(75 - k + 1).values).all()
    out.sum().backward()
    torch.testing.assert_close(h.grad, (out != 0).float())  # gradient on the kept entries only
    assert TopKFraction(1.0)(h) is h
    with pytest.raises(ValueError, match="stage_density"):
        TopKFraction(0.0)
    enc = ConvEncoder(3, 16, channels=(8, 8), code_activation="relu", stage_density=0.25)
    _, codes = enc.forward_with_codes(torch.randn(6, 3, 16, 16))
    assert all(float((c != 0).float().mean()) <= 0.25 for c in codes)


def test_add_noise_and_autoencoder():
    x = torch.zeros(4, 1, 8, 8)
    assert add_noise(x, 0.0) is x
    g = torch.Generator().manual_seed(1)
    n = add_noise(x, 0.5, generator=g)
    assert n.shape == x.shape and 0.3 < n.std() < 0.7
    with pytest.raises(ValueError, match="noise_std"):
        add_noise(x, -1.0)
    ae = Autoencoder(ConvEncoder(1, 8, feature_dim=4, channels=(2,)),
                     ConvDecoder(1, 8, feature_dim=4, channels=(2,)))  # fmt: skip
    z, xh = ae(x)
    assert z.shape == (4, 4) and xh.shape == x.shape


def test_tiny_config_learns_to_reconstruct():
    """The quickstart model, trained as a plain autoencoder for a few steps, fits a small batch."""
    torch.manual_seed(0)
    _, enc, dec = build("csc_ctrl_tiny", 1, 32)
    grid = torch.linspace(-1, 1, 32)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    centres = torch.rand(8, 2, 1, 1) * 1.2 - 0.6
    blobs = torch.exp(-((xx - centres[:, :1]) ** 2 + (yy - centres[:, 1:]) ** 2) / 0.1)
    x = 2 * blobs - 1  # (8, 1, 32, 32) in [-1, 1]
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=3e-3)
    losses = []
    for _ in range(25):
        loss = (dec(enc(x)) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    enc.eval()
    dec.eval()
    with torch.no_grad():
        z1, z2 = enc(x), enc(x)
    torch.testing.assert_close(z1, z2)  # eval mode is deterministic
    assert dec(z1).shape == x.shape


def test_encoder_without_projection_uses_its_last_code_as_the_feature():
    torch.manual_seed(0)
    stages = [{"out_channels": 4, "stride": 2, "kernel_size": 4, "padding": 1}] * 2
    enc = CSCEncoder(1, 16, stages, feature_dim=4 * 4 * 4, norm="none", projection=False).eval()
    assert list(enc.parameters()) == [enc.stages[0].weight, enc.stages[1].weight]
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    codes = enc.stage_outputs(x)
    z = enc(x)
    torch.testing.assert_close(z, torch.nn.functional.normalize(codes[-1].flatten(1), dim=1))
    with pytest.raises(ValueError, match="projection"):
        CSCEncoder(1, 16, stages, feature_dim=128, norm="none", projection=False)


def test_projection_init_scale_scales_the_initial_weight_only():
    stages = [{"out_channels": 4, "stride": 2}, {"out_channels": 8, "stride": 2}]
    built = {}
    for scale in (1.0, 0.1, 0.0):
        torch.manual_seed(0)
        built[scale] = CSCEncoder(1, 16, stages, feature_dim=8, projection_init_scale=scale)
    ref = built[1.0].state_dict()
    for scale, enc in built.items():
        for name, value in enc.state_dict().items():
            want = ref[name] * scale if name == "projection.weight" else ref[name]
            torch.testing.assert_close(value, want, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="projection_init_scale"):
        CSCEncoder(1, 16, stages, feature_dim=8, projection_init_scale=-1.0)


def test_projection_rate_keeps_the_features_and_slows_the_adam_step_of_the_weight():
    """``projection_rate = r``: the same initial features as ``r = 1``, and after one Adam step
    on the same loss the features of the encoder at ``r = 1`` whose projection weight took ``r``
    times its own step, the rest (dictionaries, bias) its full step (Adam's first step is ``lr``
    times the gradient's sign, whatever its scale)."""
    stages = [{"out_channels": 4, "stride": 2}, {"out_channels": 8, "stride": 2}]
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(3)).double()
    v = torch.randn(8, generator=torch.Generator().manual_seed(4)).double()
    encoders, features = {}, {}
    for rate in (1.0, 0.1):
        torch.manual_seed(0)
        enc = encoders[rate] = CSCEncoder(1, 16, stages, feature_dim=8, projection_rate=rate)
        enc.double().eval()  # eval: the step sizes stay as estimated at the first forward
        before = {k: t.detach().clone() for k, t in enc.named_parameters()}
        z = features[rate] = enc(x)
        opt = torch.optim.Adam(enc.parameters(), lr=1e-3, eps=1e-30)
        (z @ v).sum().backward()
        opt.step()
        if rate == 1.0:  # the reference: the weight's step scaled by 0.1 after the fact
            reference = copy.deepcopy(enc)
            with torch.no_grad():
                w = reference.projection.weight
                w.copy_(before["projection.weight"] + 0.1 * (w - before["projection.weight"]))
                assert (w - before["projection.weight"]).abs().max() > 0.5e-4  # it moved
    # equal up to the float32 rounding of the stored initial weight (made in float32)
    torch.testing.assert_close(features[0.1], features[1.0], rtol=2e-6, atol=1e-8)
    with torch.no_grad():
        got, want, unslowed = encoders[0.1](x), reference(x), encoders[1.0](x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    assert (unslowed - want).abs().max() > 100 * (got - want).abs().max()
    for bad in (0.0, -1.0, True, "0.1", float("inf"), float("nan")):
        with pytest.raises(ValueError, match="projection_rate must be a finite number > 0"):
            CSCEncoder(1, 16, stages, feature_dim=8, projection_rate=bad)
    with pytest.raises(ValueError, match="projection=false has none"):
        CSCEncoder(1, 16, stages, feature_dim=128, projection=False, projection_rate=0.5)


@pytest.mark.parametrize("role", ["encoder", "decoder"])
def test_auto_scale_is_two_step_scale_over_own_and_touches_nothing_else(role):
    """``CSCEncoder(projection_rate="auto")`` and ``CSCDecoder(last_stage_gain="auto")``, the
    defaults: 1 with no measurement at T = 2; otherwise the mean ``|h|`` of what the projection
    (encoder) or the last stage (decoder) reads, with every stage at 2 ISTA steps over the same
    at its own, for 8 Gaussian images (features on the sphere) from seed 0, here computed by a
    second model built at T = 2 from the same seed (the dictionaries do not depend on T).
    Building it draws nothing from the global random state and leaves the solvers' and norms'
    state as a model with a given number has it."""
    sd = {"lmbda_relative": True, "nonnegative": True}
    if role == "encoder":
        cls, key, moved = CSCEncoder, "projection_rate", "projection.weight"
        stages = [{"out_channels": 4, "stride": 2}, {"out_channels": 8, "stride": 2}]
        probe = torch.randn(
            8, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64
        )
        probe, read = probe.float(), -1  # the last code (no norm, no activation)
    else:  # the stage before the last has no norm; its code is non-negative
        cls, key, moved = CSCDecoder, "last_stage_gain", None
        stages = [{"in_channels": 8, "stride": 2}, {"in_channels": 4, "stride": 2}]
        probe = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        probe, read = torch.nn.functional.normalize(probe.float(), dim=1), -2

    def build(n_iter, algorithm="fista", **kwargs):
        torch.manual_seed(0)
        defaults = {**sd, "n_iter": n_iter, "algorithm": algorithm}
        model = cls(1, 16, stages, feature_dim=8, stage_defaults=defaults, **kwargs)
        return model, torch.rand(3)  # the global random state after building

    two, after_two = build(2)
    assert getattr(two, key).item() == 1.0 and getattr(two, key).dtype == torch.float32
    given, after_given = build(2, **{key: 1.0})
    torch.testing.assert_close(after_two, after_given, rtol=0, atol=0)
    for name, value in given.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for n_iter, algorithm in ((1, "ista"), (5, "ista"), (5, "fista"), (10, "fista")):
        auto, after_auto = build(n_iter, algorithm)
        fixed, after_fixed = build(n_iter, algorithm, **{key: 0.5})
        reference, _ = build(2, "ista", **{key: 0.5})
        torch.testing.assert_close(after_auto, after_fixed, rtol=0, atol=0)
        for name, value in fixed.state_dict().items():
            if name not in (key, moved):
                torch.testing.assert_close(auto.state_dict()[name], value, rtol=0, atol=0, msg=name)
        with torch.no_grad():
            two_steps, own = (m.stage_outputs(probe)[read].abs().mean() for m in (reference, fixed))
        assert getattr(auto, key).item() == pytest.approx((two_steps / own).item(), rel=1e-6)
        # ISTA from zero makes the codes grow with T: below 1 past 2 steps, above at 1 step
        assert (getattr(auto, key).item() > 1) == (n_iter == 1)
    # the value travels with the weights; a state dict without it ran at 1 (auto) or at the
    # number given
    state = auto.state_dict()
    fresh_five, _ = build(5, "ista")
    fresh_five.load_state_dict(state)
    assert getattr(fresh_five, key).item() == getattr(auto, key).item()
    del state[key]
    fresh_five.load_state_dict(state)
    assert getattr(fresh_five, key).item() == 1.0
    fixed.load_state_dict(state)
    assert getattr(fixed, key).item() == 0.5
    with torch.device("meta"):  # built to check shapes only (the release guard): not measured
        assert getattr(build(5)[0], key).is_meta
    for bad in ("Auto", "", "automatic", 0.0, -1.0, True, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"{key} must be a finite number > 0 or 'auto'"):
            cls(1, 16, stages, **{key: bad})


@pytest.mark.parametrize("n_iter", [1, 2, 5, 10])
def test_the_game_starts_with_a_blind_encoder_at_every_unroll_depth(n_iter):
    """At the default initialisation the features of different images nearly coincide, and the
    decoder's images have the images' features, however deep the unroll: the start the game
    learned from (with PyTorch's projection scale, at T = 5 the mean cosine was 0.91 on digits and
    the game failed; experiments/notes/sparse_deep.md §2)."""
    torch.manual_seed(0)
    spec = {"lmbda": 0.1, "n_iter": n_iter}
    stages = [{"out_channels": c, "stride": 2} for c in (32, 64, 128)]
    enc = CSCEncoder(1, 32, stages, stage_defaults=spec).eval()
    dec = CSCDecoder(1, 32, [{"in_channels": c, "stride": 2} for c in (128, 64, 32)],
                     stage_defaults=spec).eval()  # fmt: skip
    x = (torch.rand(64, 1, 32, 32) < 0.2).float() * 2 - 1  # sparse strokes on a dark ground
    with torch.no_grad():
        z = enc(x)
        cos = (z @ z.T)[~torch.eye(64, dtype=torch.bool)]
        assert cos.mean() > 0.98, float(cos.mean())
        assert (z - enc(dec(z))).pow(2).sum(1).mean() < 0.05


def test_decoder_without_projection_reads_the_feature_as_its_first_code():
    """The mirror of the encoder's option: the feature, reshaped, is the first stage's input
    (after the decoder's norm and activation); no Linear."""
    torch.manual_seed(0)
    stages = [{"in_channels": 4, "stride": 2}, {"in_channels": 2, "stride": 2}]
    dec = CSCDecoder(1, 16, stages, feature_dim=4 * 4 * 4, norm="none", projection=False).eval()
    assert isinstance(dec.projection, torch.nn.Identity)
    assert all(p is s.weight for p, s in zip(dec.parameters(), dec.stages))
    z = torch.rand(3, 64)
    h = torch.relu(z.view(3, 4, 4, 4))  # projection_activation: relu
    h = dec.stages[0](h, output_size=dec.out_sizes[0])
    want = torch.tanh(dec.stages[1](h, output_size=dec.out_sizes[1]))  # no norm before the last
    torch.testing.assert_close(dec(z), want)
    with pytest.raises(ValueError, match=r"model\.decoder\.projection=false.*feature_dim: 64"):
        CSCDecoder(1, 16, stages, feature_dim=128, projection=False)


@pytest.mark.parametrize("channels", [1, 3])
def test_csc_models_given_only_their_shapes_are_the_shipped_quickstart_model(channels):
    """CSCEncoder / CSCDecoder given only channels, image size, stage widths and strides and the
    feature dimension build what conf/model/csc_ctrl_mini.yaml builds: the same stage options,
    modules, weights from the same seed and outputs (the settings that learn, not the layers'
    own defaults)."""
    cfg = compose_model("csc_ctrl_mini", channels, 32)
    torch.manual_seed(0)
    shipped = instantiate(cfg.encoder), instantiate(cfg.decoder)
    torch.manual_seed(0)
    enc_stages = [
        # init_std: the shipped first stage stores its atoms at a smaller scale (how fast Adam
        # turns them), a choice of the config, not a default
        {"out_channels": 32, "stride": 2, "init_std": 0.05},
        {"out_channels": 64, "stride": 2},
        {"out_channels": 128, "stride": 2},
    ]
    dec_stages = [{"in_channels": c, "stride": 2} for c in (128, 64, 32)]
    plain = (
        CSCEncoder(channels, 32, enc_stages, feature_dim=128),
        CSCDecoder(channels, 32, dec_stages, feature_dim=128),
    )
    x = torch.rand(4, channels, 32, 32) * 2 - 1

    def used(spec):  # a synthesis stage has no solver: its sign option is unused
        kind = getattr(spec, "kind", None)
        return dataclasses.replace(spec, nonnegative=None) if kind == "synthesis" else spec

    for a, b in zip(shipped, plain):
        assert [used(s) for s in a.specs] == [used(s) for s in b.specs]
        assert repr(a) == repr(b)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        z = shipped[0](x)
        assert torch.equal(plain[0](x), z)
        assert torch.equal(plain[1](z), shipped[1](z))


def test_decoder_position_defaults_yield_to_explicit_settings():
    """The last decoder stage defaults to a signed synthesis stage and the one before it to no
    norm, unless the stage or stage_defaults says otherwise; stride-1 stages keep the layers'
    3x3 kernel (4x4 at padding 1 is for stride 2)."""
    dec = CSCDecoder(1, 8, [{"in_channels": 4, "stride": 2}, {"in_channels": 3, "stride": 2}])
    assert [s.kind for s in dec.specs] == ["inverse_csc", "synthesis"]
    assert [s.nonnegative for s in dec.specs] == [True, False]
    assert [s.norm for s in dec.specs] == ["none", None]
    assert [(s.kernel_size, s.padding) for s in dec.specs] == [(4, 1), (4, 1)]
    dec = CSCDecoder(
        1,
        8,
        [{"in_channels": 4, "stride": 2, "norm": "batch"}, {"in_channels": 3, "stride": 2}],
        stage_defaults={"kind": "inverse_csc", "kernel_size": 6},
    )
    assert [s.kind for s in dec.specs] == ["inverse_csc", "inverse_csc"]
    assert [s.norm for s in dec.specs] == ["batch", None]
    assert [(s.kernel_size, s.padding) for s in dec.specs] == [(6, None), (6, None)]
    enc = CSCEncoder(1, 8, [{"out_channels": 4}, {"out_channels": 4, "stride": 2, "padding": 2}])
    assert [(s.kernel_size, s.padding) for s in enc.specs] == [(3, None), (4, 2)]
    assert enc.code_shape == (4, 5, 5)


def test_a_config_density_reaches_every_encoder_stage_and_holds_on_images():
    """``+model.encoder.stage_defaults.density=0.2`` composed by Hydra gives every encoder stage
    (not the decoder's) that density, and their codes of held-out-like images keep it (T = 2 moves
    the first step's exact fraction by a few hundredths at most)."""
    cfg = compose_model("csc_ctrl_mini", 1, 32, "+model.encoder.stage_defaults.density=0.2")
    torch.manual_seed(0)
    enc, dec = instantiate(cfg.encoder), instantiate(cfg.decoder)
    assert [s.density for s in enc.specs] == [0.2, 0.2, 0.2]
    assert all(s.density is None for s in dec.specs)
    _, codes = enc.eval().forward_with_codes(torch.rand(16, 1, 32, 32) * 2 - 1)
    densities = [float((c != 0).float().mean()) for c in codes]
    assert all(0.15 <= d <= 0.2 + 1e-3 for d in densities), densities
