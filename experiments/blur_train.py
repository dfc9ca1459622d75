"""``ctrl-csc-train`` with the CSC decoder's output passed through a fixed 3×3 binomial blur.

An experiment, not an option of the package: does taking the highest frequencies out of x̂ (the
coloured speckle) help the plain game? experiments/notes/photos.md §13: no speckle, a faster
start, the same plateau; 2 dB worse on digits.

    python experiments/blur_train.py experiment=photos_mini   # any ctrl-csc-train arguments
"""

from filters import binomial_blur

from ctrl_csc.models import csc

_orig = csc.CSCDecoder._run


def _run(self, z, outs):
    return binomial_blur(_orig(self, z, outs))


csc.CSCDecoder._run = _run
from ctrl_csc.cli.train import main  # noqa: E402

main()
