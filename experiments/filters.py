"""The two fixed low-pass filters the experiments in this folder apply to images (N, C, H, W)."""

import torch
import torch.nn.functional as F


def block_average(x: torch.Tensor, s: int) -> torch.Tensor:
    """Averages over ``s × s`` blocks, enlarged back to the input's size (bilinear)."""
    return F.interpolate(F.avg_pool2d(x, s), scale_factor=s, mode="bilinear")


def binomial_blur(x: torch.Tensor) -> torch.Tensor:
    """A 3 × 3 binomial filter per channel, edges replicated."""
    k = torch.tensor([1.0, 2.0, 1.0])
    w = (k[:, None] * k[None, :] / 16.0).to(x).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), w, groups=x.shape[1])
