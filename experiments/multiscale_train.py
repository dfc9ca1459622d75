"""``ctrl-csc-train`` with the decoder's sample-wise term also taken on blurred copies.

An experiment, not (yet) an option of the package. The decoder minimises, beside the game's
``ΔR(Z, Ẑ) + β·mean ‖f(x) − f(x̂)‖²``, the same distance between the features of low-passed
images, ``MS_BETA · Σ_s mean ‖f(L_s x) − f(L_s x̂)‖²``, ``L_s`` the ``s × s`` block average
enlarged back (bilinear), for each ``s`` in ``MS_SCALES`` — the multi-scale critic of image GANs,
with the game's own encoder as the critic at every scale (no pixel loss, no other network). The
hypothesis (experiments/notes/photos.md §14): the trained critic rates a 26 dB blur of a crop
farther than 16 dB of noise, so the decoder matches fine-scale energy with speckle; speckle
vanishes under ``L_s``, so matching ``f(L_s x̂)`` to ``f(L_s x)`` asks for the coarse structure.

    MS_SCALES=2,4 MS_BETA=10 python experiments/multiscale_train.py experiment=photos_mini
"""

import os

import torch
from extra_term import train_with_term
from filters import block_average

from ctrl_csc.engine import steps

_SCALES = [int(s) for s in os.environ.get("MS_SCALES", "2,4").split(",")]
_BETA = float(os.environ.get("MS_BETA", "10"))


def scales(game, x):
    """``MS_BETA · Σ_s mean ‖f(L_s x) − f(L_s x̂)‖²`` through the frozen encoder."""
    f, g = game.raw_encoder, game.decoder
    total = 0.0
    with steps.frozen_state(f), steps.frozen(f), game.autocast():
        x_hat = g(f(x).detach())
        for s in _SCALES:
            both = f(torch.cat([block_average(x, s), block_average(x_hat, s)]))
            total = total + (both[: len(x)].detach() - both[len(x) :]).float().pow(2).sum(1).mean()
    return _BETA * total


train_with_term("decoder", scales)
