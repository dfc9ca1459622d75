"""``ctrl-csc-train`` with the critic applied to dihedral views of the input and its transcription.

An experiment, not an option of the package. experiments/notes/photos.md §15 reads the plain
game's decoder on photos as returning one of the images that share a feature (the *fibre* of
``f`` at ``f(x)``), and §15b found the reconstructions of different flips and transposes of a
crop to deviate from it independently. If the decoder's freedom is the fibre, a critic that
compares ``f(V_k x)`` with ``f(V_k x̂)`` for ``K`` views ``V_k`` leaves it only the intersection
of the ``K`` fibres, nearer the image. The objective stays the game's: both players' objective is
the mean over the views of the sample-wise CTRL objective of ``(f(V_k X), f(V_k X̂))``, with
``X̂ = g(f(X))`` (the decoder sees the identity view's feature only); no pixel term.

    VIEWS=4 python experiments/views_train.py experiment=photos_mini
"""

import os
import sys
from pathlib import Path

import torch
from torch import nn

import ctrl_csc.engine
from ctrl_csc.cli import train
from ctrl_csc.losses import ObjectiveTerms

sys.path.insert(0, str(Path(__file__).parent))
from invert_critic import view  # noqa: E402

_VIEWS = int(os.environ.get("VIEWS", "4"))
if _VIEWS not in (2, 4, 8):
    raise SystemExit(f"VIEWS={_VIEWS}: give 2, 4 or 8 (1 is the plain game: ctrl-csc-train)")


class ViewsObjective(nn.Module):
    """The mean of ``objective`` over ``views`` equal chunks of the batch (one chunk per view)."""

    def __init__(self, objective: nn.Module, views: int) -> None:
        super().__init__()
        self.objective, self.views = objective, views
        self.needs_labels = objective.needs_labels

    def forward(self, Z, Zh, labels=None) -> ObjectiveTerms:  # noqa: N803
        parts = [
            self.objective(z, zh, labels)
            for z, zh in zip(Z.chunk(self.views), Zh.chunk(self.views), strict=True)
        ]
        return ObjectiveTerms(
            total=sum(p.total for p in parts) / self.views,
            decoder_total=sum(p.decoder_total for p in parts) / self.views,
            terms={k: sum(p.terms[k] for p in parts) / self.views for k in parts[0].terms},
        )


class ViewsCTRLStep(ctrl_csc.engine.CTRLStep):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.joint_batch or self.uses_codes or self.objective.needs_labels:
            raise SystemExit("views_train.py: only the plain sample-wise game")
        self.objective = ViewsObjective(self.objective, _VIEWS)

    def _encode_pair(self, f, x, x_hat, z):
        others = torch.cat([view(x, k) for k in range(1, _VIEWS)])
        Z = torch.cat([z, f(others)])  # noqa: N806
        Zh = f(torch.cat([view(x_hat, k) for k in range(_VIEWS)]))  # noqa: N806
        return Z, Zh


ctrl_csc.engine.CTRLStep = ViewsCTRLStep
train.main()
