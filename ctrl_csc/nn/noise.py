"""The denoising corruption, used by the training steps and by `models.Autoencoder`."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["add_noise"]


def add_noise(x: Tensor, noise_std: float, generator: torch.Generator | None = None) -> Tensor:
    """Denoising corruption ``x + noise_std * ε``, ``ε ~ N(0, I)``, same shape as ``x``.

    The denoising option, usable with any model: the training step corrupts the real images it
    feeds to the encoder (never the reconstruction target, never the decoder's output ``X̂`` when
    it is re-encoded), and only while training. ``noise_std`` is in the units of the images (range
    ``[-1, 1]``); ``0`` returns ``x`` itself. No clamping: the corrupted input may leave
    ``[-1, 1]`` slightly, as in the usual denoising autoencoder.
    """
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if noise_std == 0:
        return x
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + noise_std * noise
