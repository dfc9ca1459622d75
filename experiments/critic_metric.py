"""What a trained critic calls near: the feature distance ``D = mean ‖f(x) − f(x')‖²`` between
held-out crops ``x`` and altered copies ``x'`` (blurs, block averages, added noise, the model's own
reconstruction), beside each copy's PSNR. experiments/notes/photos.md §14.

    python experiments/critic_metric.py CHECKPOINT [CHECKPOINT ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import ctrl_csc
from ctrl_csc.eval.metrics import psnr

sys.path.insert(0, str(Path(__file__).parent))
from filters import binomial_blur, block_average  # noqa: E402
from invert_critic import images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    torch.manual_seed(0)
    for path in args.checkpoints:
        model, cfg = ctrl_csc.load_pretrained(path)
        model.eval()
        x = images(cfg, "test")[: args.images].float()
        f = model.encoder
        with torch.no_grad():
            z = f(x)
            own = model.decoder(z)
            copies = {
                "3×3 binomial blur": binomial_blur(x),
                "2×2 block averages, enlarged": block_average(x, 2),
                "4×4 block averages, enlarged": block_average(x, 4),
                "x + white noise, σ = 0.1": x + 0.1 * torch.randn_like(x),
                "x + white noise, σ = 0.3": x + 0.3 * torch.randn_like(x),
                "its own reconstruction": own,
                "the same, 3×3 blurred": binomial_blur(own),
            }
            print(f"{path}\n| x' | PSNR | D |\n|---|---|---|")
            for name, y in copies.items():
                d = (z - f(y)).pow(2).sum(1).mean()
                print(f"| {name} | {psnr(y, x).mean():.2f} | {d:.3f} |")


if __name__ == "__main__":
    main()
