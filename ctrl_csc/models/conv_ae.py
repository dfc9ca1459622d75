"""Plain and sparse convolutional autoencoders (the non-CTRL baselines).

:class:`ConvEncoder`: ``Conv(3, stride 2, pad 1) + norm + ReLU`` blocks (each halves the size,
rounding up) → flatten → ``Linear`` → code ``(N, feature_dim)`` → optional ``code_activation`` →
optional projection onto the unit sphere (off by default: an autoencoder's code is unnormalised).
:class:`ConvDecoder`: ``Linear`` → reshape → ``ConvTranspose(3, 2, 1)`` blocks to the exact sizes →
``tanh``.

**Sparse autoencoder.** The same networks, trained with an ℓ1 penalty on the code. The penalty lives
in the training step (:class:`ctrl_csc.engine.ReconstructionStep`): with ``normalize=False`` (the
default) the encoder's output *is* the code ``(N, feature_dim)``, so the step adds
``code_l1 * code.abs().mean()`` of what ``forward`` returned. ``code_activation="relu"`` makes exact
zeros in it. ``stage_density`` keeps each block's largest outputs only (:class:`TopKFraction`), so
that the block codes are as sparse as a CSC stage's (the ``sparse_ae_*`` configs: 0.2).

**Variational autoencoder.** :class:`ConvVAEEncoder` is :class:`ConvEncoder` with a second linear
head for the log-variance of a diagonal Gaussian ``q(z|x) = N(μ(x), diag σ²(x))`` of the same
dimension; ``forward`` returns the mean ``μ`` (the feature evaluation and generation use), and
``forward(x, with_log_variance=True)`` both, for :class:`ctrl_csc.engine.VAEStep`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._common import (
    ImageDecoder,
    ImageEncoder,
    downsample_sizes,
    make_activation,
    make_norm,
    make_output_activation,
)

__all__ = ["ConvEncoder", "ConvDecoder", "ConvVAEEncoder", "TopKFraction"]


def _check_channels(channels: Sequence[int], setting: str) -> list[int]:
    ch = [int(c) for c in channels]
    if not ch or min(ch) < 1:
        raise ValueError(f"{setting} must be a non-empty list of positive ints, got {channels!r}")
    return ch


class TopKFraction(nn.Module):
    """Keeps the ``⌈fraction · C·H·W⌉`` largest entries of each image's ``(C, H, W)`` map and sets
    the others to zero; the gradient reaches the kept entries only (``fraction = 1``: identity)."""

    def __init__(self, fraction: float) -> None:
        super().__init__()
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not 0 < fraction <= 1
        ):
            raise ValueError(f"model.encoder.stage_density must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)

    def forward(self, h: Tensor) -> Tensor:
        flat = h.flatten(1)
        k = math.ceil(self.fraction * flat.shape[1])
        if k >= flat.shape[1]:
            return h
        keep = torch.zeros_like(flat).scatter_(1, flat.topk(k, dim=1).indices, 1.0)
        return (flat * keep).view_as(h)

    def extra_repr(self) -> str:
        return f"fraction={self.fraction}"


class ConvEncoder(ImageEncoder):
    """Convolutional encoder: ``(N, in_channels, H, W)`` → ``(N, feature_dim)``.

    Args:
        in_channels: image channels (``dataset.channels``).
        image_size: ``H = W`` or ``(H, W)`` (``dataset.image_size``).
        feature_dim: code dimension ``d``.
        channels: width of each stride-2 block, first to last.
        norm: normalisation in every block (``"batch" | "group" | "none"``).
        norm_groups: groups of ``"group"`` norm.
        activation: block nonlinearity (``"relu" | "leaky_relu" | ...``).
        code_activation: nonlinearity on the code (``"none"`` or ``"relu"`` for exact zeros).
        normalize: project the code onto the unit sphere (``False``: return the code itself).
        stage_density: ``None``, or the fraction ``ρ ∈ (0, 1]`` of each block's outputs kept per
            image: the ``⌈ρ·C·H·W⌉`` largest, the others set to zero (:class:`TopKFraction`, the
            k-sparse autoencoder of Makhzani & Frey, 2014). With ReLU blocks at most that fraction
            is non-zero, so the sparse AE's block codes can be held at a CSC stage's density.

    Attributes:
        stages: ``nn.ModuleList`` of the blocks (their outputs are the codes of
            ``forward_with_codes``; the code ``(N, feature_dim)`` is what ``forward`` returns when
            ``normalize=False``).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int | Sequence[int],
        feature_dim: int = 128,
        channels: Sequence[int] = (64, 128, 256),
        norm: str = "batch",
        norm_groups: int = 8,
        activation: str = "relu",
        code_activation: str = "none",
        normalize: bool = False,
        stage_density: float | None = None,
    ) -> None:
        super().__init__(in_channels, image_size, feature_dim, normalize)
        ch = _check_channels(channels, "model.encoder.channels")
        keep = [] if stage_density is None else [TopKFraction(stage_density)]
        hs = downsample_sizes(self.image_size[0], len(ch))
        ws = downsample_sizes(self.image_size[1], len(ch))
        self.stages = nn.ModuleList()
        c = self.in_channels
        for c_out in ch:
            self.stages.append(
                nn.Sequential(
                    nn.Conv2d(c, c_out, 3, 2, 1),
                    make_norm(norm, c_out, norm_groups, "model.encoder.norm"),
                    make_activation(activation, setting="model.encoder.activation"),
                    *keep,
                )
            )
            c = c_out
        self.code_shape = (c, hs[-1], ws[-1])
        self.projection = nn.Linear(c * hs[-1] * ws[-1], self.feature_dim)
        self.code_act = make_activation(code_activation, setting="model.encoder.code_activation")

    def _run(self, x: Tensor, outs: list[Tensor] | None) -> Tensor:
        h = self._run_blocks(x, outs)
        return self._finish(self.code_act(self.projection(h.flatten(1))))


