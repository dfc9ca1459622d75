"""Does a trained CTRL encoder pin down the image? Invert it with a decoder trained against it.

Loads a checkpoint or release of a sample-wise CTRL run, freezes its encoder ``f`` and trains a
decoder ``g`` — a fresh one (``--fresh``: the run's decoder architecture at new random weights)
or the run's own — on the game's decoder objective alone, ``ΔR(Z, Ẑ) + β·mean ‖z − ẑ‖²`` with
``Z = f(X)``, ``Ẑ = f(g(Z))`` (the run's ε², β and distance; Adam, betas (0.5, 0.999), linear decay
to 0, batches of 128 training images). Every ``--every`` steps: the held-out PSNR of ``g(f(x))``
and the feature distance ``D``. If the encoder's features determined the image, a decoder that
matches them would reconstruct it; a low PSNR at a small ``D`` says the objective's minimisers at
this critic are not the images.

    python experiments/invert_critic.py CHECKPOINT --steps 1500 --fresh --picture inv.png

``--picture``: 24 held-out inputs above their inversions. experiments/notes/photos.md §12.
``--pixel`` trains the decoder on the pixel error instead: not the game, a probe of how much of
the image the frozen features hold; ``--then-game N`` then trains that decoder N steps on the
game's objective against the same frozen critic (§14). ``--views K`` averages the game's
objective over K flips and transposes of the input and its transcription (§20).
"""

from __future__ import annotations

import argparse
import math

import torch
from torchvision.utils import save_image

import ctrl_csc
from ctrl_csc.data import build_dataset
from ctrl_csc.eval.metrics import psnr
from ctrl_csc.losses import CTRLObjective
from ctrl_csc.pretrained.guard import build_models


def images(cfg: dict, split: str) -> torch.Tensor:
    """Every image of the run's dataset split, as one tensor."""
    data = dict(cfg["dataset"])
    options = {}
    if data["name"] == "natural_patches":
        options = {k: data[k] for k in ("photos", "train_size", "test_size") if data.get(k)}
        options["photos"] = list(options.get("photos", [])) or None
    ds = build_dataset(data["name"], split, **options)
    return torch.stack([ds[i][0] for i in range(len(ds))])


