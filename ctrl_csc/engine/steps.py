"""Training steps plugged into the one :class:`~ctrl_csc.engine.Trainer` loop.

A step is a callable ``step(game, x, y) -> dict[str, Tensor | float]`` that updates the players
through ``game.update(players, loss)`` and returns what to log. The closed-loop game
(:class:`CTRLStep`) and the reconstruction-trained baselines (:class:`ReconstructionStep`) are two
steps of the same loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ctrl_csc.losses.objective import check_weight
from ctrl_csc.nn.noise import add_noise

if TYPE_CHECKING:
    from ctrl_csc.engine.game import Game
    from ctrl_csc.losses import CTRLObjective

__all__ = [
    "TrainStep",
    "CTRLStep",
    "ReconstructionStep",
    "VAEStep",
    "frozen",
    "frozen_state",
    "frozen_statistics",
]


class TrainStep(Protocol):
    def __call__(self, game: Game, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]: ...


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` for the loss: half-precision outputs of autocast in float32, float64 kept."""
    return t if t.dtype == torch.float64 else t.float()


@contextmanager
def frozen_statistics(module: nn.Module) -> Iterator[nn.Module]:
    """Batch-norm layers of ``module`` still normalise by the batch's statistics (training
    mode) but leave their running statistics as they were (momentum 0 inside the block)."""
    norms = [
        (m, m.momentum) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    counts = [m.num_batches_tracked.clone() for m, _ in norms if m.num_batches_tracked is not None]
    for m, _ in norms:
        m.momentum = 0.0
    try:
        yield module
    finally:
        tracked = iter(counts)
        for m, momentum in norms:
            m.momentum = momentum
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(next(tracked))


@contextmanager
def frozen_state(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` computes as in training (batch statistics, its solvers' current step sizes)
    but its state does not move inside the block: batch-norm running statistics
    (:func:`frozen_statistics`) and the Lipschitz estimates of its unrolled solvers (held:
    ``refresh_lipschitz``; a size seen for the first time is still estimated)."""
    solvers = [m for m in module.modules() if hasattr(m, "refresh_lipschitz")]
    flags = [m.refresh_lipschitz for m in solvers]
    for m in solvers:
        m.refresh_lipschitz = False
    try:
        with frozen_statistics(module):
            yield module
    finally:
        for m, flag in zip(solvers, flags, strict=True):
            m.refresh_lipschitz = flag


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
    """One round of the closed-loop transcription game (docs/design.md, §8 "The closed-loop game").

    With ``Z = f(X)``, ``X̂ = g(Z)``, ``Ẑ = f(X̂)`` and the objective's record ``terms``:

    1. ``encoder_steps`` times: ``X̂ = g(Z)`` without gradient, ``Ẑ = f(X̂)``, and the encoder
       *ascends* ``terms.total`` (descends ``-terms.total``);
    2. once: ``Z = f(X)`` under ``no_grad``, ``X̂ = g(Z)``, ``Ẑ = f(X̂)`` with f's parameters frozen,
       and the decoder *descends* ``terms.decoder_total``.

    The two signs of the minimax game are written here and nowhere else. Each phase leaves the
    other player's state as it was (:func:`frozen_state`): no gradient reaches its parameters,
    and its batch-norm running statistics and solvers' Lipschitz estimates do not move (only a
    model's first forward at a new size makes its estimate, in whichever phase that happens). So
    the decoder's running statistics follow its own phase's batches alone, as the encoder's do.

    ``joint_batch`` (for encoders with batch norm): ``X`` and ``X̂`` are encoded as one batch
    ``f([X; X̂])``, so both are normalised by the same statistics. Encoded apart, each batch is
    normalised by its own mean and variance, and the encoder cannot see a difference between
    ``X`` and ``X̂`` that is shared by the whole batch (a brightness, a contrast, a texture
    energy); the running statistics then also mix statistics of real and transcribed batches
    that training never normalised together. ``Z`` for ``X̂ = g(Z)`` comes from a pass on ``X``
    alone (no gradient, running statistics untouched); the objective uses ``Z`` and ``Ẑ`` from
    the joint pass. Costs one extra gradient-free encoder pass per phase.

    Args:
        objective: a :class:`~ctrl_csc.losses.CTRLObjective` (binary, multiclass or samplewise).
        encoder_steps: encoder updates per decoder update (``k`` in docs/design.md, §8), at least 1.
        noise_std: standard deviation of Gaussian noise added to the encoder's input ``X`` (the
            denoising option); 0 disables it.
        joint_batch: encode ``[X; X̂]`` in one pass (see above).
        code_beta: weight of a sample-wise consistency of the encoder's *stage codes* in what the
            decoder minimises (0: none, the game of docs/design.md §8): ``Σ_l β_l · mean_i
            ‖c_l(x_i) − c_l(x̂_i)‖² / ‖c_l(x_i)‖²``, with ``c_l`` stage ``l``'s code of
            ``forward_with_codes`` (``None`` entries, stages whose output is not a code, are
            skipped). A number weighs every stage, a list one weight per stage. The encoder's
            objective is unchanged. On photos, ``[30, 0, 0]`` (the first stage only) removed
            most of the colour speckle (experiments/notes/photos.md §7); the first stage's code
            is near-linear in the image on its support, so this term is closer to a pixel loss
            than the feature term is: results with it are reported as such.
        dictionary_beta: weight of the encoder's dictionary fit in what the encoder descends
            (0: none, the game of docs/design.md §8): ``β · Σ_l mean_i (1 − cos²(u_l, D_l c_l))``,
            the share of each CSC stage's input its own code's synthesis misses
            (:meth:`~ctrl_csc.models.CSCEncoder.dictionary_misfit`), differentiable in the
            dictionaries only: the features, the projection and the decoder get the game's
            gradient alone. Needs an encoder with ``dictionary_misfit`` (a CSC encoder). On
            digits, β = 1 lifted an encoder at T = 5 whose projection turned too fast for its
            codes (``projection_rate`` 1) by ~0.4 dB, with sparser codes; at the matched rate
            (0.2), at T = 2 and on photos it changed nothing beyond a seed's spread
            (experiments/notes/sparse_deep.md §13, §14).
    """

    def __init__(
        self,
        objective: CTRLObjective,
        encoder_steps: int = 1,
        noise_std: float = 0.0,
        joint_batch: bool = False,
        code_beta: float | Sequence[float] = 0.0,
        dictionary_beta: float = 0.0,
    ) -> None:
        if encoder_steps < 1:
            raise ValueError(f"loss.encoder_steps must be >= 1, got {encoder_steps}")
        if noise_std < 0:
            raise ValueError(f"loss.noise_std must be >= 0, got {noise_std}")
        self.objective, self.encoder_steps, self.noise_std = objective, encoder_steps, noise_std
        self.joint_batch = bool(joint_batch)
        weights = [code_beta] if isinstance(code_beta, int | float) else list(code_beta)
        if not weights or any(
            isinstance(w, bool) or not isinstance(w, int | float) or not w >= 0 for w in weights
        ):
            raise ValueError(
                f"loss.code_beta must be a number >= 0 or a list of them, got {code_beta!r}"
            )
        self.code_beta: float | list[float] = (
            float(code_beta) if isinstance(code_beta, int | float) else [float(w) for w in weights]
        )
        self.uses_codes = any(w > 0 for w in weights)
        check_weight("loss.dictionary_beta", dictionary_beta)
        self.dictionary_beta = float(dictionary_beta)

    def _encode_pair(self, f: nn.Module, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor):
        """``(Z, Ẑ)`` for the objective: ``(z, f(X̂))``, or both from ``f([X; X̂])``."""
        if not self.joint_batch:
            return z, f(x_hat)
        both = f(torch.cat([x, x_hat]))
        return both[: len(x)], both[len(x) :]

    def code_distance(self, codes: list, codes_hat: list) -> torch.Tensor:
        """``Σ_l β_l · mean_i ‖c_l(x_i) − c_l(x̂_i)‖² / ‖c_l(x_i)‖²`` over the stages with a code
        (see ``code_beta``)."""
        if isinstance(self.code_beta, float):
            weights = [self.code_beta] * len(codes)
        elif len(self.code_beta) != len(codes):
            raise ValueError(
                f"loss.code_beta has {len(self.code_beta)} weights but the encoder has "
                f"{len(codes)} stages; give one per stage or a single number"
            )
        else:
            weights = self.code_beta
        total = torch.zeros((), dtype=torch.float64 if codes[0].dtype == torch.float64 else None)
        for w, c, ch in zip(weights, codes, codes_hat, strict=True):
            if w == 0 or c is None:
                continue
            c, ch = _wide(c).flatten(1), _wide(ch).flatten(1)
            relative = (c - ch).pow(2).sum(1) / c.pow(2).sum(1).clamp_min(1e-12)
            total = total + w * relative.mean()
        return total

    def _decoder_pass(self, f_raw: nn.Module, g: nn.Module, x_in: torch.Tensor, game: Game):
        """The decoder phase's forward: ``(Z, Ẑ, code term or None)``."""
        with torch.no_grad(), game.autocast():
            if self.uses_codes:
                z, codes = f_raw.forward_with_codes(x_in)
            else:
                z, codes = f_raw(x_in), None
        with frozen(f_raw), game.autocast():
            x_hat = g(z)
            if codes is None:
                return (*self._encode_pair(f_raw, x_in, x_hat, z), None)
            if self.joint_batch:
                both, joint = f_raw.forward_with_codes(torch.cat([x_in, x_hat]))
                n = len(x_in)
                z, z_hat = both[:n], both[n:]
                codes = [None if c is None else c[:n] for c in joint]
                codes_hat = [None if c is None else c[n:] for c in joint]
            else:
                z_hat, codes_hat = f_raw.forward_with_codes(x_hat)
        return z, z_hat, self.code_distance(codes, codes_hat)

    def __call__(self, game: Game, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = y if self.objective.needs_labels else None
        f = game.encoder  # DDP-wrapped where distributed
        f_raw, g_raw = game.raw_encoder, game.raw_decoder

        for _ in range(self.encoder_steps):
            x_in = add_noise(x, self.noise_std)
            with game.autocast():
                if self.joint_batch:
                    with torch.no_grad(), frozen_statistics(f_raw):
                        z = f_raw(x_in)
                else:
                    z = f(x_in)
                with torch.no_grad(), frozen_state(g_raw):
                    x_hat = g_raw(z.detach())
                z, z_hat = self._encode_pair(f, x_in, x_hat, z)
            terms = self.objective(_wide(z), _wide(z_hat), labels)
            loss = -terms.total  # the encoder maximises T
            if self.dictionary_beta > 0:
                misfit = self._dictionary_misfit(f_raw, x_in, game)
                loss = loss + self.dictionary_beta * misfit
            game.check_finite(loss, "encoder objective")
            game.update(("encoder",), loss)

        terms, code_term = self.decoder_phase(game, x, labels)
        out = {f"objective/{k}": v for k, v in terms.as_dict().items()}
        if self.dictionary_beta > 0:
            out["objective/dictionary_misfit"] = misfit.detach()
        if code_term is not None:
            out["objective/code_distance"] = code_term.detach()
        return out

    def _dictionary_misfit(self, f_raw: nn.Module, x: torch.Tensor, game: Game) -> torch.Tensor:
        """The encoder's dictionary misfit on ``x`` (``dictionary_beta``), by an extra pass that
        leaves the encoder's state (running statistics, step sizes) as the game's own pass left
        it."""
        misfit = getattr(f_raw, "dictionary_misfit", None)
        if misfit is None:
            raise ValueError(
                f"loss.dictionary_beta > 0 fits the encoder's dictionaries, but "
                f"{type(f_raw).__name__} has none; set loss.dictionary_beta=0 or use a CSC encoder"
            )
        with frozen_state(f_raw), game.autocast():
            return misfit(x)

    def decoder_phase(self, game: Game, x: torch.Tensor, labels: torch.Tensor | None):
        """Phase 2 of the step (the class docstring): one decoder update, as the step's last
        update. Returns the objective's record and the code term (``None`` without one)."""
        x_in = add_noise(x, self.noise_std)
        f_raw = game.raw_encoder
        with frozen_state(f_raw):
            z, z_hat, code_term = self._decoder_pass(f_raw, game.decoder, x_in, game)
        terms = self.objective(_wide(z), _wide(z_hat), labels)
        loss = terms.decoder_total
        if code_term is not None:
            loss = loss + code_term
        game.check_finite(loss, "decoder objective")
        # the decoder minimises its quantity; the step's last update (nothing to roll back after)
        game.update(("decoder",), loss, last=True)
        return terms, code_term


def _pixel_loss(name: str):
    """``F.mse_loss`` or ``F.l1_loss`` by the setting ``loss.loss``."""
    losses = {"mse": F.mse_loss, "l1": F.l1_loss}
    if name not in losses:
        raise ValueError(f"loss.loss must be one of {sorted(losses)}, got {name!r}")
    return losses[name]


class ReconstructionStep:
    """Trains encoder and decoder together on a pixel loss (the autoencoder baselines).

    ``loss = ℓ(g(f(X + n)), X) + code_l1 · mean|f(X + n)|`` with ``ℓ`` the mean squared or mean
    absolute error; ``code_l1 > 0`` gives the sparse autoencoder, ``noise_std > 0`` the denoising
    variant of either.
    """

    def __init__(self, loss: str = "mse", code_l1: float = 0.0, noise_std: float = 0.0) -> None:
        if code_l1 < 0 or noise_std < 0:
            raise ValueError("loss.code_l1 and loss.noise_std must be >= 0")
        self.loss_fn, self.code_l1, self.noise_std = _pixel_loss(loss), code_l1, noise_std

    def __call__(self, game: Game, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with game.autocast():
            code = game.encoder(add_noise(x, self.noise_std))
            x_hat = game.decoder(code)
        rec = self.loss_fn(_wide(x_hat), x)
        sparsity = _wide(code).abs().mean()
        loss = rec + self.code_l1 * sparsity
        game.check_finite(loss, "reconstruction loss")
        game.update(("encoder", "decoder"), loss, last=True)
        return {
            "loss/reconstruction": rec.detach(),
            "loss/code_l1": sparsity.detach(),
            "loss/total": loss.detach(),
        }


class VAEStep:
    """Trains the variational autoencoder baseline (encoder: ``forward(x, with_log_variance=True)
    -> (μ, log σ²)``, e.g. :class:`~ctrl_csc.models.ConvVAEEncoder`).

    ``loss = ℓ(g(μ + σ ε), X) + beta · KL(N(μ, σ²) ‖ N(0, I)) / (C·H·W)``, ``ε ~ N(0, I)``
    (reparameterised), ``ℓ`` the mean squared or absolute error over pixels and the KL summed
    over the latent's ``d`` coordinates, averaged over the batch and divided by the pixels per
    image, so that ``beta`` weighs the two per pixel: ``KL = ½ Σ (μ² + σ² − 1 − log σ²)``.
    """

    def __init__(self, loss: str = "mse", beta: float = 1.0) -> None:
        if not beta >= 0:
            raise ValueError(f"loss.beta must be >= 0, got {beta}")
        self.loss_fn, self.beta = _pixel_loss(loss), float(beta)

    def __call__(self, game: Game, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with game.autocast():
            mean, log_var = game.encoder(x, with_log_variance=True)
            z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
            x_hat = game.decoder(z)
        mean, log_var = _wide(mean), _wide(log_var)
        rec = self.loss_fn(_wide(x_hat), x)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(1).mean()
        loss = rec + self.beta * kl / x[0].numel()
        game.check_finite(loss, "VAE loss")
        game.update(("encoder", "decoder"), loss, last=True)
        return {
            "loss/reconstruction": rec.detach(),
            "loss/kl": kl.detach(),
            "loss/total": loss.detach(),
        }
