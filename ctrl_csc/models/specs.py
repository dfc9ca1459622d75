"""Stage specifications of the CSC encoder and the sparse-deconvolution decoder.

A model config lists its stages as plain mappings (YAML dicts); :func:`parse_stages` turns each into
a typed, validated dataclass so a misspelt key or an unknown option is reported with the stage's
position instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ctrl_csc.nn.solver import ALGORITHMS

from ._common import ACTIVATIONS, NORMS

__all__ = ["CSCStageSpec", "DeconvStageSpec", "parse_stages"]

DECODER_KINDS = ("synthesis", "inverse_csc")


@dataclass(frozen=True)
class CSCStageSpec:
    """One CSC stage of :class:`~ctrl_csc.models.CSCEncoder` (a :class:`ctrl_csc.nn.CSCLayer`).

    The stage maps ``(N, C_prev, H, W)`` to a code ``(N, out_channels, h, w)``,
    ``h = floor((H + 2p - k) / stride) + 1`` (``= ceil(H / stride)`` for odd ``k`` and the default
    ``p = k // 2``). The code goes through ``norm`` then ``activation`` before the next stage (or
    the final projection).

    Attributes:
        out_channels: number of atoms / code channels.
        kernel_size, stride, padding: geometry of the dictionary (``padding=None``: ``k // 2``).
        lmbda, mu: ℓ1 and ℓ2 weights of the convolutional Lasso / elastic net.
        n_iter: unrolled ISTA/FISTA iterations ``T``.
        algorithm: ``"ista"`` or ``"fista"``.
        nonnegative: non-negative codes (one-sided shrinkage).
        normalize_atoms: each atom ``A[j]`` kept at unit norm.
        learn_lmbda, learn_step: λ / step size are trainable parameters.
        power_iters, init_power_iters: power-iteration steps per training forward / at init.
        lmbda_relative: ``lmbda`` is a fraction (``< 1``) of each sample's ``λ_max = ‖Dᵀu‖_∞``.
        init_std: initial std of the stored atoms' entries (``None``: unit-norm atoms).
        backward: gradients through the solver: ``"unrolled"`` | ``"checkpoint"`` (same
            gradients, ``O(√T)`` saved memory) | ``"implicit"`` (the converged solution's
            gradient, constant memory, no ``learn_step``); validated by the layer.
        compile: fuse each iteration's elementwise work with ``torch.compile``.
        norm: normalisation after the stage (``"batch" | "group" | "none"``); ``None`` uses the
            encoder's ``norm``.
        activation: nonlinearity after the norm (``"none"`` by default: the prox is the
            nonlinearity).
    """

    out_channels: int
    kernel_size: int = 3
    stride: int = 1
    padding: int | None = None
    lmbda: float = 0.1
    mu: float = 0.0
    n_iter: int = 2
    algorithm: str = "fista"
    nonnegative: bool = True
    normalize_atoms: bool = True
    learn_lmbda: bool = False
    learn_step: bool = False
    power_iters: int = 1
    init_power_iters: int = 50
    lmbda_relative: bool = False
    init_std: float | None = None
    backward: str = "unrolled"
    compile: bool = False
    norm: str | None = None
    activation: str = "none"

    def layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`ctrl_csc.nn.CSCLayer` (without ``in_channels``)."""
        skip = {"norm", "activation"}
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }


@dataclass(frozen=True)
class DeconvStageSpec:
    """One stage of :class:`~ctrl_csc.models.CSCDecoder` (a :class:`ctrl_csc.nn.SparseDeconvLayer`).

    Decoder stages are listed in the order they are applied (coarse to fine). A stage takes
    ``in_channels`` channels — the mirror of an encoder stage's ``out_channels`` — and produces the
    next stage's ``in_channels`` channels, the last one the image channels. It upsamples by
    ``stride``; the decoder passes ``output_size`` so that every size matches the encoder's exactly.

    Attributes:
        in_channels: channels of the code this stage takes.
        kernel_size, stride, padding: geometry of its dictionary (``padding=None``: ``k // 2``).
        kind: ``"synthesis"`` (``x = D' z``, a transposed convolution) or ``"inverse_csc"``
            (unrolled sparse coding that upsamples).
        lmbda, mu, n_iter, algorithm, nonnegative, normalize_atoms, learn_lmbda, learn_step,
            power_iters, init_power_iters, lmbda_relative, backward, compile: solver options
            (used by ``inverse_csc``).
        init_std: initial std of the stored atoms' entries (``None``: unit-norm atoms).
        norm: normalisation after the stage (not after the last stage); ``None`` uses the decoder's
            ``norm``.
        activation: nonlinearity after the norm (not after the last stage); ``"auto"`` means
            ``"relu"`` after a ``synthesis`` stage (a transposed convolution is linear) and
            ``"none"`` after an ``inverse_csc`` stage (its prox is the nonlinearity).
    """

    in_channels: int
    kernel_size: int = 3
    stride: int = 1
    padding: int | None = None
    kind: str = "inverse_csc"
    lmbda: float = 0.1
    mu: float = 0.0
    n_iter: int = 2
    algorithm: str = "fista"
    nonnegative: bool = False
    normalize_atoms: bool = True
    learn_lmbda: bool = False
    learn_step: bool = False
    power_iters: int = 1
    init_power_iters: int = 50
    lmbda_relative: bool = False
    init_std: float | None = None
    backward: str = "unrolled"
    compile: bool = False
    norm: str | None = None
    activation: str = "auto"

    def layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`ctrl_csc.nn.SparseDeconvLayer` (without channels)."""
        skip = {"in_channels", "norm", "activation"}
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }

    def resolved_activation(self) -> str:
        if self.activation == "auto":
            return "relu" if self.kind == "synthesis" else "none"
        return self.activation


S = TypeVar("S", CSCStageSpec, DeconvStageSpec)


def _check_common(spec: CSCStageSpec | DeconvStageSpec, where: str) -> None:
    if spec.kernel_size < 1:
        raise ValueError(f"{where}.kernel_size must be >= 1, got {spec.kernel_size}")
    if spec.stride < 1:
        raise ValueError(f"{where}.stride must be >= 1, got {spec.stride}")
    if spec.padding is not None and spec.padding < 0:
        raise ValueError(f"{where}.padding must be >= 0 or null, got {spec.padding}")
    if spec.n_iter < 1:
        raise ValueError(f"{where}.n_iter must be >= 1, got {spec.n_iter}")
    if spec.lmbda < 0 or spec.mu < 0:
        raise ValueError(f"{where}.lmbda and .mu must be >= 0, got {spec.lmbda}, {spec.mu}")
    if spec.algorithm not in ALGORITHMS:
        raise ValueError(f"{where}.algorithm must be one of {ALGORITHMS}, got {spec.algorithm!r}")
    if spec.norm is not None and spec.norm not in NORMS:
        raise ValueError(f"{where}.norm must be one of {NORMS} or null, got {spec.norm!r}")


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
            except TypeError as err:
                raise ValueError(f"{where}: {err}") from None
        else:
            raise ValueError(f"{where} must be a mapping or a {cls.__name__}, got {raw!r}")
        _check_common(spec, where)
        if isinstance(spec, CSCStageSpec):
            if spec.out_channels < 1:
                raise ValueError(f"{where}.out_channels must be >= 1, got {spec.out_channels}")
            if spec.activation not in ACTIVATIONS:
                raise ValueError(
                    f"{where}.activation must be one of {ACTIVATIONS}, got {spec.activation!r}"
                )
        else:
            if spec.in_channels < 1:
                raise ValueError(f"{where}.in_channels must be >= 1, got {spec.in_channels}")
            if spec.kind not in DECODER_KINDS:
                raise ValueError(f"{where}.kind must be one of {DECODER_KINDS}, got {spec.kind!r}")
            if spec.activation != "auto" and spec.activation not in ACTIVATIONS:
                raise ValueError(
                    f"{where}.activation must be 'auto' or one of {ACTIVATIONS}, "
                    f"got {spec.activation!r}"
                )
        out.append(spec)
    return out
