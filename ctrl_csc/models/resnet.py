"""Residual SNGAN-style CTRL backbones (48 px STL-10 / 128 px CelebA, LSUN, ImageNet layouts).

Encoder (the SNGAN discriminator, Miyato et al. 2018): residual down-blocks
``[ReLU] → Conv3 → ReLU → Conv3 → AvgPool2`` with a ``Conv1 → AvgPool2`` shortcut (the first block
has no leading ReLU), spectral norm on every convolution and on the projection; then ReLU → flatten
→ ``Linear`` → unit sphere. Unlike the GAN discriminator it does not sum-pool: an encoder must keep
the spatial layout for the decoder to reconstruct from. Pooling uses ``ceil_mode`` so any size
works (28 → 14 → 7 → 4).

Decoder (the SNGAN generator): ``Linear`` → reshape to the coarsest size → residual up-blocks
``BN → ReLU → Upsample → Conv3 → BN → ReLU → Conv3`` with an ``Upsample → Conv1`` shortcut, each
upsampling (nearest) to the exact size of the matching encoder level → BN → ReLU → Conv3 → ``tanh``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from ._common import (
    ImageDecoder,
    ImageEncoder,
    downsample_sizes,
    make_norm,
    make_output_activation,
)

__all__ = ["ResNetEncoder", "ResNetDecoder"]


def _maybe_sn(module: nn.Module, on: bool) -> nn.Module:
    return _sn(module) if on else module


class _DownBlock(nn.Module):
    """SNGAN discriminator block ``(N, c_in, H, W)`` → ``(N, c_out, ceil(H/2), ceil(W/2))``."""

    def __init__(self, c_in: int, c_out: int, first: bool, sn: bool) -> None:
        super().__init__()
        self.first = first
        self.conv1 = _maybe_sn(nn.Conv2d(c_in, c_out, 3, 1, 1), sn)
        self.conv2 = _maybe_sn(nn.Conv2d(c_out, c_out, 3, 1, 1), sn)
        self.shortcut = _maybe_sn(nn.Conv2d(c_in, c_out, 1, 1, 0), sn)

    @staticmethod
    def _pool(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, 2, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.first:  # SNGAN "optimized" block: pool before the 1x1 shortcut
            return self._pool(h) + self.shortcut(self._pool(x))
        return self._pool(h) + self._pool(self.shortcut(x))


class ResNetEncoder(ImageEncoder):
    """Residual encoder with spectral norm: ``(N, in_channels, H, W)`` → ``(N, feature_dim)``.

    Args:
        in_channels: image channels (``dataset.channels``).
        image_size: ``H = W`` or ``(H, W)`` (``dataset.image_size``).
        feature_dim: feature dimension ``d``.
        base_channels: width unit; block ``i`` has ``base_channels * channel_mults[i]`` channels.
        channel_mults: one entry per down-block (each halves the size, rounding up).
        spectral_norm: spectral normalisation of every convolution and of the projection.
        normalize: project features onto the unit sphere.

    Attributes:
        stages: ``nn.ModuleList`` of the residual blocks.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int | Sequence[int],
        feature_dim: int = 128,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 4, 8),
        spectral_norm: bool = True,
        normalize: bool = True,
    ) -> None:
        super().__init__(in_channels, image_size, feature_dim, normalize)
        mults = [int(m) for m in channel_mults]
        if not mults or min(mults) < 1 or base_channels < 1:
            raise ValueError(
                f"channel_mults must be a non-empty list of positive ints and base_channels >= 1, "
                f"got {channel_mults}, {base_channels}"
            )
        hs = downsample_sizes(self.image_size[0], len(mults))
        ws = downsample_sizes(self.image_size[1], len(mults))
        self.stages = nn.ModuleList()
        c = self.in_channels
        for i, m in enumerate(mults):
            self.stages.append(_DownBlock(c, base_channels * m, first=i == 0, sn=spectral_norm))
            c = base_channels * m
        self.code_shape = (c, hs[-1], ws[-1])
        self.projection = _maybe_sn(nn.Linear(c * hs[-1] * ws[-1], self.feature_dim), spectral_norm)

    def _run(self, x: Tensor, outs: list[Tensor] | None) -> Tensor:
        h = self._run_blocks(x, outs)
        return self._finish(self.projection(F.relu(h).flatten(1)))


