"""What every encoder and decoder shares: their base classes and the pieces they are made of.

Size arithmetic, normalisation and activation layers, input validation, the per-stage codes and
their densities (the denoising corruption is :func:`ctrl_csc.nn.add_noise`).

Every encoder in :mod:`ctrl_csc.models` maps images ``(N, C, H, W)`` in ``[-1, 1]`` to features
``(N, feature_dim)`` (on the unit sphere unless built with ``normalize=False``); every decoder maps
``(N, feature_dim)`` back to ``(N, C, H, W)``. The base classes below hold what they all share: the
image geometry they were built for, the check that an input matches it (a ``ValueError`` naming
``dataset.channels`` / ``dataset.image_size`` and the model's setting), and
``forward_with_codes``, which returns every stage's code beside the output. The models keep no
state of their last forward: :func:`code_densities` turns returned codes into densities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "NORMS",
    "ACTIVATIONS",
    "ImageEncoder",
    "ImageDecoder",
    "as_size",
    "code_densities",
    "count_parameters",
    "make_activation",
    "make_norm",
    "make_output_activation",
]

NORMS = ("batch", "group", "none")
ACTIVATIONS = ("none", "relu", "leaky_relu", "tanh")
OUTPUT_ACTIVATIONS = ("tanh", "hardtanh", "none")


def as_size(image_size: int | Sequence[int], setting: str = "image_size") -> tuple[int, int]:
    """``image_size`` as ``(H, W)``: an int means a square image."""
    if isinstance(image_size, bool):
        raise ValueError(f"{setting} must be an int or a pair (H, W), got {image_size!r}")
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        try:
            size = tuple(int(s) for s in image_size)
        except TypeError:
            raise ValueError(
                f"{setting} must be an int or a pair (H, W), got {image_size!r}"
            ) from None
        if len(size) != 2:
            raise ValueError(f"{setting} must be an int or a pair (H, W), got {image_size!r}")
    if min(size) < 1:
        raise ValueError(f"{setting} must be positive, got {image_size!r}")
    return size  # type: ignore[return-value]


def make_norm(kind: str, channels: int, groups: int = 8, setting: str = "norm") -> nn.Module:
    """Normalisation layer over ``channels`` feature maps.

    ``"batch"``: ``BatchNorm2d``; ``"group"``: ``GroupNorm`` with ``min(groups, channels)`` groups
    (which must divide ``channels``); ``"none"``: identity.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        g = min(groups, channels)
        if channels % g != 0:
            raise ValueError(
                f"{setting}='group' with norm_groups={groups} does not divide {channels} channels; "
                f"choose norm_groups dividing every stage's channel count"
            )
        return nn.GroupNorm(g, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"{setting} must be one of {NORMS}, got {kind!r}")


def make_activation(
    kind: str, negative_slope: float = 0.2, setting: str = "activation"
) -> nn.Module:
    """``"none"`` (identity), ``"relu"``, ``"leaky_relu"`` (``negative_slope``) or ``"tanh"``."""
    if kind == "none":
        return nn.Identity()
    if kind == "relu":
        return nn.ReLU()
    if kind == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    if kind == "tanh":
        return nn.Tanh()
    raise ValueError(f"{setting} must be one of {ACTIVATIONS}, got {kind!r}")


def make_output_activation(
    kind: str, setting: str = "model.decoder.output_activation"
) -> nn.Module:
    """Final image nonlinearity: ``"tanh"`` (images in ``(-1, 1)``), ``"hardtanh"`` (clamp to
    ``[-1, 1]``) or ``"none"`` (unbounded)."""
    layers = {"tanh": nn.Tanh, "hardtanh": nn.Hardtanh, "none": nn.Identity}
    if kind not in layers:
        raise ValueError(f"{setting} must be one of {OUTPUT_ACTIVATIONS}, got {kind!r}")
    return layers[kind]()


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) scalar parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def code_densities(codes: Sequence[Tensor | None]) -> list[float | None]:
    """Per stage, the fraction of exact non-zero entries of its code (``None`` for ``None``: a
    stage whose output is not a code), as :meth:`ImageEncoder.forward_with_codes` returns them.

    The ratio is taken in float32, as the models reported it when they cached it.
    """
    return [
        None if c is None else float(torch.count_nonzero(c).to(torch.float32) / max(c.numel(), 1))
        for c in codes
    ]


class _StagedModel(nn.Module):
    """``forward_with_codes`` of a model made of ``self.stages`` (``forward`` is ``_run(x, None)``).

    Subclasses implement ``_run(x, outs)``, which returns the output and appends every stage's
    output to ``outs`` when it is a list, and say in ``_is_code`` which of those are codes.
    """

    stages: nn.ModuleList

    def __init__(self, image_size: int | Sequence[int], feature_dim: int) -> None:
        """Check and set the geometry: ``image_size`` ``(H, W)`` and ``feature_dim`` (the image
        channels are the subclass's: ``in_channels`` or ``out_channels``,
        :func:`_image_channels`)."""
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        self.image_size = as_size(image_size, "image_size (dataset.image_size)")
        self.feature_dim = int(feature_dim)

    def _run(self, x: Tensor, outs: list[Tensor] | None) -> Tensor:
        raise NotImplementedError

    def _is_code(self) -> list[bool]:
        """Per stage, whether its output is a code (every stage unless a subclass says)."""
        return [True] * len(self.stages)

    def forward_with_codes(self, x: Tensor) -> tuple[Tensor, list[Tensor | None]]:
        """``(forward(x), codes)``: ``codes[i]`` is stage ``i``'s output ``(N, C_i, H_i, W_i)``,
        or ``None`` where that output is not a code (an image, a ``synthesis`` stage's output).

        The same computation as ``forward`` (with its graph); nothing is kept on the model. It
        calls ``_run`` directly: hooks on the model itself do not run, those on its stages do.
        """
        outs: list[Tensor] = []
        out = self._run(x, outs)
        return out, [o if code else None for o, code in zip(outs, self._is_code(), strict=True)]

    def stage_outputs(self, x: Tensor) -> list[Tensor]:
        """Every stage's output for ``x``, first stage first: the codes of
        :meth:`forward_with_codes` and also the outputs that are not codes (a ``synthesis``
        stage's; a decoder's last, the image before its output activation)."""
        outs: list[Tensor] = []
        self._run(x, outs)
        return outs


