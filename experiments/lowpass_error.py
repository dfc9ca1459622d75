"""How much of a model's reconstruction error is coarse? PSNR of ``g(f(x))`` against ``x`` after
both are reduced to s × s area averages (and bilinearly enlarged back), beside the same for the
best rank-k linear code (PCA of the training images) and for the s × s thumbnails themselves.

If the reconstructions are wrong already at 1 × 1 (each image's mean colour) or 2 × 2, the
features do not pin down what a pixel loss gets first; if they are right there and wrong only at
8 × 8 and finer, the missing part is detail. experiments/notes/photos.md §14.

    python experiments/lowpass_error.py CHECKPOINT [CHECKPOINT ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import ctrl_csc
from ctrl_csc.eval.metrics import psnr

sys.path.insert(0, str(Path(__file__).parent))
from invert_critic import images  # noqa: E402

SIZES = (1, 2, 4, 8, 16)


def lowpass(x: torch.Tensor, s: int) -> torch.Tensor:
    small = F.adaptive_avg_pool2d(x, s)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def row(name: str, x: torch.Tensor, y: torch.Tensor) -> str:
    cells = [f"{psnr(lowpass(x, s), lowpass(y, s)).mean():.2f}" for s in SIZES]
    return f"| {name} | {psnr(x, y).mean():.2f} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    print("| reconstruction | full | " + " | ".join(f"{s}×{s}" for s in SIZES) + " |")
    print("|---|" + "---|" * (len(SIZES) + 1))
    first = True
    for path in args.checkpoints:
        model, cfg = ctrl_csc.load_pretrained(path)
        model.eval()
        x = images(cfg, "test")[: args.images].float()
        if first:
            xt = images(cfg, "train").double().flatten(1)
            mu = xt.mean(0)
            _, _, vt = torch.linalg.svd(xt - mu, full_matrices=False)
            flat = x.double().flatten(1)
            for k in (4, 8, 16, 128):
                code = (flat - mu) @ vt[:k].T
                rec = (mu + code @ vt[:k]).view_as(x).float()
                print(row(f"PCA, rank {k}", rec, x))
            for s in (1, 2, 4):
                print(row(f"{s}×{s} thumbnail", lowpass(x, s), x))
            first = False
        with torch.no_grad():
            rec = torch.cat([model.decoder(model.encoder(b)) for b in x.split(250)])
        print(row(path, rec.float(), x))


if __name__ == "__main__":
    main()
