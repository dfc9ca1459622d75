"""``ctrl-csc-train`` with the encoder's CSC dictionaries at a larger learning rate.

An experiment, not an option of the package. With the dictionary term at β = 10 and a sparse first
stage (experiments/notes/sparse_deep.md §17) the first stage's atoms leave their random start
(moved 0.51) but are not the bars and flat patches of a classical dictionary, which
:func:`ctrl_csc.eval.classical.learn_classical_dictionary` reaches in 300 Adam steps at lr 1e-2 —
ten times the quickstart's lr, which also decays to 0. Is the first stage's look a matter of how
far its atoms can move? Every encoder CSC stage listed in ``DICT_STAGES`` (default ``0``) has its
atoms in their own parameter group at ``DICT_LR_SCALE`` times the encoder's learning rate (the
same schedule).

    DICT_LR_SCALE=10 python experiments/dictionary_lr_train.py \
        +model.first_stage.density=0.1 loss.dictionary_beta=10
"""

import os

from ctrl_csc.cli import train
from ctrl_csc.eval.dictionary import csc_stages

_orig = train.build_optimizers
_SCALE = float(os.environ.get("DICT_LR_SCALE", "10"))
_STAGES = {int(s) for s in os.environ.get("DICT_STAGES", "0").split(",")}


def build_optimizers(encoder, decoder, enc_opt, dec_opt, max_steps, lr_decay, final_lr_factor):
    atoms = [layer.weight for i, layer in csc_stages(encoder) if i in _STAGES]
    if len(atoms) != len(_STAGES):
        raise SystemExit(f"DICT_STAGES={sorted(_STAGES)}: not every one is a CSC stage")
    lr = enc_opt.keywords["lr"] * _SCALE
    ids = {id(p) for p in atoms}
    rest = [p for p in encoder.parameters() if id(p) not in ids]

    def grouped(_params):
        return enc_opt([{"params": rest}, {"params": atoms, "lr": lr}])

    return _orig(encoder, decoder, grouped, dec_opt, max_steps, lr_decay, final_lr_factor)


train.build_optimizers = build_optimizers
train.main()
