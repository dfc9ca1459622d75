"""ctrl_csc.nn.stage: the stage geometry against torch's convolutions, and the one options table
that the layers and the model specs share."""

from __future__ import annotations

import dataclasses
import inspect
import itertools

import pytest
import torch
import torch.nn.functional as F

from ctrl_csc.models import specs
from ctrl_csc.nn import CSCLayer, SparseDeconvLayer, stage
from ctrl_csc.nn.stage import (
    DecoderStageOptions,
    EncoderStageOptions,
    code_size,
    transposed_output_padding,
)

GEOMETRIES = list(itertools.product((1, 2, 3, 4, 5), (1, 2, 3), (None, 0, 1, 2)))


@pytest.mark.parametrize(("k", "s", "p"), GEOMETRIES)
def test_code_size_is_the_shape_conv2d_returns(k, s, p):
    pad = k // 2 if p is None else p
    weight = torch.zeros(1, 1, k, k)
    for size in ((1, 1), (2, 5), (7, 8), (9, 4)):
        signal = torch.zeros(1, 1, *size)
        try:
            expected = tuple(F.conv2d(signal, weight, stride=s, padding=pad).shape[-2:])
        except RuntimeError:  # torch refuses an output below 1x1
            expected = None
        if expected is None or min(expected) < 1:
            with pytest.raises(ValueError, match="too small for CSCLayer"):
                code_size(size, k, s, p, "CSCLayer")
        else:
            assert code_size(size, k, s, p, "CSCLayer") == expected


