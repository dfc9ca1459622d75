"""Density–PSNR figure: each run's held-out PSNR against its encoder stages' code densities.

Reads ``metrics.json`` of each training run directory (``psnr`` and ``density/enc{i}``) and draws
one point per stage density (the run's stages joined by a line), so that a run whose every stage
is sparse lies left of the target line.

Usage::

    python experiments/density_psnr.py OUT.png "T=2=outputs/run_a" "T=5, λ=0.2=outputs/run_b"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def read_run(directory: str) -> tuple[float, list[float]]:
    metrics = json.loads((Path(directory) / "metrics.json").read_text())
    stages = sorted(
        int(k.removeprefix("density/enc")) for k in metrics if k.startswith("density/enc")
    )
    return float(metrics["psnr"]), [float(metrics[f"density/enc{i}"]) for i in stages]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output")
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--target", type=float, default=0.20, help="density target (a line)")
    args = parser.parse_args()
    fig = Figure(figsize=(10, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # one colour per run, up to 20: tab20's ten dark shades first, then their light pairs
    tab20 = matplotlib.colormaps["tab20"].colors
    colours = tab20[0::2] + tab20[1::2]
    for i, spec in enumerate(args.runs):
        label, directory = spec.rsplit("=", 1)
        psnr, densities = read_run(directory)
        ax.plot(densities, [psnr] * len(densities), "-", color="0.8", zorder=1)
        ax.scatter(
            densities,
            [psnr] * len(densities),
            label=f"{label} ({psnr:.2f} dB)",
            color=colours[i % 20],
            zorder=2,
        )
        print(f"{label}: {psnr:.2f} dB, densities " + " / ".join(f"{d:.2f}" for d in densities))
    ax.axvline(args.target, color="k", linestyle="--", linewidth=0.8)
    ax.set_xlabel("code density of each encoder stage (held-out)")
    ax.set_ylabel("held-out PSNR (dB)")
    # beside the axes, so that no point hides behind it
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)


if __name__ == "__main__":
    main()
