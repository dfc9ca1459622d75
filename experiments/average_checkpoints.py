"""Does the game's decoder draw a different sample at each step? Average a run's late checkpoints.

experiments/notes/photos.md §15 reads the plain game's decoder on photos as returning one of the
images that share a feature (a posterior sample), at about twice the squared error of their mean.
If the sample it returns changes from step to step, averaging over steps moves it towards the
mean, as averaging over views did (§15b). For the last ``K`` periodic checkpoints of a run
(``trainer.checkpoint_every``), on the held-out images:

* *each*: the mean PSNR of each checkpoint's own ``g_t(f_t(x))``;
* *outputs averaged*: the PSNR of ``mean_t g_t(f_t(x))`` (a measurement, not a model);
* *weights averaged*: the PSNR of one model whose parameters are the mean of the checkpoints'
  (both players; the CSC stages re-estimate their step sizes for the averaged atoms), and of the
  last checkpoint's encoder with the averaged decoder.

    python experiments/average_checkpoints.py RUN_DIR [--last 1 2 4 8 16] [--picture PATH]

``--picture``: 24 held-out inputs above the last checkpoint's reconstructions and those of the
weights averaged over the largest ``K``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torchvision.utils import save_image

import ctrl_csc
from ctrl_csc.eval.metrics import psnr

sys.path.insert(0, str(Path(__file__).parent))
from invert_critic import images  # noqa: E402


def averaged(models: list[torch.nn.Module]) -> torch.nn.Module:
    """A copy of the last model whose floating-point parameters and buffers are the mean of all
    the models' (integer buffers, e.g. counters, are the last model's)."""
    out = copy.deepcopy(models[-1])
    states = [m.state_dict() for m in models]
    mean = {
        k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
        for k, v in states[-1].items()
    }
    out.load_state_dict(mean)
    return out.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--last", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--picture", default=None)
    args = ap.parse_args()
    paths = sorted((Path(args.run_dir) / "checkpoints").glob("step_*.pt"))
    if not paths:
        ap.error(f"no checkpoints/step_*.pt under {args.run_dir} (train with checkpoint_every)")
    models, cfg = [], None
    for p in paths[-max(args.last) :]:
        model, cfg = ctrl_csc.load_pretrained(str(p))
        models.append(model.eval())
    x = images(cfg, "test")
    with torch.no_grad():
        outs = [m(x)[1] for m in models]
        print(f"{args.run_dir}: checkpoints {paths[-len(models)].name} … {paths[-1].name}")
        print("| last K | each (mean) | outputs averaged | weights averaged | "
              "last encoder, decoder averaged |\n|---|---|---|---|---|")  # fmt: skip
        for k in sorted(set(min(k, len(models)) for k in args.last)):
            each = sum(float(psnr(o, x).mean()) for o in outs[-k:]) / k
            mean_out = float(psnr(torch.stack(outs[-k:]).mean(0), x).mean())
            both = averaged(models[-k:])
            recon = both(x)[1]
            weights = float(psnr(recon, x).mean())
            mixed = float(psnr(both.decoder(models[-1].encoder(x)), x).mean())
            print(f"| {k} | {each:.2f} | {mean_out:.2f} | {weights:.2f} | {mixed:.2f} |")
        if args.picture:
            shown = slice(None, None, max(1, len(x) // 24))
            rows = [t[shown][:24] for t in (x, outs[-1], recon)]
            save_image(torch.cat(rows) * 0.5 + 0.5, args.picture, nrow=24)


if __name__ == "__main__":
    main()
