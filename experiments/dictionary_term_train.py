"""``ctrl-csc-train`` with each encoder stage's dictionary also fitted to the stage's own input.

An experiment, not an option of the package. In the game the encoder's dictionaries are shaped by
the rate reduction alone, and the deeper stages code their inputs 3–5x worse than classical
dictionaries of the same size at the same density (sparse_deep.md §7); a sparse code of a poor
dictionary keeps little of its input. Here the encoder also minimises, for every stage ``l`` with
input ``u_l`` and (detached) code ``c_l``, the part of ``u_l`` its synthesis ``D_l c_l`` misses at
the best scale, ``1 − ⟨u, D c⟩² / (‖u‖² ‖D c‖²)`` per image, weighted by ``DICT_GAMMA``; only
the dictionaries receive its gradient. experiments/notes/sparse_deep.md §13.

    DICT_GAMMA=1 python experiments/dictionary_term_train.py model.encoder.stage_defaults.n_iter=5
"""

import os

import torch
from extra_term import train_with_term

from ctrl_csc.engine import steps

_GAMMA = float(os.environ.get("DICT_GAMMA", "1"))


def dictionary_fit(game, x: torch.Tensor) -> torch.Tensor:
    """``DICT_GAMMA · Σ_l mean_n (1 − cos²(u_l, D_l c_l))`` over the encoder's stages."""
    f = game.raw_encoder
    with torch.no_grad(), steps.frozen_statistics(f):
        codes = f.stage_outputs(x)
        inputs = [x] + [act(norm(c)) for c, norm, act in zip(codes[:-1], f.norms, f.activations)]
    total = x.new_zeros(())
    for layer, u, c in zip(f.stages, inputs, codes):
        fit = layer.synthesize(c, u.shape[-2:]).flatten(1)
        u = u.flatten(1)
        cos2 = (u * fit).sum(1).pow(2) / (u.pow(2).sum(1) * fit.pow(2).sum(1)).clamp_min(1e-12)
        total = total + (1 - cos2).mean()
    return _GAMMA * total


if __name__ == "__main__":
    train_with_term("encoder", dictionary_fit)
