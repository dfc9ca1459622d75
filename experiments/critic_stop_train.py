"""``ctrl-csc-train`` with the encoder's (the critic's) learning rate reaching 0 early.

An experiment, not an option of the package: the game's decoder keeps improving against a frozen
critic (experiments/notes/photos.md §13), so does a critic that stops moving for the last part of
training let the decoder finish what the moving critic holds back? The encoder's linear decay
reaches 0 at ``CRITIC_STOP`` × max_steps (default 2/3) and stays there; the decoder's is unchanged.

    CRITIC_STOP=0.667 python experiments/critic_stop_train.py experiment=photos_mini
"""

import os

import torch

from ctrl_csc.cli import train

_orig = train.build_optimizers
_FRACTION = float(os.environ.get("CRITIC_STOP", "0.667"))


def build_optimizers(encoder, decoder, enc_opt, dec_opt, max_steps, lr_decay, final_lr_factor):
    optimizers, schedulers = _orig(
        encoder, decoder, enc_opt, dec_opt, max_steps, lr_decay, final_lr_factor
    )
    schedulers["encoder"] = torch.optim.lr_scheduler.LinearLR(
        optimizers["encoder"],
        start_factor=1.0,
        end_factor=0.0,
        total_iters=max(1, round(_FRACTION * max_steps)),
    )
    return optimizers, schedulers


train.build_optimizers = build_optimizers
train.main()
