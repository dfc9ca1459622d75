"""An encoder/decoder pair as one module, with the denoising option.

The denoising option is Gaussian noise added to the *real input images only*, and only while
training — never to the reconstruction target and never to a decoded ``X̂`` that is re-encoded
(:func:`~ctrl_csc.nn.add_noise`). It works with any model because it lives in the training
step, not in the networks (``loss.noise_std`` in the configs). :class:`Autoencoder` packages the
same for Python use of the autoencoder baselines.
"""

from __future__ import annotations

from torch import Tensor, nn

from ctrl_csc.nn.noise import add_noise

__all__ = ["Autoencoder"]


class Autoencoder(nn.Module):
    """``x ↦ (z, x̂)`` with ``z = encoder(x̃)``, ``x̂ = decoder(z)`` and ``x̃ = x + σε`` while
    training (``x̃ = x`` in eval mode or when ``noise_std == 0``).

    Args:
        encoder: ``(N, C, H, W) → (N, d)``.
        decoder: ``(N, d) → (N, C, H, W)``.
        noise_std: σ of the denoising corruption (image units, range ``[-1, 1]``).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, noise_std: float = 0.0) -> None:
        super().__init__()
        if noise_std < 0:
            raise ValueError(f"model.noise_std must be >= 0, got {noise_std}")
        self.encoder = encoder
        self.decoder = decoder
        self.noise_std = float(noise_std)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` ``(N, C, H, W)`` → ``(z (N, d), x̂ (N, C, H, W))``; compare ``x̂`` with the clean
        ``x``."""
        x_in = add_noise(x, self.noise_std) if self.training else x
        z = self.encoder(x_in)
        return z, self.decoder(z)
