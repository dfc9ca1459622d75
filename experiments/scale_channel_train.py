"""``ctrl-csc-train`` with the encoder's projection told each image's scale.

An experiment, not an option of the package. With λ relative to each sample's λ_max, every CSC
stage is positively homogeneous in its input, so the last code is: ``c(αx) = α c(x)`` for α > 0.
After ``normalize(W c + b)`` only the bias can tell a crop from the same crop at another contrast,
and on photos the game shrinks the bias to a quarter of ``‖W c‖`` (experiments/notes/photos.md
§15): the features cannot see contrast, nor the mean colour that scales with it. Here the
projection reads ``c / s`` and ``log s`` instead of ``c``, with ``s`` the image's root mean square:
the code's pattern and the image's scale, as two separate inputs.

    python experiments/scale_channel_train.py experiment=photos_mini   # ctrl-csc-train arguments
"""

import torch
from torch import nn

from ctrl_csc.models import csc

_init, _orig_run = csc.CSCEncoder.__init__, csc.CSCEncoder._run


class _ScaleInput(nn.Linear):
    """The projection on ``[h / s, log s]``, ``s`` set by the encoder before each call."""

    scale: torch.Tensor

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        s = self.scale[:, None]
        return super().forward(torch.cat([h / s, s.log()], 1))


def __init__(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    old = self.projection
    self.projection = _ScaleInput(old.in_features + 1, old.out_features)
    with torch.no_grad():
        self.projection.weight[:, :-1].copy_(old.weight)
        self.projection.weight[:, -1].mul_(float(kwargs.get("projection_init_scale", 0.1)))
        self.projection.bias.copy_(old.bias)


def _run(self, x, outs):
    self.projection.scale = x.pow(2).mean((1, 2, 3)).add(1e-6).sqrt()
    return _orig_run(self, x, outs)


def patch() -> None:
    """Give every ``CSCEncoder`` built from now on the scale input (also to load its runs)."""
    csc.CSCEncoder.__init__ = __init__
    csc.CSCEncoder._run = _run


if __name__ == "__main__":
    patch()
    from ctrl_csc.cli.train import main

    main()
