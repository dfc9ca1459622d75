"""Reconstructions averaged over the eight flips and transposes of each held-out image.

A measurement, not the method: ``x̄ = mean_k V_k⁻¹ g(f(V_k x))`` over the dihedral views ``V_k``.
If the decoder's deviation from the mean of the images sharing a feature were independent from
view to view (a posterior sample per view), averaging K views would bring its squared error from
twice that of the mean towards ``1 + 1/K`` times it. experiments/notes/photos.md §15.

    python experiments/view_average.py CHECKPOINT [CHECKPOINT ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import ctrl_csc
from ctrl_csc.eval.metrics import psnr

sys.path.insert(0, str(Path(__file__).parent))
from invert_critic import images, view  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    for path in args.checkpoints:
        model, cfg = ctrl_csc.load_pretrained(path)
        model.eval()
        x = images(cfg, "test")
        with torch.no_grad():
            outs = [view(model(view(x, k))[1], k, inverse=True) for k in range(8)]
        print(
            f"{path}\n| views | PSNR of each view (mean) | PSNR of their average |\n|---|---|---|"
        )
        for k in (1, 2, 4, 8):
            single = sum(float(psnr(o, x).mean()) for o in outs[:k]) / k
            average = float(psnr(torch.stack(outs[:k]).mean(0), x).mean())
            print(f"| {k} | {single:.2f} | {average:.2f} |")


if __name__ == "__main__":
    main()