def _image_channels(channels: int, setting: str) -> int:
    """The image channels of a model (``dataset.channels``), checked ``>= 1``."""
    if channels < 1:
        raise ValueError(f"{setting} (dataset.channels) must be >= 1, got {channels}")
    return int(channels)


class ImageEncoder(_StagedModel):
    """Base class of the encoders: geometry, input check, codes.

    Subclasses set ``self.stages`` (``nn.ModuleList``) and implement ``_run(x, outs)``, which
    returns the features and appends each stage's code to ``outs`` when it is a list.

    Attributes:
        in_channels: image channels ``C`` the model takes.
        image_size: ``(H, W)`` the model takes.
        feature_dim: output feature dimension ``d``.
        normalize: whether features are projected onto the unit sphere.
    """

    in_channels: int

    def __init__(
        self, in_channels: int, image_size: int | Sequence[int], feature_dim: int, normalize: bool
    ) -> None:
        super().__init__(image_size, feature_dim)
        self.in_channels = _image_channels(in_channels, "in_channels")
        self.normalize = bool(normalize)

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(N, in_channels, H, W)`` with ``(H, W) ==
        image_size``; the message names the data setting and the model setting."""
        name = type(self).__name__
        if x.dim() != 4:
            raise ValueError(
                f"{name} expects a batch of images (N, C, H, W), got a tensor of shape "
                f"{tuple(x.shape)}"
            )
        c, h, w = x.shape[1:]
        if c != self.in_channels:
            raise ValueError(
                f"{name}: the images have {c} channels but the model was built for "
                f"in_channels={self.in_channels}; make dataset.channels and the model's "
                f"in_channels agree (expected {self.in_channels}, got {c})"
            )
        if (h, w) != self.image_size:
            raise ValueError(
                f"{name}: the images are {h}x{w} but the model was built for image_size="
                f"{self.image_size[0]}x{self.image_size[1]}; make dataset.image_size and the "
                f"model's image_size agree (expected {self.image_size[0]}x{self.image_size[1]}, "
                f"got {h}x{w})"
            )

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(N, C, H, W)`` in ``[-1, 1]`` → features ``(N, feature_dim)`` (unit norm when
        ``normalize``)."""
        return self._run(x, None)

    def _run_blocks(self, x: Tensor, outs: list[Tensor] | None) -> Tensor:
        """Check ``x``, run the blocks of ``self.stages`` (appending each output to ``outs`` when
        it is a list); return the last output."""
        self.check_input(x)
        h = x
        for block in self.stages:
            h = block(h)
            if outs is not None:
                outs.append(h)
        return h

    def _finish(self, h: Tensor) -> Tensor:
        return F.normalize(h, dim=1) if self.normalize else h


class ImageDecoder(_StagedModel):
    """Base class of the decoders: geometry, input check, codes.

    Subclasses set ``self.stages`` and implement ``_run(z, outs)`` like the encoders; a decoder
    whose last stage outputs the image sets ``last_stage_is_image`` (that output is no code).

    Attributes:
        out_channels: image channels ``C`` produced.
        image_size: ``(H, W)`` produced.
        feature_dim: input feature dimension ``d``.
    """

    last_stage_is_image = False
    out_channels: int

    def __init__(
        self, out_channels: int, image_size: int | Sequence[int], feature_dim: int
    ) -> None:
        super().__init__(image_size, feature_dim)
        self.out_channels = _image_channels(out_channels, "out_channels")

    def check_input(self, z: Tensor) -> None:
        """Raise ``ValueError`` unless ``z`` is ``(N, feature_dim)``."""
        if z.dim() != 2 or z.shape[1] != self.feature_dim:
            raise ValueError(
                f"{type(self).__name__} expects features (N, {self.feature_dim}) "
                f"(its feature_dim, which must equal the encoder's feature_dim), got a tensor of "
                f"shape {tuple(z.shape)}"
            )

    def forward(self, z: Tensor) -> Tensor:
        """``z`` ``(N, feature_dim)`` → images ``(N, out_channels, H, W)`` (in ``[-1, 1]`` unless
        ``output_activation="none"``)."""
        return self._run(z, None)

    def _is_code(self) -> list[bool]:
        n = len(self.stages)
        return [not (self.last_stage_is_image and i == n - 1) for i in range(n)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def downsample_sizes(size: int, n: int) -> list[int]:
    """``[size, ceil(size/2), ceil(size/4), ...]`` of length ``n + 1``."""
    out = [size]
    for _ in range(n):
        out.append(_ceil_div(out[-1], 2))
    return out
