"""``ctrl-csc-train`` with an extra term added to one player's loss at every step of the game.

Shared by the one-off variants of the game in this folder (``consistency_train.py``,
``multiscale_train.py``): ``train_with_term("encoder", term)`` runs the training command with
``term(game, x)`` added to what that player *descends* in every :class:`CTRLStep`.
"""

from collections.abc import Callable

import torch

from ctrl_csc.engine import steps


def train_with_term(player: str, term: Callable[[object, torch.Tensor], torch.Tensor]) -> None:
    call = steps.CTRLStep.__call__

    def __call__(self, game, x, y):
        update = game.update

        def with_term(players, loss, last=False):
            if tuple(players) == (player,):
                loss = loss + term(game, x)
            return update(players, loss, last)

        game.update = with_term
        try:
            return call(self, game, x, y)
        finally:
            del game.update

    steps.CTRLStep.__call__ = __call__
    from ctrl_csc.cli.train import main

    main()