class _UpBlock(nn.Module):
    """SNGAN generator block ``(N, c_in, h, w)`` → ``(N, c_out, *output_size)``."""

    def __init__(self, c_in: int, c_out: int, norm: str, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, c_in, norm_groups, "model.decoder.norm")
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = make_norm(norm, c_out, norm_groups, "model.decoder.norm")
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, 1, 0)

    def forward(self, x: Tensor, output_size: tuple[int, int]) -> Tensor:
        h = F.interpolate(F.relu(self.norm1(x)), size=output_size, mode="nearest")
        h = self.conv2(F.relu(self.norm2(self.conv1(h))))
        return h + self.shortcut(F.interpolate(x, size=output_size, mode="nearest"))


class ResNetDecoder(ImageDecoder):
    """Residual decoder: ``(N, feature_dim)`` → ``(N, out_channels, H, W)``.

    Args:
        out_channels: image channels (``dataset.channels``).
        image_size: ``H = W`` or ``(H, W)`` (``dataset.image_size``).
        feature_dim: feature dimension ``d``.
        base_channels: width unit.
        channel_mults: the encoder's list (fine to coarse); the decoder starts at the coarsest
            level with ``base_channels * channel_mults[-1]`` channels and block ``j`` outputs
            ``base_channels * channel_mults[-2-j]`` (``channel_mults[0]`` for the last block).
        norm: normalisation inside the blocks and before the output convolution.
        norm_groups: groups of ``"group"`` norm.
        output_activation: ``"tanh" | "hardtanh" | "none"``.

    Attributes:
        stages: ``nn.ModuleList`` of the residual up-blocks, coarse to fine.
    """

    def __init__(
        self,
        out_channels: int,
        image_size: int | Sequence[int],
        feature_dim: int = 128,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 4, 8),
        norm: str = "batch",
        norm_groups: int = 8,
        output_activation: str = "tanh",
    ) -> None:
        super().__init__(out_channels, image_size, feature_dim)
        mults = [int(m) for m in channel_mults]
        if not mults or min(mults) < 1 or base_channels < 1:
            raise ValueError(
                f"channel_mults must be a non-empty list of positive ints and base_channels >= 1, "
                f"got {channel_mults}, {base_channels}"
            )
        n = len(mults)
        hs = downsample_sizes(self.image_size[0], n)
        ws = downsample_sizes(self.image_size[1], n)
        c = base_channels * mults[-1]
        self.code_shape = (c, hs[-1], ws[-1])
        self.projection = nn.Linear(self.feature_dim, c * hs[-1] * ws[-1])
        self.out_sizes = [(hs[k], ws[k]) for k in range(n - 1, -1, -1)]
        self.stages = nn.ModuleList()
        for j in range(n):
            c_out = base_channels * mults[max(n - 2 - j, 0)]
            self.stages.append(_UpBlock(c, c_out, norm, norm_groups))
            c = c_out
        self.head = nn.Sequential(
            make_norm(norm, c, norm_groups, "model.decoder.norm"),
            nn.ReLU(),
            nn.Conv2d(c, self.out_channels, 3, 1, 1),
            make_output_activation(output_activation),
        )

    def _run(self, z: Tensor, outs: list[Tensor] | None) -> Tensor:
        self.check_input(z)
        h = self.projection(z).view(z.shape[0], *self.code_shape)
        for block, size in zip(self.stages, self.out_sizes):
            h = block(h, size)
            if outs is not None:
                outs.append(h)
        return self.head(h)
