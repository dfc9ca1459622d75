"""Is the decoder's speckle an oscillation of the game? Average a run's last checkpoints' weights.

Loads the checkpoints of one run (``trainer.checkpoint_every`` > 0), averages the floating-point
entries of their state dicts (parameters and batch-norm statistics; integer counters from the last
one) over the last ``--last`` of them, for both players (``--players both``) or the decoder only
(``decoder``: the last checkpoint's encoder), and prints the held-out PSNR of ``g(f(x))`` in eval
mode for the last checkpoint alone and for the average. If the speckle were noise that the game's
updates add and remove from step to step, the average would carry less of it; if it is a steady part
of the decoder, the average keeps it.

    python experiments/weight_average.py RUN/checkpoints --last 6 --players decoder --picture a.png

``--picture``: 24 held-out inputs above the last checkpoint's and the average's reconstructions.
experiments/notes/photos.md §13.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from invert_critic import images
from torchvision.utils import save_image

import ctrl_csc
from ctrl_csc.eval.metrics import psnr


def average(states: list[dict], keys: set[str] | None) -> dict:
    """The entry-wise mean of the float entries named by ``keys`` (all when None); the other
    entries from the last state."""
    out = dict(states[-1])
    for k, v in out.items():
        if v.is_floating_point() and (keys is None or k in keys):
            out[k] = torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", help="a run's checkpoints/ directory (step_*.pt)")
    ap.add_argument("--last", type=int, default=6)
    ap.add_argument("--players", choices=("both", "decoder"), default="both")
    ap.add_argument("--picture", default=None)
    args = ap.parse_args()

    paths = sorted(Path(args.checkpoints).glob("step_*.pt"))[-args.last :]
    if not paths:
        raise SystemExit(f"no step_*.pt in {args.checkpoints}: train with checkpoint_every > 0")
    loaded = [ctrl_csc.load_pretrained(str(p)) for p in paths]
    model, cfg = loaded[-1]
    states = [m.state_dict() for m, _ in loaded]
    keys = None if args.players == "both" else {k for k in states[-1] if k.startswith("decoder.")}
    x_test = images(cfg, "test")

    def reconstruct() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model.decoder(model.encoder(x_test))

    last = reconstruct()
    model.load_state_dict(average(states, keys))
    avg = reconstruct()
    print(f"{paths[0].name} .. {paths[-1].name} ({len(paths)}), players {args.players}")
    print(f"last checkpoint   held-out PSNR {float(psnr(last, x_test).mean()):.2f} dB")
    print(f"weight average    held-out PSNR {float(psnr(avg, x_test).mean()):.2f} dB")
    if args.picture:
        rows = torch.cat([x_test[:24], last[:24], avg[:24]])
        save_image(rows * 0.5 + 0.5, args.picture, nrow=24, padding=1)


if __name__ == "__main__":
    main()
