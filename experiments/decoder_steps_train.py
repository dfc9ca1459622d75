"""``ctrl-csc-train`` with ``DECODER_STEPS`` decoder updates per encoder update.

An experiment, not (yet) an option of the package (``loss.encoder_steps`` is the other way
round). Against its frozen critic the game's decoder objective keeps a 20.3 dB decoder where the
game's own decoder sits at 18.4 dB with a larger feature distance (experiments/notes/photos.md
§14): is the decoder lagging behind its critic?

    DECODER_STEPS=2 python experiments/decoder_steps_train.py experiment=photos_mini
"""

import os

from ctrl_csc.engine import steps

_EXTRA = int(os.environ.get("DECODER_STEPS", "2")) - 1
_call = steps.CTRLStep.__call__


def __call__(self, game, x, y):
    out = _call(self, game, x, y)
    labels = y if self.objective.needs_labels else None
    for _ in range(_EXTRA):
        self.decoder_phase(game, x, labels)
    return out


steps.CTRLStep.__call__ = __call__
from ctrl_csc.cli.train import main  # noqa: E402

main()
