"""A classical dictionary for each CSC stage, and the two compared at equal density.

Is a stage's dictionary, learned through the CTRL game, a good dictionary for what the stage
sees? The reference is a *classical* convolutional dictionary of the same shape (atoms, kernel,
stride, padding, sign constraint) learned without the game, on the same stage inputs ``u`` (what
the trained encoder feeds the stage), by alternating minimisation of

    ½‖u − D z‖² + λ‖z‖₁ ,   z ≥ 0 where the stage's codes are,   every atom of unit norm:

the codes by a converged FISTA solve, the atoms by Adam steps on the reconstruction error with the
codes held, ``λ`` (a fraction of ``λ_max`` per input, as the stages use) steered so that the codes
have the stage's own density.

The comparison is at equal density: the held-out stage inputs are coded with each dictionary by
the same converged solver, ``λ`` found by bisection so that the codes have the density the stage
has in the trained encoder, and the residual ``sqrt(Σ‖u − D z‖² / Σ‖u‖²)`` of each is reported:

* ``dictionary/enc{i}/density`` — the stage's code density in the trained encoder (held-out);
* ``dictionary/enc{i}/residual_at_density`` — the learned atoms, re-coded to convergence at that
  density;
* ``dictionary/enc{i}/residual_classical`` — the classical atoms, the same way;
* ``dictionary/enc{i}/residual_init_at_density`` — (given the initial encoder) the stage's
  initial atoms, the same way: the floor the other two are read against, since at a high density
  even random atoms span the inputs and any dictionary comes near the classical one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ctrl_csc.eval.dictionary import _residual_sq, csc_stages
from ctrl_csc.eval.metrics import code_density
from ctrl_csc.nn import CSCLayer
from ctrl_csc.nn.solver import unrolled_lasso

__all__ = [
    "code_at_density",
    "learn_classical_dictionary",
    "classical_comparison",
    "stage_inputs",
]


def _coder(layer: CSCLayer, weight: Tensor) -> CSCLayer:
    """A layer of ``layer``'s geometry and sign holding the atoms ``weight`` (used at unit norm);
    :func:`_solve` codes with it at any ``λ``."""
    coder = CSCLayer(
        layer.in_channels,
        layer.out_channels,
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        nonnegative=layer.nonnegative,
        normalize_atoms=True,
    ).to(weight.device)
    with torch.no_grad():
        coder.weight.copy_(weight)
    return coder.eval()


@torch.no_grad()
def _solve(coder: CSCLayer, u: Tensor, lmbda: float, n_iter: int) -> Tensor:
    """``n_iter`` FISTA steps for ``u`` with ``coder``'s atoms at ``λ = lmbda·λ_max`` per input
    (the step from the coder's Lipschitz estimate, brought up to date for its current atoms)."""
    size = u.shape[-2:]
    coder.lipschitz(size)
    return unrolled_lasso(
        u, coder.operator(size), coder.solver.step_size(), lmbda, n_iter=n_iter,
        algorithm="fista", nonnegative=coder.nonnegative, lmbda_relative=True,
    )  # fmt: skip


@torch.no_grad()
def code_at_density(
    layer: CSCLayer,
    weight: Tensor,
    u: Tensor,
    density: float,
    n_iter: int = 50,
    bisections: int = 14,
) -> tuple[Tensor, float, float]:
    """Code ``u`` with the atoms ``weight`` at (about) a given density.

    Bisects the relative ``λ`` (a fraction of each input's ``λ_max``) so that the converged
    (``n_iter`` FISTA steps) codes of all of ``u`` have ``density`` non-zeros.

    Returns:
        ``(codes, λ fraction, residual sqrt(Σ‖u − Dz‖²/Σ‖u‖²))``.
    """
    if not 0 < density < 1:
        raise ValueError(f"code_at_density: density must be in (0, 1), got {density}")
    coder = _coder(layer, weight)
    lo, hi = 1e-4, 1.0 - 1e-4  # density falls as λ rises
    best = None
    for _ in range(bisections):
        mid = math.sqrt(lo * hi)
        z = _solve(coder, u, mid, n_iter)
        d = code_density(z)
        if best is None or abs(d - density) < abs(best[2] - density):
            best = (z, mid, d)
        if d > density:
            lo = mid
        else:
            hi = mid
    z, lam, _ = best
    residual = math.sqrt(_residual_sq(u, z, coder) / float(u.double().pow(2).sum()))
    return z, lam, residual


def learn_classical_dictionary(
    layer: CSCLayer,
    u: Tensor,
    density: float,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-2,
    n_iter: int = 30,
    seed: int = 0,
) -> Tensor:
    """A convolutional dictionary of ``layer``'s shape learned on the inputs ``u`` (see the module
    docstring), its codes held near ``density``; returns the atoms ``(C_out, C_in, k, k)``, each
    of unit norm.

    Starts from Gaussian atoms (``seed``); each step codes a random batch of ``u`` to convergence
    (``n_iter`` FISTA steps), takes one Adam step on ``½‖u − D z‖²`` with the codes held, and
    moves ``λ`` by the ratio of the batch's density to ``density``.
    """
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(layer.weight.shape, generator=gen, dtype=torch.float32)
    learner = _coder(layer, start.to(u.device))
    optimizer = torch.optim.Adam([learner.weight], lr=lr)
    lam = 0.1
    for _ in range(steps):
        idx = torch.randint(0, u.shape[0], (min(batch_size, u.shape[0]),), generator=gen)
        batch = u[idx.to(u.device)]
        z = _solve(learner, batch, lam, n_iter)
        dz = learner.operator(batch.shape[-2:]).apply(z)  # through the unit-norm atoms
        loss = 0.5 * (batch - dz).pow(2).sum() / batch.shape[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        d = max(code_density(z), 1e-4)
        lam = min(max(lam * (d / density) ** 0.5, 1e-4), 1 - 1e-4)
    return learner.dictionary().detach()


@torch.no_grad()
def stage_inputs(encoder: nn.Module, images: Iterable[Tensor]) -> dict[int, tuple[Tensor, Tensor]]:
    """``{i: (inputs u, codes z)}`` of every CSC stage ``i`` of ``encoder`` over ``images``
    (batches ``(N, C, H, W)``), captured with forward hooks; the encoder runs in eval mode."""
    stages = csc_stages(encoder)
    seen: dict[int, list[tuple[Tensor, Tensor]]] = {i: [] for i, _ in stages}

    def hook(i: int):
        def record(layer, args, z):
            seen[i].append((args[0].detach(), z.detach()))

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in stages]
    mode = encoder.training
    encoder.eval()
    try:
        for x in images:
            encoder(x)
    finally:
        for h in handles:
            h.remove()
        encoder.train(mode)
    return {
        i: (torch.cat([u for u, _ in pairs]), torch.cat([z for _, z in pairs]))
        for i, pairs in seen.items()
        if pairs
    }


def classical_comparison(
    encoder: nn.Module,
    train_images: Iterable[Tensor],
    test_images: Iterable[Tensor],
    steps: int = 300,
    seed: int = 0,
    initial_encoder: nn.Module | None = None,
) -> tuple[dict[str, float], dict[int, Tensor]]:
    """Each CSC stage's learned dictionary against a classical one at equal density.

    Args:
        encoder: a trained encoder with CSC layers in ``encoder.stages``.
        train_images: batches of images the classical dictionaries learn from (through the
            trained encoder's earlier stages).
        test_images: held-out batches: the density and the residuals are measured on them.
        steps: steps of :func:`learn_classical_dictionary` per stage.
        initial_encoder: the same model at initialisation (its dictionaries are coded at the
            same density too), or ``None``.

    Returns:
        ``(metrics, {i: classical atoms})`` with the metrics of the module docstring.
    """
    train = stage_inputs(encoder, train_images)
    test = stage_inputs(encoder, test_images)
    layers = dict(csc_stages(encoder))
    initial = {} if initial_encoder is None else dict(csc_stages(initial_encoder))
    metrics: dict[str, float] = {}
    atoms: dict[int, Tensor] = {}
    for i, (u, z) in test.items():
        layer, key = layers[i], f"dictionary/enc{i}"
        density = min(max(code_density(z), 1e-3), 1 - 1e-3)
        with torch.enable_grad():
            atoms[i] = learn_classical_dictionary(layer, train[i][0], density, steps, seed=seed)
        learned = layer.dictionary().detach()
        metrics[f"{key}/density"] = density
        metrics[f"{key}/residual_at_density"] = code_at_density(layer, learned, u, density)[2]
        metrics[f"{key}/residual_classical"] = code_at_density(layer, atoms[i], u, density)[2]
        if i in initial:
            start = initial[i].dictionary().detach().to(learned.device)
            _, _, residual = code_at_density(layer, start, u, density)
            metrics[f"{key}/residual_init_at_density"] = residual
    return metrics, atoms
