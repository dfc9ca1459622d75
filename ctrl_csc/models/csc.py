"""CSC-CTRL encoder and decoder: stacks of convolutional-sparse-coding stages.

Encoder ``f`` (docs/design.md, §5 "Encoder and decoder"): image ``(N, C, H, W)`` → CSC stages
(each an unrolled ISTA/FISTA solver of a convolutional Lasso, :class:`ctrl_csc.nn.CSCLayer`;
stride 1 or 2; optional normalisation between stages) → flatten → ``Linear`` → ``(N, d)`` →
normalised onto the unit sphere.

Decoder ``g``: ``(N, d)`` → ``Linear`` → reshape to the first decoder stage's code
``(N, C_0, h_0, w_0)`` → sparse-deconvolution stages (:class:`ctrl_csc.nn.SparseDeconvLayer`,
``synthesis`` or ``inverse_csc``, each upsampling by its stride to an exact ``output_size``) →
``tanh`` → image ``(N, C, H, W)`` in ``[-1, 1]``.

All spatial sizes are computed from ``image_size`` and the stage geometry at construction, so one
stage list serves e.g. both 28 and 32 px; an image size the stages cannot take (a code would shrink
below 1x1) is reported then, naming ``dataset.image_size``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ctrl_csc.nn.solver import UnrolledLasso
from ctrl_csc.nn.stage import code_size

from ._common import (
    ImageDecoder,
    ImageEncoder,
    make_activation,
    make_norm,
    make_output_activation,
)
from .specs import CSCStageSpec, DeconvStageSpec, parse_stages

__all__ = ["CSCEncoder", "CSCDecoder"]


def _stage_size(
    size: tuple[int, int], spec: CSCStageSpec | DeconvStageSpec, where: str, image_size: Any
) -> tuple[int, int]:
    """Code size after a conv2d-arithmetic stage; ``ValueError`` if it falls below 1x1."""
    return code_size(
        size, spec.kernel_size, spec.stride, spec.padding, f"this model ({where})",
        source=f"dataset.image_size={image_size}",
        advice="use a larger image size or a model config with fewer strided stages",
    )  # fmt: skip


#: What every CSC-CTRL stage gets unless the model's ``stage_defaults`` or the stage itself says
#: otherwise: the settings of the shipped configs, which learn (experiments/notes/method.md). They
#: differ from the layers' own defaults (``CSCLayer``: FISTA, absolute λ), which are the Lasso as
#: written: ISTA (at T = 2 FISTA is the same), λ as a fraction of each sample's λ_max (without norms
#: between the stages each stage has its own scale: an absolute λ left the second stage 0.17 %
#: non-zero, notes §5) and non-negative codes in both players.
MODEL_STAGE_DEFAULTS: dict[str, Any] = {
    "algorithm": "ista",
    "lmbda_relative": True,
    "nonnegative": True,
}
#: The kernel of a stride-2 stage that sets none: 4x4 at padding 1, divisible by the stride so
#: that every output phase gets the same taps (the layers' 3x3 gives a phase-dependent
#: checkerboard); stride-1 stages keep the layers' 3x3 at padding 1, which keeps the size.
STRIDE2_KERNEL = {"kernel_size": 4, "padding": 1}


def _stage_mappings(
    stages: Sequence[Any], stage_defaults: Mapping[str, Any] | None
) -> tuple[list[Any], dict[str, Any]]:
    """``(stages, defaults)`` for :func:`parse_stages`: :data:`MODEL_STAGE_DEFAULTS` below the
    caller's ``stage_defaults``, and :data:`STRIDE2_KERNEL` for mapping stages of stride 2 whose
    kernel neither they nor ``stage_defaults`` set."""
    given = dict(stage_defaults or {})
    out = []
    for raw in stages:
        if (
            isinstance(raw, Mapping)
            and raw.get("stride", given.get("stride", 1)) == 2
            and "kernel_size" not in raw
            and "kernel_size" not in given
        ):
            kernel = dict(STRIDE2_KERNEL)
            if "padding" in raw or "padding" in given:
                del kernel["padding"]
            raw = {**raw, **kernel}
        out.append(raw)
    return out, {**MODEL_STAGE_DEFAULTS, **given}


def _build(where: str, cls: type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """``cls(*args, **kwargs)`` with a ``ValueError`` from the layer prefixed by the stage's
    setting."""
    try:
        return cls(*args, **kwargs)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _position_defaults(stages: list[Any], given: Mapping[str, Any] | None) -> list[Any]:
    """The decoder's position-dependent defaults (see :class:`CSCDecoder`), each where neither
    the stage nor the caller's ``stage_defaults`` (``given``) sets it: the last stage a signed
    ``synthesis`` stage, the one before it without a norm."""
    given = given or {}
    out = list(stages)

    def fill(i: int, key: str, value: Any) -> None:
        if isinstance(out[i], Mapping) and key not in out[i] and key not in given:
            out[i] = {**out[i], key: value}

    if out:
        fill(-1, "kind", "synthesis")
        fill(-1, "nonnegative", False)
    if len(out) >= 2:
        fill(-2, "norm", "none")
    return out


def _number_or_auto(value: Any, setting: str) -> float | None:
    """``None`` for ``"auto"``, else ``value`` checked to be a finite number > 0."""
    if isinstance(value, str) and value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{setting} must be a finite number > 0 or 'auto', got {value!r}")
    return float(value)


@torch.no_grad()
def _two_step_input_ratio(
    model: nn.Module, reads: Callable[[nn.Module], nn.Module], probe: Tensor, setting: str
) -> float:
    """``mean |u|`` of the input ``u`` of the submodule ``reads(model)`` for ``model(probe)`` with
    every unrolled solver at 2 ISTA steps, over the same with the solvers as they are, each on a
    fresh copy of ``model`` (so each is its first forward: ``model``'s own solver and norm state
    is left as it was). 1 without measuring when every solver already runs 2 steps (FISTA's first
    momentum weight is 0: its 2 steps are ISTA's), and on the meta device (a model built to check
    shapes only)."""
    solvers = [m for m in model.modules() if isinstance(m, UnrolledLasso)]
    if any(p.is_meta for p in model.parameters()) or all(m.n_iter == 2 for m in solvers):
        return 1.0

    def scale(two_steps: bool) -> Tensor:
        twin, seen = copy.deepcopy(model), []
        for m in twin.modules():
            if isinstance(m, UnrolledLasso):
                m.compile = False  # a measurement, not worth a compilation
                if two_steps:
                    m.n_iter, m.algorithm = 2, "ista"
        reads(twin).register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        twin(probe)
        return seen[0].abs().mean()

    ratio = float(scale(True) / scale(False))
    if not 0 < ratio < math.inf:
        raise ValueError(
            f"{setting}='auto' measured a zero or non-finite scale for its fixed probe (at the "
            "stages' own settings or at 2 steps); give it a number"
        )
    return ratio


def _probe(shape: Sequence[int], like: Tensor) -> Tensor:
    """Standard Gaussian values of ``shape`` from a fixed seed, on ``like``'s device and dtype."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x.to(device=like.device, dtype=like.dtype)