class last_code(torch.nn.Module):  # noqa: N801 (used as a function of the encoder)
    """A CSC encoder's last stage code, flattened: its feature before the projection."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.dim = math.prod(encoder.code_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder
        return f.activations[-1](f.norms[-1](f.stage_outputs(x)[-1])).flatten(1)


def view(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """The k-th of the 8 dihedral views of square images (k = 0 is the identity): bit 2
    transposes, bits 0 and 1 flip the last and the second-last axis; ``inverse`` undoes it."""
    flips = [d for bit, d in ((0, -1), (1, -2)) if k >> bit & 1]
    if inverse and k & 4:
        x = x.transpose(-1, -2)
    if flips:
        x = x.flip(flips)
    if not inverse and k & 4:
        x = x.transpose(-1, -2)
    return x


def _spectrum(a: torch.Tensor) -> torch.Tensor:
    return torch.fft.fft2(a.double())


def _band_cross(fa: torch.Tensor, fb: torch.Tensor, bands: int = 4) -> list[float]:
    """Mean per-pixel ⟨a, b⟩ from the spectra ``fa``, ``fb`` (:func:`_spectrum`) in octave bands
    of spatial frequency, measured as ``max(|k_y|, |k_x|)`` over Nyquist (the last band up to
    Nyquist, the first from 0); the bands sum to the whole inner product (Parseval)."""
    h, w = fa.shape[-2:]
    ky = torch.fft.fftfreq(h).abs()[:, None]
    kx = torch.fft.fftfreq(w).abs()[None, :]
    radius = torch.maximum(ky, kx) * 2  # 1 at Nyquist
    edges = [0.0] + [2.0 ** (k - bands + 1) for k in range(bands)]
    edges[-1] = 1.01
    prod = (fa * fb.conj()).real.sum((0, 1)) / (fa.numel() * h * w)
    return [float(prod[(radius >= lo) & (radius < hi)].sum()) for lo, hi in zip(edges, edges[1:])]


def against_own(x: torch.Tensor, mean: torch.Tensor, own: torch.Tensor) -> str:
    """If the run's decoder drew ``own`` from the posterior of images given the feature and the
    probe ``mean`` were that posterior's mean, ``own − mean`` would have the power of
    ``x − mean`` and be uncorrelated with it, so ``own`` would have twice the probe's squared error
    (3.01 dB less PSNR). Each band: the powers of the two deviations and their correlation."""
    e, s = x - mean, own - mean
    rows = ["| band (of Nyquist) | ‖x − m‖² | ‖x̂ − m‖² | corr(x − m, x̂ − m) | ‖x − x̂‖² |",
            "|---|---|---|---|---|"]  # fmt: skip
    names = ["0–1/8", "1/8–1/4", "1/4–1/2", "1/2–1", "all"]
    fe, fs = _spectrum(e), _spectrum(s)
    ee, ss, es = _band_cross(fe, fe), _band_cross(fs, fs), _band_cross(fe, fs)
    ee, ss, es = ee + [sum(ee)], ss + [sum(ss)], es + [sum(es)]
    for name, a, b, c in zip(names, ee, ss, es):
        rows.append(
            f"| {name} | {a:.5f} | {b:.5f} | {c / (a * b) ** 0.5:+.3f} | {a + b - 2 * c:.5f} |"
        )
    ratio = float((x - own).pow(2).mean() / e.pow(2).mean())
    rows.append(
        f"probe {float(psnr(mean, x).mean()):.2f} dB, own decoder {float(psnr(own, x).mean()):.2f}"
        f" dB, own / probe squared error {ratio:.2f} (a posterior sampler: 2.00)"
    )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--fresh", action="store_true", help="a decoder at new random weights")
    ap.add_argument(
        "--pixel",
        action="store_true",
        help="train the decoder on ‖g(f(x)) − x‖² instead (a probe of what the frozen features "
        "hold about the image, not the game)",
    )
    ap.add_argument(
        "--then-game",
        type=int,
        default=0,
        metavar="STEPS",
        help="after --pixel, train the same decoder this many steps on the game's objective "
        "(does the game keep the probe's images?)",
    )
    ap.add_argument(
        "--against-own",
        action="store_true",
        help="after --fresh --pixel: split the run's own reconstructions' error into the probe's "
        "error and their distance from the probe, by spatial frequency (is the game's decoder a "
        "posterior sampler given its features?)",
    )
    ap.add_argument(
        "--from-code",
        action="store_true",
        help="with --fresh --pixel: the probe reads the encoder's last stage code (flattened)"
        " instead of its feature: what the CSC stages keep, before the projection",
    )
    ap.add_argument(
        "--views",
        type=int,
        default=1,
        choices=(1, 2, 4, 8),
        help="the game's objective averaged over this many dihedral views V_k of the input and "
        "its transcription, f(V_k x) against f(V_k g(f(x))): a critic whose fibres are the "
        "intersection of the views' (does the decoder then move from a sample to the mean?)",
    )
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--picture", default=None)
    args = ap.parse_args()
    for flag in ("against_own", "from_code"):
        if getattr(args, flag) and not (args.fresh and args.pixel):
            ap.error(f"--{flag.replace('_', '-')} needs --fresh --pixel")
    if args.against_own and args.from_code:
        ap.error("--against-own compares with the run's decoder, which reads the feature")

    model, cfg = ctrl_csc.load_pretrained(args.checkpoint)
    f, g = model.encoder.eval(), model.decoder
    if args.from_code:
        f = last_code(f)
        cfg["model"]["decoder"]["feature_dim"] = f.dim
    if args.fresh:
        torch.manual_seed(1)
        _, g = build_models(cfg["model"], "cpu")
    g.train()
    for p in f.parameters():
        p.requires_grad_(False)
    x_train, x_test = images(cfg, "train"), images(cfg, "test")
    # a run trained by another loss (an autoencoder's encoder, as a control): the quickstart's
    o = cfg["loss"].get("objective") or {"eps_sq": 0.5, "beta": 10.0, "distance": "l2"}
    objective = CTRLObjective("samplewise", eps_sq=o["eps_sq"], beta=o["beta"],
                              distance=o["distance"], encoder_beta=0.0)  # fmt: skip

    def evaluate() -> str:
        g.eval()
        with torch.no_grad():
            z = f(x_test)
            x_hat = g(z)
            d = (z - f(x_hat)).pow(2).sum(1).mean()
            out = f"held-out PSNR {float(psnr(x_hat, x_test).mean()):.2f} dB  D {float(d):.4f}"
        g.train()
        return out

    print("start", evaluate(), flush=True)
    gen = torch.Generator().manual_seed(0)

    def train(steps: int, pixel: bool, label: str) -> None:
        opt = torch.optim.Adam(g.parameters(), lr=args.lr, betas=(0.5, 0.999))
        decay = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, steps)
        for step in range(1, steps + 1):
            x = x_train[torch.randint(len(x_train), (128,), generator=gen)]
            with torch.no_grad():
                z = f(x)
            if pixel:
                loss = (g(z) - x).pow(2).flatten(1).sum(1).mean()
            else:
                x_hat = g(z)
                loss = (
                    sum(
                        objective(f(view(x, k)) if k else z, f(view(x_hat, k)), None).decoder_total
                        for k in range(args.views)
                    )
                    / args.views
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
            if step % args.every == 0 or step == steps:
                print(label, step, evaluate(), flush=True)

    def picture(path: str) -> None:
        g.eval()
        shown = x_test[:: max(1, len(x_test) // 24)][:24]
        with torch.no_grad():
            save_image(torch.cat([shown, g(f(shown))]) * 0.5 + 0.5, path, nrow=24)
        g.train()

    train(args.steps, args.pixel, "pixel" if args.pixel else "game")
    if args.against_own:
        g.eval()
        with torch.no_grad():
            z = f(x_test)
            print(against_own(x_test, g(z), model.decoder.eval()(z)))
        g.train()
    if args.pixel and args.then_game:
        if args.picture:
            picture(args.picture.removesuffix(".png") + "_pixel.png")
        train(args.then_game, False, "then game")
    if args.picture:
        picture(args.picture)


if __name__ == "__main__":
    main()