@pytest.mark.parametrize(("k", "s", "p"), GEOMETRIES)
def test_output_padding_lands_conv_transpose2d_exactly_on_the_fine_size(k, s, p):
    pad = k // 2 if p is None else p
    weight = torch.zeros(1, 1, k, k)
    for fine in itertools.product(range(1, 10), repeat=2):
        if min((n + 2 * pad - k) // s + 1 for n in fine) < 1:
            continue
        coarse = code_size(fine, k, s, p, "test")
        o = transposed_output_padding(coarse, fine, k, s, pad, "test")
        out = F.conv_transpose2d(torch.zeros(1, 1, *coarse), weight, None, s, pad, o)
        assert tuple(out.shape[-2:]) == fine
        # and no other fine size has the same code: one past the reachable range is refused
        with pytest.raises(ValueError, match="output_padding"):
            transposed_output_padding(coarse, (fine[0] + s, fine[1]), k, s, pad, "test")


def test_size_error_names_the_setting_it_comes_from():
    with pytest.raises(ValueError, match="the input is too small for CSCLayer: kernel_size=7"):
        code_size((4, 4), 7, 1, 0, "CSCLayer")
    with pytest.raises(
        ValueError,
        match=r"dataset\.image_size=4 is too small for this model \(model\.encoder\.stages\[2\]\)"
        r".* 4x4 signal into a 0x0 code.*; use a larger image size",
    ):
        code_size(
            (4, 4), 5, 1, 0, "this model (model.encoder.stages[2])",
            source="dataset.image_size=4", advice="use a larger image size",
        )  # fmt: skip
    assert stage.upsampled_size((3, 5), 2) == (6, 10)
    assert stage.default_padding(4) == 2 and stage.default_padding(4, 1) == 1


@pytest.mark.parametrize(
    ("layer", "table", "spec", "channels"),
    [
        (CSCLayer, EncoderStageOptions, specs.CSCStageSpec, "out_channels"),
        (SparseDeconvLayer, DecoderStageOptions, specs.DeconvStageSpec, "in_channels"),
    ],
)
def test_the_layer_and_the_spec_of_a_role_share_one_options_object(layer, table, spec, channels):
    """A layer given nothing holds its role's defaults; a model's spec is a subclass of that
    table, passed whole to the layer and on to its solver (no list of options in between)."""
    options = {f.name: f.default for f in dataclasses.fields(table)}
    assert set(options) == set(table.option_names())
    params = inspect.signature(layer).parameters
    assert list(params) == ["in_channels", "out_channels", "kernel_size", "options", "changes"]
    assert layer(2, 3).options == table()
    spec_fields = {f.name: f for f in dataclasses.fields(spec)}
    assert {n: spec_fields[n].default for n in options} == options
    assert set(spec_fields) - set(options) == {channels, "norm", "activation"}
    built = spec(**{channels: 4}, kernel_size=4, stride=2, lmbda=0.2, n_iter=3)
    assert built.layer_kwargs() == {**options, "kernel_size": 4, "stride": 2, "lmbda": 0.2,
                                    "n_iter": 3}  # fmt: skip
    made = layer(2, 3, options=built)
    assert made.options is built and (made.kernel_size, made.stride) == (4, 2)
    if made.solver is not None:
        assert made.solver.options is built and made.solver.n_iter == 3
    changed = layer(2, 3, 5, options=built, lmbda=0.3)  # a copy with the changes, validated
    assert changed.options.layer_kwargs() == {**built.layer_kwargs(), "kernel_size": 5,
                                              "lmbda": 0.3}  # fmt: skip
    with pytest.raises(ValueError, match=rf"^{layer.__name__}: unknown options \['lmbd'\]"):
        layer(2, 3, lmbd=0.1)
    with pytest.raises(ValueError, match=f"^{layer.__name__}: options must be a {table.__name__}"):
        layer(2, 3, options={"lmbda": 0.1})


def test_an_options_object_is_validated_when_made():
    with pytest.raises(stage.OptionError, match="^lmbda must be >= 0, got -1"):
        EncoderStageOptions(lmbda=-1)
    with pytest.raises(stage.OptionError, match="^backward='implicit'.*learn_step") as err:
        DecoderStageOptions(backward="implicit", learn_step=True)
    assert err.value.at("model.decoder.stages[0]").startswith("model.decoder.stages[0]: backward")
    with pytest.raises(ValueError, match=r"^model\.encoder\.stages\[1\]\.n_iter must be"):
        specs.parse_stages(
            [{"out_channels": 2}, {"out_channels": 2, "n_iter": 0}], specs.CSCStageSpec,
            "model.encoder.stages",
        )  # fmt: skip


def test_role_defaults_and_kinds():
    assert EncoderStageOptions().nonnegative is True  # the code z >= 0
    assert DecoderStageOptions().nonnegative is False  # the last stage's output is the image
    assert DecoderStageOptions().kind == "inverse_csc"
    assert specs.DECODER_KINDS is stage.KINDS
    assert not hasattr(EncoderStageOptions(), "kind")


def test_every_option_has_its_check_or_is_a_flag():
    flags = {"normalize_atoms", "nonnegative", "learn_lmbda", "learn_step", "lmbda_relative"}
    names = set(EncoderStageOptions.option_names()) | set(DecoderStageOptions.option_names())
    assert set(stage.CHECKS) == names - flags
    for table in (EncoderStageOptions(), DecoderStageOptions()):  # the defaults pass
        stage.check_options(table.layer_kwargs(), "default.")
        stage.check_relations(table.layer_kwargs(), "default: ")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kernel_size": 0}, "kernel_size must be an integer >= 1, got 0"),
        ({"stride": 1.0}, "stride must be an integer >= 1, got 1.0"),
        ({"padding": -1}, "padding must be an integer >= 0 or null, got -1"),
        ({"lmbda": -0.1}, "lmbda must be >= 0, got -0.1"),
        ({"mu": float("nan")}, "mu must be >= 0, got nan"),
        ({"n_iter": 0}, "n_iter must be an integer >= 1, got 0"),
        ({"algorithm": "admm"}, "algorithm must be one of"),
        ({"power_iters": 0}, "power_iters must be an integer >= 1, got 0"),
        ({"init_power_iters": 0}, "init_power_iters must be an integer >= 1"),
        ({"init_std": 0.0}, "init_std must be a number > 0 or null"),
        ({"backward": "reversible"}, "backward must be one of"),
        ({"compile": 1}, "compile must be true or false"),
        ({"kind": "deconv"}, "kind must be one of"),
    ],
)
def test_each_check_names_the_setting(options, message):
    for prefix in ("CSCLayer: ", "model.encoder.stages[1]."):
        with pytest.raises(ValueError, match=f"^{prefix}{message}".replace("[", r"\[")):
            stage.check_options(options, prefix)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lmbda": 1.0, "lmbda_relative": True}, "with lmbda_relative=True, lmbda is a fraction"),
        ({"lmbda": 0.0, "learn_lmbda": True}, "learn_lmbda=True needs lmbda > 0"),
        ({"backward": "implicit", "learn_step": True}, "backward='implicit'.*learn_step"),
        ({"kind": "synthesis", "learn_step": True}, "learn_lmbda/learn_step only apply to"),
    ],
)
def test_each_relation_is_checked_by_the_layer(options, match):
    with pytest.raises(ValueError, match="^X: " + match):
        stage.check_relations(options, "X: ")
    stage.check_options(options, "X: ")  # each value alone is valid
    layer = SparseDeconvLayer if "kind" in options else CSCLayer
    with pytest.raises(ValueError, match=f"^{layer.__name__}: {match}"):
        layer(2, 3, **options)
