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
import torch.nn.functional as F

import ctrl_csc
from ctrl_csc.eval.metrics import psnr

sys.path.insert(0, str(Path(__file__).parent))
from invert_critic import images  # noqa: E402


def blur(x: torch.Tensor) -> torch.Tensor:
    """A 3 × 3 binomial filter, edges replicated."""
    k = torch.tensor([1.0, 2.0, 1.0])
    w = (k[:, None] * k[None, :] / 16.0).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), w, groups=x.shape[1])


def blocks(x: torch.Tensor, s: int) -> torch.Tensor:
    """Averages over ``s × s`` blocks, enlarged back (bilinear)."""
    return F.interpolate(F.avg_pool2d(x, s), scale_factor=s, mode="bilinear")


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
                "3×3 binomial blur": blur(x),
                "2×2 block averages, enlarged": blocks(x, 2),
                "4×4 block averages, enlarged": blocks(x, 4),
                "x + white noise, σ = 0.1": x + 0.1 * torch.randn_like(x),
                "x + white noise, σ = 0.3": x + 0.3 * torch.randn_like(x),
                "its own reconstruction": own,
                "the same, 3×3 blurred": blur(own),
            }
            print(f"{path}\n| x' | PSNR | D |\n|---|---|---|")
            for name, y in copies.items():
                d = (z - f(y)).pow(2).sum(1).mean()
                print(f"| {name} | {psnr(y, x).mean():.2f} | {d:.3f} |")


if __name__ == "__main__":
    main()
