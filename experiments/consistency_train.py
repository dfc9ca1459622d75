"""``ctrl-csc-train`` with u-CTRL's augmentation-consistency term in the encoder's objective.

An experiment, not (yet) an option of the package. u-CTRL's constrained game asks
``Σ_i ΔR(z_i, z_a,i) = 0`` of the encoder, ``z_a`` the feature of an augmented copy of the image
(shared/REFERENCES.md; in practice an ℓ2 distance). Here the augmentation is a blur
(``AUG_BLUR``: block averages enlarged back) and white Gaussian noise of standard deviation
``AUG_SIGMA``, and the encoder also minimises
``AUG_GAMMA · mean_i ‖f(x_i) − f(x_i + σ n_i)‖²`` (``x`` and its noisy copy encoded as one batch,
running statistics untouched). The hypothesis (experiments/notes/photos.md §14): the trained
critic rates a 26 dB blur of a crop farther than 16 dB of added noise, so the decoder matches the
features' texture energy with speckle; a critic that does not see such noise, or does not
demand the fine detail a blur removes, takes that away.

    AUG_BLUR=2 AUG_SIGMA=0 AUG_GAMMA=10 \
        python experiments/consistency_train.py experiment=photos_mini
"""

import os

import torch
from extra_term import train_with_term
from filters import block_average

from ctrl_csc.engine import steps

_SIGMA = float(os.environ.get("AUG_SIGMA", "0.2"))
_GAMMA = float(os.environ.get("AUG_GAMMA", "10"))
_BLUR = int(os.environ.get("AUG_BLUR", "1"))


def augment(x: torch.Tensor) -> torch.Tensor:
    """``x`` averaged over ``AUG_BLUR`` × ``AUG_BLUR`` blocks and enlarged back (bilinear), plus
    white noise of standard deviation ``AUG_SIGMA``."""
    if _BLUR > 1:
        x = block_average(x, _BLUR)
    return x + _SIGMA * torch.randn_like(x) if _SIGMA > 0 else x


def consistency(game, x):
    """``AUG_GAMMA · mean ‖f(x) − f(a(x))‖²``, both encoded as one batch."""
    with steps.frozen_statistics(game.raw_encoder), game.autocast():
        both = game.encoder(torch.cat([x, augment(x)]))
    z, z_a = both[: len(x)].float(), both[len(x) :].float()
    return _GAMMA * (z - z_a).pow(2).sum(1).mean()


train_with_term("encoder", consistency)