class ConvVAEEncoder(ConvEncoder):
    """The encoder of the VAE baseline: :class:`ConvEncoder`'s blocks and mean head
    (``projection``), and a log-variance head ``log_variance`` of the same shape.

    ``forward(x)`` returns the mean ``μ`` ``(N, feature_dim)``; ``forward(x,
    with_log_variance=True)`` returns ``(μ, log σ²)``. The features are not normalised and the
    code is not activated (a Gaussian latent): ``normalize`` and ``code_activation`` are not
    arguments. Other arguments as :class:`ConvEncoder`.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int | Sequence[int],
        feature_dim: int = 128,
        channels: Sequence[int] = (64, 128, 256),
        norm: str = "batch",
        norm_groups: int = 8,
        activation: str = "relu",
    ) -> None:
        super().__init__(in_channels, image_size, feature_dim, channels, norm, norm_groups,
                         activation)  # fmt: skip
        self.log_variance = nn.Linear(self.projection.in_features, self.feature_dim)

    def forward(self, x: Tensor, with_log_variance: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        h = self._run_blocks(x, None).flatten(1)
        mean = self.projection(h)
        return (mean, self.log_variance(h)) if with_log_variance else mean


class ConvDecoder(ImageDecoder):
    """Convolutional decoder: ``(N, feature_dim)`` → ``(N, out_channels, H, W)``.

    Args:
        out_channels: image channels (``dataset.channels``).
        image_size: ``H = W`` or ``(H, W)`` (``dataset.image_size``).
        feature_dim: code dimension ``d``.
        channels: widths coarse to fine; the projection is reshaped to ``channels[0]`` maps and
            each of the ``len(channels)`` stride-2 transposed convolutions outputs the next width
            (the last one the image channels). Mirror the encoder with its list reversed.
        norm: normalisation after the projection and every block but the last.
        norm_groups: groups of ``"group"`` norm.
        activation: nonlinearity after the projection and every block but the last.
        output_activation: ``"tanh" | "hardtanh" | "none"``.

    Attributes:
        stages: ``nn.ModuleList`` of the transposed convolutions, coarse to fine (the last outputs
            the image).
    """

    last_stage_is_image = True

    def __init__(
        self,
        out_channels: int,
        image_size: int | Sequence[int],
        feature_dim: int = 128,
        channels: Sequence[int] = (256, 128, 64),
        norm: str = "batch",
        norm_groups: int = 8,
        activation: str = "relu",
        output_activation: str = "tanh",
    ) -> None:
        super().__init__(out_channels, image_size, feature_dim)
        ch = _check_channels(channels, "model.decoder.channels")
        n = len(ch)
        hs = downsample_sizes(self.image_size[0], n)
        ws = downsample_sizes(self.image_size[1], n)
        self.code_shape = (ch[0], hs[-1], ws[-1])
        self.out_sizes = [(hs[k], ws[k]) for k in range(n - 1, -1, -1)]
        self.projection = nn.Linear(self.feature_dim, ch[0] * hs[-1] * ws[-1])
        self.projection_post = nn.Sequential(
            make_norm(norm, ch[0], norm_groups, "model.decoder.norm"),
            make_activation(activation, setting="model.decoder.activation"),
        )
        self.stages = nn.ModuleList()
        self.posts = nn.ModuleList()
        for j in range(n):
            last = j == n - 1
            c_out = self.out_channels if last else ch[j + 1]
            self.stages.append(nn.ConvTranspose2d(ch[j], c_out, 3, 2, 1))
            self.posts.append(
                make_output_activation(output_activation)
                if last
                else nn.Sequential(
                    make_norm(norm, c_out, norm_groups, "model.decoder.norm"),
                    make_activation(activation, setting="model.decoder.activation"),
                )
            )

    def _run(self, z: Tensor, outs: list[Tensor] | None) -> Tensor:
        self.check_input(z)
        h = self.projection_post(self.projection(z).view(z.shape[0], *self.code_shape))
        for conv, post, size in zip(self.stages, self.posts, self.out_sizes):
            h = post(conv(h, output_size=list(size)))
            if outs is not None:
                outs.append(h)
        return h
