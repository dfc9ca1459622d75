"""DCGAN-style CTRL backbones: the CTRL reference code's 32 px encoder and decoder.

Sizes are computed from ``image_size`` so the same network takes 28 and 32 px.

Encoder: ``Conv(4, stride 2, pad 1) + LeakyReLU(0.2)`` (no norm on the first block), then
``num_down - 1`` blocks ``Conv(4, 2, 1) + BatchNorm + LeakyReLU`` doubling the width, then a
``Conv`` whose kernel is the last spatial size to ``(N, feature_dim, 1, 1)`` → flatten →
unit sphere. At 32 px with ``base_channels=64``: 64@16² → 128@8² → 256@4² → 128.

Decoder: ``ConvTranspose`` from ``(N, d, 1, 1)`` to the coarsest size with
``base_channels * 2**num_up`` channels + BN + ReLU, then ``ConvTranspose(4, 2, 1)`` + BN + ReLU
halving the width, the last one to image channels + ``tanh``. At 32 px: 512@4² → 256@8² → 128@16²
→ C@32². Every transposed convolution is given its exact ``output_size``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ctrl_csc.nn.stage import conv_output_size

from ._common import (
    ImageDecoder,
    ImageEncoder,
    make_norm,
    make_output_activation,
)

__all__ = ["DCGANEncoder", "DCGANDecoder"]


def _dcgan_sizes(image_size: tuple[int, int], n: int, setting: str) -> list[tuple[int, int]]:
    """Sizes after 0..n ``Conv(4, 2, 1)``: ``floor(H / 2)`` each; ``ValueError`` below 1x1."""
    sizes = [image_size]
    for _ in range(n):
        sizes.append(tuple(conv_output_size(s, 4, 2, 1) for s in sizes[-1]))  # type: ignore[misc]
    if min(sizes[-1]) < 1:
        raise ValueError(
            f"dataset.image_size={image_size[0]}x{image_size[1]} is too small for {setting}="
            f"{n} stride-2 stages (it would reach {sizes[-1][0]}x{sizes[-1][1]}); use a larger "
            f"image size or fewer stages"
        )
    return sizes  # type: ignore[return-value]


class DCGANEncoder(ImageEncoder):
    """DCGAN-style encoder: images ``(N, in_channels, H, W)`` → features ``(N, feature_dim)``.

    Args:
        in_channels: image channels (``dataset.channels``).
        image_size: ``H = W`` or ``(H, W)`` (``dataset.image_size``).
        feature_dim: feature dimension ``d``.
        base_channels: width of the first block (``ndf``); block ``i`` has
            ``base_channels * 2**i`` channels.
        num_down: number of stride-2 blocks.
        norm: normalisation in blocks ``1..num_down-1`` (``"batch" | "group" | "none"``).
        norm_groups: groups of ``"group"`` norm.
        negative_slope: LeakyReLU slope.
        normalize: project features onto the unit sphere.

    Attributes:
        stages: ``nn.ModuleList`` of the blocks (``nn.Sequential``), then the final projection.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int | Sequence[int],
        feature_dim: int = 128,
        base_channels: int = 64,
        num_down: int = 3,
        norm: str = "batch",
        norm_groups: int = 8,
        negative_slope: float = 0.2,
        normalize: bool = True,
    ) -> None:
        super().__init__(in_channels, image_size, feature_dim, normalize)
        if num_down < 1 or base_channels < 1:
            raise ValueError(
                f"num_down and base_channels must be >= 1, got {num_down}, {base_channels}"
            )
        sizes = _dcgan_sizes(self.image_size, num_down, "model.encoder.num_down")
        self.stages = nn.ModuleList()
        c = self.in_channels
        for i in range(num_down):
            c_out = base_channels * 2**i
            self.stages.append(
                nn.Sequential(
                    nn.Conv2d(c, c_out, 4, 2, 1, bias=False),
                    nn.Identity()
                    if i == 0
                    else make_norm(norm, c_out, norm_groups, "model.encoder.norm"),
                    nn.LeakyReLU(negative_slope),
                )
            )
            c = c_out
        self.code_shape = (c, *sizes[-1])
        self.projection = nn.Conv2d(c, self.feature_dim, sizes[-1], 1, 0, bias=False)

    def _run(self, x: Tensor, outs: list[Tensor] | None) -> Tensor:
        h = self._run_blocks(x, outs)
        return self._finish(self.projection(h).flatten(1))


class _UpBlock(nn.Module):
    """``ConvTranspose2d`` to an exact ``output_size``, then norm and activation."""

    def __init__(self, conv: nn.ConvTranspose2d, norm: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm, self.act = conv, norm, act

    def forward(self, x: Tensor, output_size: tuple[int, int]) -> Tensor:
        return self.act(self.norm(self.conv(x, output_size=list(output_size))))


class DCGANDecoder(ImageDecoder):
    """DCGAN-style decoder: features ``(N, feature_dim)`` → images ``(N, out_channels, H, W)``.

    Args:
        out_channels: image channels (``dataset.channels``).
        image_size: ``H = W`` or ``(H, W)`` (``dataset.image_size``).
        feature_dim: feature dimension ``d``.
        base_channels: ``ngf``; the level ``i`` steps below full resolution has
            ``base_channels * 2**i`` channels (the coarsest ``base_channels * 2**num_up``).
        num_up: number of stride-2 upsampling blocks (mirror of the encoder's ``num_down``).
        norm: normalisation after every block but the last.
        norm_groups: groups of ``"group"`` norm.
        output_activation: ``"tanh" | "hardtanh" | "none"``.

    Attributes:
        stages: ``nn.ModuleList`` of the up-blocks, coarse to fine (the first is the projection,
            the last outputs the image).
    """

    last_stage_is_image = True

    def __init__(
        self,
        out_channels: int,
        image_size: int | Sequence[int],
        feature_dim: int = 128,
        base_channels: int = 64,
        num_up: int = 3,
        norm: str = "batch",
        norm_groups: int = 8,
        output_activation: str = "tanh",
    ) -> None:
        super().__init__(out_channels, image_size, feature_dim)
        if num_up < 1 or base_channels < 1:
            raise ValueError(
                f"num_up and base_channels must be >= 1, got {num_up}, {base_channels}"
            )
        sizes = _dcgan_sizes(self.image_size, num_up, "model.decoder.num_up")
        self.out_sizes = [sizes[i] for i in range(num_up, -1, -1)]  # coarse (projection) to fine
        c = base_channels * 2**num_up
        self.code_shape = (c, *sizes[-1])
        self.stages = nn.ModuleList(
            [
                _UpBlock(
                    nn.ConvTranspose2d(self.feature_dim, c, sizes[-1], 1, 0, bias=False),
                    make_norm(norm, c, norm_groups, "model.decoder.norm"),
                    nn.ReLU(),
                )
            ]
        )
        for i in range(num_up, 0, -1):
            last = i == 1
            c_out = self.out_channels if last else base_channels * 2 ** (i - 1)
            self.stages.append(
                _UpBlock(
                    nn.ConvTranspose2d(c, c_out, 4, 2, 1, bias=False),
                    nn.Identity()
                    if last
                    else make_norm(norm, c_out, norm_groups, "model.decoder.norm"),
                    make_output_activation(output_activation) if last else nn.ReLU(),
                )
            )
            c = c_out

    def _run(self, z: Tensor, outs: list[Tensor] | None) -> Tensor:
        self.check_input(z)
        h = z[:, :, None, None]
        for block, size in zip(self.stages, self.out_sizes):
            h = block(h, size)
            if outs is not None:
                outs.append(h)
        return h
