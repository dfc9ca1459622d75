"""``ctrl-csc-train`` with the CSC decoder's output passed through a fixed 3×3 binomial blur.

An experiment, not an option of the package: does taking the highest frequencies out of x̂ (the
coloured speckle) help the plain game? experiments/notes/photos.md §13: no speckle, a faster
start, the same plateau; 2 dB worse on digits.

    python experiments/blur_train.py experiment=photos_mini   # any ctrl-csc-train arguments
"""

import torch
import torch.nn.functional as F

from ctrl_csc.models import csc

_orig = csc.CSCDecoder._run


def _run(self, z, outs):
    x = _orig(self, z, outs)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16.0
    w = k.to(x).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), w, groups=x.shape[1])


csc.CSCDecoder._run = _run
from ctrl_csc.cli.train import main  # noqa: E402

main()