class _SavedScale(nn.Module):
    """A module with 0-dim buffers added to the state dict after models were saved: a state
    dict without one loads it as ``self._scale_before_buffer[name]``, the value its model ran
    with."""

    _scale_before_buffer: dict[str, float]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # noqa: D401 - torch hook
        for name, value in self._scale_before_buffer.items():
            state_dict.setdefault(prefix + name, torch.tensor(value))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class CSCEncoder(_SavedScale, ImageEncoder):
    """CSC-CTRL encoder ``f``: images ``(N, in_channels, H, W)`` → features ``(N, feature_dim)``.

    Args:
        in_channels: image channels ``C`` (``dataset.channels``).
        image_size: image side ``H = W`` or ``(H, W)`` (``dataset.image_size``).
        stages: CSC stages, first to last, as mappings or :class:`CSCStageSpec` (keys: see
            there). Stage ``i`` maps ``(N, C_{i-1}, H_{i-1}, W_{i-1})`` to
            ``(N, out_channels_i, H_i, W_i)``.
        feature_dim: feature dimension ``d``.
        norm: default normalisation after every stage: ``"batch" | "group" | "none"`` (a stage's
            own ``norm`` overrides it). ``"none"`` by default: batch norm between the stages kept
            the game from starting (csc_ctrl_mini: 6.3 dB against 10.3 without; notes §6).
        norm_groups: groups of ``"group"`` norm.
        negative_slope: slope of ``"leaky_relu"`` stage activations.
        normalize: project the features onto the unit sphere (``F.normalize``); ``False`` returns
            the raw ``Linear`` output (e.g. for an autoencoder).
        stage_defaults: keys merged into every mapping in ``stages`` (a stage's own keys win),
            e.g. ``{lmbda: 0.1, n_iter: 2}``, on top of :data:`MODEL_STAGE_DEFAULTS`.
        projection: ``True``: a learned ``Linear`` maps the flattened last code to
            ``feature_dim``; ``False``: the flattened last code *is* the feature (before the
            sphere), so ``feature_dim`` must equal ``C_last·H_last·W_last`` and the encoder's
            only weights are its dictionaries (and norms).
        projection_init_scale: the projection's initial weight is PyTorch's default times this
            (its bias is left as it is), so that at the start every image's feature lies close
            to the bias's direction and the decoder's first output already has the same feature:
            the game starts where the critic cannot yet tell images apart. The image-dependent
            part of the initial features grows with the codes' scale, and so with the unroll
            depth ``T``; with PyTorch's scale (1) the game on digits failed at ``T = 5``, and at
            ``T = 2`` with the bias set to zero; with 0.1 ``T = 2, 5, 10`` learn and ``T = 2``
            gains 1 dB (experiments/notes/sparse_deep.md §2).
        projection_rate: the projection reads ``projection_rate · c`` (``c`` the flattened last
            code), its initial weight divided by the same factor: the same initial features, and
            an optimiser that moves every weight by about its learning rate per step, as Adam
            does, turns the features ``projection_rate`` times slower (the bias as before). The
            features' rate of turn grows with ``‖c‖₁``, and ISTA from zero makes the last code
            larger with every step: on digits ~4.6x T = 2's at T = 5 and ~10x at T = 10. An
            encoder at T = 10 rose to 17.4 dB and fell to 16.3 by step 500 at 1; at 0.1 it held
            20.1 (T = 2: 21.3 at 1, 20.6 at 0.1; experiments/notes/sparse_deep.md §14).
            ``"auto"`` (the default): T = 2's last-code scale over this encoder's, measured once
            at construction on a fixed batch of Gaussian images (the same stages, dictionaries
            and λ, every stage at 2 ISTA steps; data-independent: on digits and photos the
            ratio from images is within 10 % of it), so that every depth turns its features at
            T = 2's rate: exactly 1 when every stage runs 2 steps (no measurement), ~0.23 at
            T = 5, ~0.12 at T = 10 for csc_ctrl_mini. The value is the buffer
            ``projection_rate`` (saved with the weights; a state dict from before it existed
            loads as 1, the rate it was trained at, unless a number was given here).

    Attributes:
        stages: ``nn.ModuleList`` of :class:`ctrl_csc.nn.CSCLayer` (the dictionaries are their
            ``.weight``, shape ``(out_channels, in_channels, k, k)``).
        specs: the parsed :class:`CSCStageSpec` list.
        code_sizes: ``[(H_i, W_i)]`` of every stage's code.
        code_shape: ``(C_last, H_last, W_last)`` of the last code.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int | Sequence[int],
        stages: Sequence[Mapping[str, Any] | CSCStageSpec],
        feature_dim: int = 128,
        norm: str = "none",
        norm_groups: int = 8,
        negative_slope: float = 0.2,
        normalize: bool = True,
        stage_defaults: Mapping[str, Any] | None = None,
        projection: bool = True,
        projection_init_scale: float = 0.1,
        projection_rate: float | str = "auto",
    ) -> None:
        super().__init__(in_channels, image_size, feature_dim, normalize)
        from ctrl_csc.nn import CSCLayer

        if isinstance(projection_init_scale, bool) or not projection_init_scale >= 0:
            raise ValueError(
                f"model.encoder.projection_init_scale must be a number >= 0, got "
                f"{projection_init_scale!r}"
            )
        rate = _number_or_auto(projection_rate, "model.encoder.projection_rate")
        if not projection and rate not in (None, 1):
            raise ValueError(
                "model.encoder.projection_rate scales the projection's input, but "
                "model.encoder.projection=false has none; leave projection_rate at 'auto' or 1"
            )
        # a state dict saved before the buffer existed was trained at 1 unless a number was given
        self._scale_before_buffer = {"projection_rate": 1.0 if rate is None else rate}

        stages, defaults = _stage_mappings(stages, stage_defaults)
        self.specs = parse_stages(stages, CSCStageSpec, "model.encoder.stages", defaults)
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.activations = nn.ModuleList()
        self.code_sizes: list[tuple[int, int]] = []
        c, size = self.in_channels, self.image_size
        for i, spec in enumerate(self.specs):
            where = f"model.encoder.stages[{i}]"
            size = _stage_size(size, spec, where, image_size)
            self.stages.append(_build(where, CSCLayer, c, spec.out_channels, options=spec))
            self.norms.append(
                make_norm(
                    norm if spec.norm is None else spec.norm,
                    spec.out_channels,
                    norm_groups,
                    f"{where}.norm",
                )
            )
            self.activations.append(
                make_activation(spec.activation, negative_slope, f"{where}.activation")
            )
            self.code_sizes.append(size)
            c = spec.out_channels
        self.code_shape = (c, *size)
        flat = c * size[0] * size[1]
        self.register_buffer("projection_rate", torch.tensor(1.0 if rate is None else rate))
        if projection:
            self.projection: nn.Module = nn.Linear(flat, self.feature_dim)
            if rate is None:  # auto: what the projection reads, T = 2's over this encoder's
                probe = _probe((8, self.in_channels, *self.image_size), self.projection.weight)
                rate = _two_step_input_ratio(
                    self, lambda m: m.projection, probe, "model.encoder.projection_rate"
                )
                self.projection_rate.fill_(rate)
            with torch.no_grad():
                self.projection.weight.mul_(float(projection_init_scale) / rate)
        elif flat != self.feature_dim:
            raise ValueError(
                f"model.encoder.projection=false makes the last code ({c}x{size[0]}x{size[1]} = "
                f"{flat} values) the feature, but model.encoder.feature_dim={self.feature_dim}; "
                f"set feature_dim: {flat} or projection: true"
            )
        else:
            self.projection = nn.Identity()

    def _run(self, x: Tensor, outs: list[Tensor] | None) -> Tensor:
        self.check_input(x)
        h = x
        for layer, norm, act in zip(self.stages, self.norms, self.activations):
            z = layer(h)
            if outs is not None:
                outs.append(z)
            h = act(norm(z))
        return self._finish(self.projection(h.flatten(1) * self.projection_rate))

    def dictionary_misfit(self, x: Tensor) -> Tensor:
        """``Σ_l mean_i (1 − ⟨u, D_l c⟩² / (‖u‖² ‖D_l c‖²))``: for every stage ``l``, the share of
        its input ``u`` (for image ``x_i``) that the synthesis ``D_l c`` of its own code misses at
        the best scale. Inputs and codes are taken without gradient, so the value is
        differentiable in the dictionaries alone: their fit to what each stage codes, which the
        game itself does not ask for (:class:`~ctrl_csc.engine.CTRLStep`'s ``dictionary_beta``).
        In training mode the stages' norms and solvers update their state as in ``forward``;
        :class:`~ctrl_csc.engine.CTRLStep` runs it with that state frozen."""
        with torch.no_grad():
            codes = self.stage_outputs(x)
            inputs = [x] + [
                act(norm(c)) for c, norm, act in zip(codes[:-1], self.norms, self.activations)
            ]
        total = x.new_zeros((), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        for layer, u, c in zip(self.stages, inputs, codes, strict=True):
            fit = layer.synthesize(c, u.shape[-2:]).flatten(1).to(total.dtype)
            u = u.flatten(1).to(total.dtype)
            cos2 = (u * fit).sum(1).pow(2) / (u.pow(2).sum(1) * fit.pow(2).sum(1)).clamp_min(1e-12)
            total = total + (1 - cos2).mean()
        return total


class CSCDecoder(_SavedScale, ImageDecoder):
    """CSC-CTRL decoder ``g``: features ``(N, feature_dim)`` → images ``(N, out_channels, H, W)``.

    Args:
        out_channels: image channels ``C`` (``dataset.channels``).
        image_size: image side ``H = W`` or ``(H, W)`` (``dataset.image_size``).
        stages: sparse-deconvolution stages in the order applied (coarse to fine), as mappings or
            :class:`DeconvStageSpec`. Stage ``j`` maps ``in_channels_j`` channels to
            ``in_channels_{j+1}`` (the last one to ``out_channels``), upsampling by its stride;
            mirror the encoder by listing its stages in reverse with ``in_channels`` = the encoder
            stage's ``out_channels`` and the same kernel/stride, so every size matches.
        feature_dim: feature dimension ``d``.
        norm: default normalisation after the projection and after every stage but the last
            (``"batch" | "group" | "none"``; a stage's own ``norm`` overrides it).
        norm_groups: groups of ``"group"`` norm.
        negative_slope: slope of ``"leaky_relu"`` activations.
        projection_activation: nonlinearity after the projection's norm (``"relu"`` by default:
            the first stage then reads a non-negative code, like the encoder's).
        output_activation: ``"tanh"`` (images in ``(-1, 1)``), ``"hardtanh"`` (clamp to
            ``[-1, 1]``) or ``"none"`` (unbounded).
        projection: ``True``: a learned ``Linear`` maps the feature to the first stage's code;
            ``False``: the feature *is* that code (``feature_dim`` must equal ``C_0·h_0·w_0``),
            the mirror of the encoder's ``projection: false``.
        last_stage_gain: the last stage reads ``last_stage_gain · h`` (``h`` the output of the
            stage before it, which has no norm by default, or of the projection). Its atoms are
            unit-norm, so the image before the output activation has ``h``'s scale, and ISTA
            from zero makes the inverse-CSC stages' codes larger with every step: at
            initialisation on digits the pre-tanh image's mean ``|x|`` is 0.70 at T = 2 and 1.21
            at T = 5, deeper in tanh's saturation. ``"auto"`` (the default): T = 2's scale of
            ``h`` over this decoder's, measured once at construction for 8 Gaussian features
            on the sphere from a fixed seed (every inverse-CSC stage at 2 ISTA steps against
            their own settings), so that every depth starts with T = 2's image scale: exactly 1
            when every stage runs 2 steps (no measurement), ~0.59 at T = 5 and ~1.7 at T = 1
            for csc_ctrl_mini. Both players on digits (seeds 0 / 1): at T = 5 20.89 / 20.94 dB
            with it, 20.40 / 20.59 without; at T = 1 16.91 against 12.46
            (experiments/notes/sparse_deep.md §15). The buffer ``last_stage_gain``, saved with
            the weights (a state dict from before it existed loads as 1 unless a number was
            given here).
        stage_defaults: keys merged into every mapping in ``stages`` (a stage's own keys win),
            e.g. ``{kind: inverse_csc, lmbda: 0.1}``, on top of :data:`MODEL_STAGE_DEFAULTS`.
            Defaults that depend on the position, each unless the stage or ``stage_defaults``
            says otherwise: the last stage is a signed ``synthesis`` stage (it makes the image;
            a non-negative sparse code would not be one), and the stage before it has no norm
            (the last stage sums ``C_in·k²/s²`` unit-norm taps of its input, which a norm makes
            unit-variance, and tanh saturated: 56 % of the pixels at ``|x̂| > 0.99`` in
            csc_ctrl_32 at initialisation, 8.6 % without; notes §2).

    Attributes:
        stages: ``nn.ModuleList`` of :class:`ctrl_csc.nn.SparseDeconvLayer`.
        specs: the parsed :class:`DeconvStageSpec` list.
        out_sizes: ``[(H_j, W_j)]`` each stage outputs (the last is ``image_size``).
        code_shape: ``(C_0, h_0, w_0)`` the projection is reshaped to.
    """

    def __init__(
        self,
        out_channels: int,
        image_size: int | Sequence[int],
        stages: Sequence[Mapping[str, Any] | DeconvStageSpec],
        feature_dim: int = 128,
        norm: str = "batch",
        norm_groups: int = 8,
        negative_slope: float = 0.2,
        projection_activation: str = "relu",
        output_activation: str = "tanh",
        stage_defaults: Mapping[str, Any] | None = None,
        projection: bool = True,
        last_stage_gain: float | str = "auto",
    ) -> None:
        super().__init__(out_channels, image_size, feature_dim)
        from ctrl_csc.nn import SparseDeconvLayer

        gain = _number_or_auto(last_stage_gain, "model.decoder.last_stage_gain")
        self._scale_before_buffer = {"last_stage_gain": 1.0 if gain is None else gain}

        stages, defaults = _stage_mappings(stages, stage_defaults)
        stages = _position_defaults(stages, stage_defaults)
        self.specs = parse_stages(stages, DeconvStageSpec, "model.decoder.stages", defaults)
        final_act = make_output_activation(output_activation)
        n = len(self.specs)
        # Sizes, fine to coarse: the input of stage j is what conv2d arithmetic makes of its output.
        self.out_sizes: list[tuple[int, int]] = [self.image_size] * n
        size = self.image_size
        for j in range(n - 1, -1, -1):
            self.out_sizes[j] = size
            size = _stage_size(size, self.specs[j], f"model.decoder.stages[{j}]", image_size)
        c0 = self.specs[0].in_channels
        self.code_shape = (c0, *size)
        flat = c0 * size[0] * size[1]
        if projection:
            self.projection: nn.Module = nn.Linear(self.feature_dim, flat)
        elif flat != self.feature_dim:
            raise ValueError(
                f"model.decoder.projection=false reads the feature as the first stage's code "
                f"({c0}x{size[0]}x{size[1]} = {flat} values), but model.decoder.feature_dim="
                f"{self.feature_dim}; set feature_dim: {flat} or projection: true"
            )
        else:
            self.projection = nn.Identity()
        self.projection_norm = make_norm(norm, c0, norm_groups, "model.decoder.norm")
        self.projection_act = make_activation(
            projection_activation, negative_slope, "model.decoder.projection_activation"
        )
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.activations = nn.ModuleList()
        for j, spec in enumerate(self.specs):
            where = f"model.decoder.stages[{j}]"
            last = j == n - 1
            c_out = self.out_channels if last else self.specs[j + 1].in_channels
            self.stages.append(
                _build(where, SparseDeconvLayer, spec.in_channels, c_out, options=spec)
            )
            if last:
                self.norms.append(nn.Identity())
                self.activations.append(final_act)
            else:
                self.norms.append(
                    make_norm(
                        norm if spec.norm is None else spec.norm,
                        c_out,
                        norm_groups,
                        f"{where}.norm",
                    )
                )
                self.activations.append(
                    make_activation(
                        spec.resolved_activation(), negative_slope, f"{where}.activation"
                    )
                )
        self.output_activation = output_activation
        self.register_buffer("last_stage_gain", torch.tensor(1.0 if gain is None else gain))
        if gain is None:  # auto: what the last stage reads, T = 2's over this decoder's
            probe = _probe((8, self.feature_dim), self.stages[0].weight)
            self.last_stage_gain.fill_(
                _two_step_input_ratio(
                    self,
                    lambda m: m.stages[-1],
                    nn.functional.normalize(probe, dim=1),
                    "model.decoder.last_stage_gain",
                )
            )

    def _run(self, z: Tensor, outs: list[Tensor] | None) -> Tensor:
        self.check_input(z)
        h = self.projection(z).view(z.shape[0], *self.code_shape)
        h = self.projection_act(self.projection_norm(h))
        last = len(self.stages) - 1
        for j, (layer, norm, act, size) in enumerate(
            zip(self.stages, self.norms, self.activations, self.out_sizes)
        ):
            v = layer(h * self.last_stage_gain if j == last else h, output_size=size)
            if outs is not None:
                outs.append(v)
            h = act(norm(v))
        return h

    def _is_code(self) -> list[bool]:
        """``inverse_csc`` stages output a sparse code; ``synthesis`` stages a plain synthesis."""
        return [layer.kind == "inverse_csc" for layer in self.stages]
