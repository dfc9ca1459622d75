"""Stage specifications of the CSC encoder and the sparse-deconvolution decoder.

A model config lists its stages as plain mappings (YAML dicts); :func:`parse_stages` turns each into
a typed, validated dataclass so a misspelt key or an unknown option is reported with the stage's
position instead of being ignored.

The stage options, their defaults and their checks are those of the layers
(:mod:`ctrl_csc.nn.stage`): a spec is the options of its role (a subclass of
:class:`~ctrl_csc.nn.stage.EncoderStageOptions` / :class:`~ctrl_csc.nn.stage.DecoderStageOptions`)
plus what the model adds around the layer (its channels, ``norm``, ``activation``). A spec is
validated once, when it is parsed — each option, and the constraints between options (e.g.
``backward='implicit'`` refuses ``learn_step``), reported with the stage's position — and the
model passes it whole to its layer, which passes it to its solver.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ctrl_csc.nn.stage import (
    KINDS,
    DecoderStageOptions,
    EncoderStageOptions,
    OptionError,
    check_channels,
)

from ._common import ACTIVATIONS, NORMS

__all__ = [
    "CONFIG_SHAPE_KEYS",
    "CSCStageSpec",
    "DeconvStageSpec",
    "encoder_stages",
    "mirrored_stages",
    "parse_stages",
    "register_resolvers",
]

DECODER_KINDS = KINDS


@dataclass(frozen=True)
class CSCStageSpec(EncoderStageOptions):
    """One CSC stage of :class:`~ctrl_csc.models.CSCEncoder` (a :class:`ctrl_csc.nn.CSCLayer`).

    The stage maps ``(N, C_prev, H, W)`` to a code ``(N, out_channels, h, w)``,
    ``h = floor((H + 2p - k) / stride) + 1`` (``= ceil(H / stride)`` for odd ``k`` and the default
    ``p = k // 2``). The code goes through ``norm`` then ``activation`` before the next stage (or
    the final projection).

    Attributes:
        out_channels: number of atoms / code channels.
        kernel_size, stride, padding, lmbda, mu, n_iter, algorithm, nonnegative, normalize_atoms,
            learn_lmbda, learn_step, power_iters, init_power_iters, lmbda_relative, density,
            init_std, backward, compile: the options of the layer, with their defaults and
            meaning in :class:`~ctrl_csc.nn.stage.EncoderStageOptions` (keyword-only).
        norm: normalisation after the stage (``"batch" | "group" | "none"``); ``None`` uses the
            encoder's ``norm``.
        activation: nonlinearity after the norm (``"none"`` by default: the prox is the
            nonlinearity).
    """

    out_channels: int
    norm: str | None = None
    activation: str = "none"


@dataclass(frozen=True)
class DeconvStageSpec(DecoderStageOptions):
    """One stage of :class:`~ctrl_csc.models.CSCDecoder` (a :class:`ctrl_csc.nn.SparseDeconvLayer`).

    Decoder stages are listed in the order they are applied (coarse to fine). A stage takes
    ``in_channels`` channels — the mirror of an encoder stage's ``out_channels`` — and produces the
    next stage's ``in_channels`` channels, the last one the image channels. It upsamples by
    ``stride``; the decoder passes ``output_size`` so that every size matches the encoder's exactly.

    Attributes:
        in_channels: channels of the code this stage takes.
        kernel_size, stride, padding, kind, lmbda, mu, n_iter, algorithm, nonnegative,
            normalize_atoms, learn_lmbda, learn_step, power_iters, init_power_iters,
            lmbda_relative, density, init_std, backward, compile: the options of the layer, with
            their defaults and meaning in :class:`~ctrl_csc.nn.stage.DecoderStageOptions`
            (keyword-only; the solver options are used by ``inverse_csc``).
        norm: normalisation after the stage (not after the last stage); ``None`` uses the decoder's
            ``norm``.
        activation: nonlinearity after the norm (not after the last stage); ``"auto"`` means
            ``"relu"`` after a ``synthesis`` stage (a transposed convolution is linear) and
            ``"none"`` after an ``inverse_csc`` stage (its prox is the nonlinearity).
    """

    in_channels: int
    norm: str | None = None
    activation: str = "auto"

    def resolved_activation(self) -> str:
        if self.activation == "auto":
            return "relu" if self.kind == "synthesis" else "none"
        return self.activation


S = TypeVar("S", CSCStageSpec, DeconvStageSpec)


def _check_spec(spec: CSCStageSpec | DeconvStageSpec, where: str) -> None:
    """What the model adds around the layer's options (those were validated when the spec was
    made): the channels, ``norm`` and ``activation``."""
    channels = "out_channels" if isinstance(spec, CSCStageSpec) else "in_channels"
    check_channels(getattr(spec, channels), f"{where}.{channels}")
    if spec.norm is not None and spec.norm not in NORMS:
        raise ValueError(f"{where}.norm must be one of {NORMS} or null, got {spec.norm!r}")
    if isinstance(spec, CSCStageSpec):
        if spec.activation not in ACTIVATIONS:
            raise ValueError(
                f"{where}.activation must be one of {ACTIVATIONS}, got {spec.activation!r}"
            )
    elif spec.activation != "auto" and spec.activation not in ACTIVATIONS:
        raise ValueError(
            f"{where}.activation must be 'auto' or one of {ACTIVATIONS}, got {spec.activation!r}"
        )


def parse_stages(
    stages: Sequence[Mapping[str, Any] | S],
    cls: type[S],
    setting: str = "stages",
    defaults: Mapping[str, Any] | None = None,
) -> list[S]:
    """Validate ``stages`` (mappings or ``cls`` instances) into a list of ``cls``.

    ``defaults`` are keys merged into every *mapping* stage (the stage's own keys win), so a
    config can state shared options once (``stage_defaults: {lmbda: 0.1, n_iter: 2}``) and a sweep
    can change them for all stages at once. Raises ``ValueError`` naming ``{setting}[i]`` for an
    empty list, an unknown key, a missing required key or an invalid value.
    """
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or len(stages) == 0:
        raise ValueError(f"{setting} must be a non-empty list of stage specs, got {stages!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    base = {} if defaults is None else {str(k): v for k, v in defaults.items()}
    unknown = sorted(set(base) - names)
    if unknown:
        raise ValueError(
            f"{setting.rsplit('.', 1)[0]}.stage_defaults: unknown keys {unknown}; "
            f"valid keys: {sorted(names)}"
        )
    out: list[S] = []
    for i, raw in enumerate(stages):
        where = f"{setting}[{i}]"
        if isinstance(raw, cls):
            spec = raw
        elif isinstance(raw, Mapping):
            unknown = sorted(set(map(str, raw.keys())) - names)
            if unknown:
                raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {sorted(names)}")
            try:
                spec = cls(**{**base, **{str(k): v for k, v in raw.items()}})
            except OptionError as err:
                raise ValueError(err.at(where)) from None
            except TypeError as err:
                raise ValueError(f"{where}: {err}") from None
        else:
            raise ValueError(f"{where} must be a mapping or a {cls.__name__}, got {raw!r}")
        _check_spec(spec, where)
        out.append(spec)
    return out


# ---- the model configs' shape ------------------------------------------------------------------
#: The model-level keys of the csc_ctrl_* configs' shape (conf/model/csc/base.yaml). They act
#: only through the stages they make (model.encoder / model.decoder), which is how checkpoints
#: and releases are compared: runs saved before these keys existed still match.
CONFIG_SHAPE_KEYS = ("widths", "first_stage", "kernel_size")
#: Geometry an encoder stage's mirror in the decoder keeps (the rest — λ, init_std… — is per role).
_MIRRORED = ("stride", "kernel_size", "padding")


def encoder_stages(widths: Sequence[int], first_stage: Mapping[str, Any] | None = None) -> list:
    """The encoder stages of a ``csc_ctrl_*`` config from its ``widths`` (atoms per stage, fine to
    coarse): each halves the resolution (stride 2); ``first_stage`` adds keys to the first one.
    The config resolver ``${csc_stages:widths,first_stage}``."""
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
        raise ValueError(f"model.widths must be a non-empty list of stage widths, got {widths!r}")
    stages = [{"out_channels": w, "stride": 2} for w in widths]
    stages[0].update(dict(first_stage or {}))
    return stages


def mirrored_stages(stages: Sequence[Mapping[str, Any]]) -> list:
    """The decoder stages mirroring encoder ``stages``: coarse to fine, each taking the channels
    its encoder stage makes and keeping its geometry; the last a ``synthesis`` stage (the image),
    the one before it without a norm (docs/design.md §5). The config resolver
    ``${csc_mirror:encoder.stages}``."""
    out = [
        {"in_channels": s["out_channels"], **{k: s[k] for k in _MIRRORED if k in s}}
        for s in reversed(list(stages))
    ]
    if len(out) >= 2:
        out[-2]["norm"] = "none"  # tanh saturated after a batch-normalised input (method.md §2)
    out[-1]["kind"] = "synthesis"
    return out


def register_resolvers() -> None:
    """Register ``csc_stages`` and ``csc_mirror`` with OmegaConf (done on importing
    :mod:`ctrl_csc.models`; the ``conf/model/csc/`` bases use them)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    def plain(value: Any) -> Any:
        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
        return value

    # returned as a ListConfig, so that a stage reads like any config node (stages[0].kind)
    OmegaConf.register_new_resolver(
        "csc_stages",
        lambda w, first=None: OmegaConf.create(encoder_stages(plain(w), plain(first))),
        replace=True,
    )
    OmegaConf.register_new_resolver(
        "csc_mirror",
        lambda stages: OmegaConf.create(mirrored_stages(plain(stages))),
        replace=True,
    )
