"""``ctrl-csc-train`` with the decoder's last stage reading its input times a fixed gain.

An experiment, not an option of the package. The decoder's last (synthesis) stage sums unit-norm
atoms weighted by the code of the inverse-CSC stage before it, which has no norm, so its output
(the image before tanh) has that code's scale. ISTA from zero makes the code larger with every
step: at initialisation on digits the pre-tanh output's mean ``|x|`` is 0.70 at T = 2 and 1.21 at
T = 5 (1.7x), deeper into tanh's saturation. Here the last stage reads ``DECODER_GAIN · h``
(``DECODER_GAIN=0.59`` gives T = 5's decoder T = 2's initial output scale); the atoms, being
normalised, cannot undo it, and the norms before it can.

    DECODER_GAIN=0.59 python experiments/decoder_gain_train.py model.n_iter=5  # ctrl-csc-train args
"""

import os

from ctrl_csc.models import csc

_run = csc.CSCDecoder._run


def _gained_run(self, z, outs):
    last = self.stages[-1]
    gain = float(os.environ.get("DECODER_GAIN", "1"))
    forward = last.forward

    def scaled(h, *args, **kwargs):
        return forward(gain * h, *args, **kwargs)

    last.forward = scaled
    try:
        return _run(self, z, outs)
    finally:
        del last.forward  # back to the class's method


if __name__ == "__main__":
    csc.CSCDecoder._run = _gained_run
    from ctrl_csc.cli.train import main

    main()
