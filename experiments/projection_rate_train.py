"""``ctrl-csc-train`` with the encoder's projection moving ``PROJECTION_RATE`` times slower.

An experiment, not an option of the package. Adam moves every weight of the projection
``normalize(W c + b)`` by about its learning rate per step whatever the code's scale, so the
features move at a rate that grows with ``‖c‖₁``: ten times faster at T = 10 than at T = 2, whose
last code is ten times smaller (experiments/notes/sparse_deep.md §2). Here the projection reads
``PROJECTION_RATE · c`` with its initial weight divided by the same factor: the same initial
features, and each Adam step moves ``W c`` ``PROJECTION_RATE`` times less (the dictionaries and
the decoder as before). sparse_deep.md §14.

    PROJECTION_RATE=0.1 python experiments/projection_rate_train.py \
        model.encoder.stage_defaults.n_iter=10
"""

import os

import torch
from torch import nn

from ctrl_csc.models import csc

_RATE = float(os.environ.get("PROJECTION_RATE", "0.1"))
_init = csc.CSCEncoder.__init__


class _Slower(nn.Linear):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(h * _RATE)


def __init__(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    old = self.projection
    self.projection = _Slower(old.in_features, old.out_features)
    self.projection.load_state_dict(old.state_dict())
    with torch.no_grad():
        self.projection.weight.div_(_RATE)


if __name__ == "__main__":
    csc.CSCEncoder.__init__ = __init__
    from ctrl_csc.cli.train import main

    main()
