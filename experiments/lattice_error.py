"""Is a reconstruction's error at the decoder's stride lattice? The share of the error's power
within one frequency bin of the period-2 alias frequencies ((½, ½), (½, 0), (0, ½) of the sampling
rate) and of the period-4 ones, beside the share of the spectrum those bins cover.

A regular dot grid drawn by stride-2 stages puts its power there; if the share is no larger than
the bins' area, the grid is what the eye picks out, not where the squared error is.
experiments/notes/photos.md §19.

    python experiments/lattice_error.py CHECKPOINT [CHECKPOINT ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import ctrl_csc

sys.path.insert(0, str(Path(__file__).parent))
from invert_critic import images  # noqa: E402


def lattice_masks(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the FFT bins within one bin of the period-2 and period-4 alias frequencies."""
    fy = torch.fft.fftfreq(h).abs()[:, None]
    fx = torch.fft.fftfreq(w).abs()[None, :]

    def near(a: float, b: float) -> torch.Tensor:
        return ((fy - a).abs() <= 1 / h + 1e-9) & ((fx - b).abs() <= 1 / w + 1e-9)

    period2 = near(0.5, 0.5) | near(0.5, 0) | near(0, 0.5)
    period4 = near(0.25, 0.25) | near(0.25, 0) | near(0, 0.25) | near(0.5, 0.25) | near(0.25, 0.5)
    return period2, period4


def shares(e: torch.Tensor, masks: tuple[torch.Tensor, ...]) -> list[float]:
    """The share of ``e``'s power (summed over images and channels) in each mask's bins."""
    power = torch.fft.fft2(e.double()).abs().pow(2).sum((0, 1))
    total = power.sum()
    return [(power[m].sum() / total).item() for m in masks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    print("| model | error at period 2 | area | error at period 4 | area |")
    print("|---|---|---|---|---|")
    for path in args.checkpoints:
        model, cfg = ctrl_csc.load_pretrained(path)
        model.eval()
        x = images(cfg, "test")[: args.images].float()
        with torch.no_grad():
            _, x_hat = model(x)
        masks = lattice_masks(*x.shape[-2:])
        s2, s4 = shares(x_hat - x, masks)
        a2, a4 = (m.double().mean().item() for m in masks)
        print(f"| {path} | {s2:.3f} | {a2:.3f} | {s4:.3f} | {a4:.3f} |")


if __name__ == "__main__":
    main()
