"""Training steps plugged into the one :class:`~ctrl_csc.engine.Trainer` loop.

A step is a callable ``step(game, x, y) -> dict[str, Tensor | float]`` that updates the players
through ``game.update(players, loss)`` and returns what to log. The closed-loop game
(:class:`CTRLStep`) and the reconstruction-trained baselines (:class:`ReconstructionStep`) are two
steps of the same loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ctrl_csc.models import add_noise

if TYPE_CHECKING:
    from ctrl_csc.engine.trainer import Game
    from ctrl_csc.losses import CTRLObjective

__all__ = ["TrainStep", "CTRLStep", "ReconstructionStep", "frozen"]


class TrainStep(Protocol):
    def __call__(self, game: Game, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]: ...


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters of ``module`` need no gradient inside the block (saves their weight-gradient
    convolutions when another player is being updated through it)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class CTRLStep:
    """One round of the closed-loop transcription game (DESIGN §2).

    With ``Z = f(X)``, ``X̂ = g(Z)``, ``Ẑ = f(X̂)`` and the objective's record ``terms``:

    1. ``encoder_steps`` times: ``X̂ = g(Z)`` without gradient, ``Ẑ = f(X̂)``, and the encoder
       *ascends* ``terms.total`` (descends ``-terms.total``);
    2. once: ``Z = f(X)`` under ``no_grad``, ``X̂ = g(Z)``, ``Ẑ = f(X̂)`` with f's parameters frozen,
       and the decoder *descends* ``terms.decoder_total``.

    The two signs of the minimax game are written here and nowhere else.

    Args:
        objective: a :class:`~ctrl_csc.losses.CTRLObjective` (binary, multiclass or samplewise).
        encoder_steps: encoder updates per decoder update (``k`` in DESIGN §2), at least 1.
        noise_std: standard deviation of Gaussian noise added to the encoder's input ``X`` (the
            denoising option); 0 disables it.
    """

    def __init__(
        self, objective: CTRLObjective, encoder_steps: int = 1, noise_std: float = 0.0
    ) -> None:
        if encoder_steps < 1:
            raise ValueError(f"loss.encoder_steps must be >= 1, got {encoder_steps}")
        if noise_std < 0:
            raise ValueError(f"loss.noise_std must be >= 0, got {noise_std}")
        self.objective, self.encoder_steps, self.noise_std = objective, encoder_steps, noise_std

    def __call__(self, game: Game, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = y if self.objective.needs_labels else None
        f, g = game.encoder, game.decoder  # DDP-wrapped where distributed
        f_raw, g_raw = game.raw_encoder, game.raw_decoder

        for _ in range(self.encoder_steps):
            with game.autocast():
                z = f(add_noise(x, self.noise_std))
                with torch.no_grad():
                    x_hat = g_raw(z.detach())
                z_hat = f(x_hat)
            terms = self.objective(z.float(), z_hat.float(), labels)
            game.check_finite(terms.total, "encoder objective")
            game.update(("encoder",), -terms.total)  # the encoder maximises T

        with torch.no_grad(), game.autocast():
            z = f_raw(add_noise(x, self.noise_std))
        with frozen(f_raw), game.autocast():
            x_hat = g(z)
            z_hat = f_raw(x_hat)
        terms = self.objective(z.float(), z_hat.float(), labels)
        game.check_finite(terms.decoder_total, "decoder objective")
        game.update(("decoder",), terms.decoder_total)  # the decoder minimises its quantity
        return {f"objective/{k}": v for k, v in terms.as_dict().items()}


class ReconstructionStep:
    """Trains encoder and decoder together on a pixel loss (the autoencoder baselines).

    ``loss = ℓ(g(f(X + n)), X) + code_l1 · mean|f(X + n)|`` with ``ℓ`` the mean squared or mean
    absolute error; ``code_l1 > 0`` gives the sparse autoencoder, ``noise_std > 0`` the denoising
    variant of either.
    """

    def __init__(self, loss: str = "mse", code_l1: float = 0.0, noise_std: float = 0.0) -> None:
        losses = {"mse": F.mse_loss, "l1": F.l1_loss}
        if loss not in losses:
            raise ValueError(f"loss.loss must be one of {sorted(losses)}, got {loss!r}")
        if code_l1 < 0 or noise_std < 0:
            raise ValueError("loss.code_l1 and loss.noise_std must be >= 0")
        self.loss_fn, self.code_l1, self.noise_std = losses[loss], code_l1, noise_std

    def __call__(self, game: Game, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with game.autocast():
            code = game.encoder(add_noise(x, self.noise_std))
            x_hat = game.decoder(code)
        rec = self.loss_fn(x_hat.float(), x)
        sparsity = code.float().abs().mean()
        loss = rec + self.code_l1 * sparsity
        game.check_finite(loss, "reconstruction loss")
        game.update(("encoder", "decoder"), loss)
        return {
            "loss/reconstruction": rec.detach(),
            "loss/code_l1": sparsity.detach(),
            "loss/total": loss.detach(),
        }
