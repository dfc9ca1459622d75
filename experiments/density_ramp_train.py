"""``ctrl-csc-train`` with each encoder stage's code density lowered gradually to its target.

An experiment, not an option of the package. With ``density: ρ`` on every encoder stage the game
starts late (experiments/notes/sparse_deep.md §16: its decoder needs about twice the steps of the
dense game's to catch its critic, the gradient at x̂ passing a fifth of each stage's entries).
Does starting dense and reaching ρ over the first steps remove that cost? Each stage with a
density gets, at step t, ``ρ_t = ρ + (RAMP_FROM − ρ)·max(0, 1 − t / RAMP_STEPS)``; from
``RAMP_STEPS`` on it is the configured ρ.

    RAMP_FROM=0.5 RAMP_STEPS=250 python experiments/density_ramp_train.py \
        +model.encoder.stage_defaults.density=0.2
"""

import os

from ctrl_csc.cli import train

_orig = train.build_optimizers
_FROM = float(os.environ.get("RAMP_FROM", "0.5"))
_STEPS = int(os.environ.get("RAMP_STEPS", "250"))


def build_optimizers(encoder, decoder, enc_opt, dec_opt, max_steps, lr_decay, final_lr_factor):
    optimizers, schedulers = _orig(
        encoder, decoder, enc_opt, dec_opt, max_steps, lr_decay, final_lr_factor
    )
    stages = [(m, m.density) for m in encoder.modules() if getattr(m, "density", None) is not None]
    if not stages:
        raise SystemExit(
            "no encoder stage has a density: add +model.encoder.stage_defaults.density=R"
        )
    if "encoder" not in schedulers:
        raise SystemExit("the ramp follows the encoder's lr schedule: set optim.lr_decay=linear")
    scheduler = schedulers["encoder"]
    step_orig = scheduler.step

    def set_densities():
        left = max(0.0, 1.0 - scheduler.last_epoch / _STEPS)
        for module, target in stages:
            module.density = target + (_FROM - target) * left

    def step(*args, **kwargs):
        step_orig(*args, **kwargs)
        set_densities()

    scheduler.step = step
    set_densities()
    return optimizers, schedulers


train.build_optimizers = build_optimizers
train.main()
