"""An encoder/decoder pair as one module (what :func:`ctrl_csc.load_pretrained` returns).

The denoising option is not here: it is Gaussian noise added to the *real input images only*, and
only while training — never to the reconstruction target and never to a decoded ``X̂`` that is
re-encoded (:func:`~ctrl_csc.nn.add_noise`). It works with any model because it lives in the
training steps (``loss.noise_std`` in the configs), not in the networks.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Autoencoder"]


class Autoencoder(nn.Module):
    """``x ↦ (z, x̂)`` with ``z = encoder(x)`` and ``x̂ = decoder(z)``.

    Args:
        encoder: ``(N, C, H, W) → (N, d)``.
        decoder: ``(N, d) → (N, C, H, W)``.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` ``(N, C, H, W)`` → ``(z (N, d), x̂ (N, C, H, W))``."""
        z = self.encoder(x)
        return z, self.decoder(z)
