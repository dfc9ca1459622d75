"""What the number of unrolled steps T does to a CSC-CTRL encoder and to the game's gradients.

For a checkpoint or release (and, with ``--init``, the same models at the run's initial weights),
with every solver of the encoder and decoder set to each T of ``--T``, on held-out images:

- the features' mean cosine between different images, R(Z), and the sample-wise distance of the
  decoder's images' features to the images' (where the game starts, with ``--init``);
- per encoder stage: the code's density (fraction non-zero) and its scale ``‖c‖ / ‖input‖``;
- the norm of the last code (the projection's input) and of the feature before the sphere;
- the encoder's Jacobian ``∂f(x)/∂x`` (d × pixels) on a few images: its largest singular value,
  its effective rank (singular values above 1 % of the largest) and the share of the decoder's
  error ``g(f(x)) − x`` that lies in its row space (what the feature can see of that error);
- the gradient norms of one step of the game: the decoder's objective with respect to the
  decoder's parameters, and the encoder's objective with respect to each encoder stage's atoms.

Usage (experiments/notes/sparse_deep.md, item 1)::

    python experiments/unroll_diagnostics.py quickstart --T 1 2 5 10 --init
    python experiments/unroll_diagnostics.py outputs/.../checkpoints/last.pt --T 5
"""

from __future__ import annotations

import argparse

import torch
from hydra.utils import instantiate

from ctrl_csc.cli.common import build_datasets
from ctrl_csc.cli.evaluate import initial_models
from ctrl_csc.nn.solver import UnrolledLasso
from ctrl_csc.pretrained import load_pretrained


def set_unroll(*modules: torch.nn.Module, n_iter: int) -> None:
    for module in modules:
        for m in module.modules():
            if isinstance(m, UnrolledLasso):
                m.n_iter = n_iter


def pre_sphere(encoder, x):
    """``(last code, feature before the normalisation to the sphere, codes)``."""
    _, codes = encoder.forward_with_codes(x)
    last = codes[-1].flatten(1)
    return last, encoder.projection(last), codes


def jacobian_rows(encoder, x, err):
    """``(σ_max, effective rank, share of err in the row space)`` averaged over images."""
    out = []
    for xi, ei in zip(x, err, strict=True):
        jac = torch.autograd.functional.jacobian(
            lambda t, xi=xi: encoder(t.view(1, *xi.shape))[0], xi.flatten()
        )
        s = torch.linalg.svdvals(jac)
        rank = int((s > 0.01 * s[0]).sum())
        u, _, _ = torch.linalg.svd(jac.T, full_matrices=False)  # (pixels, d)
        basis = u[:, :rank]
        e = ei.flatten()
        out.append((float(s[0]), rank, float((basis.T @ e).norm() ** 2 / e.norm() ** 2)))
    return [sum(v) / len(v) for v in zip(*out, strict=True)]


def measure(encoder, decoder, objective, x, n_jac: int) -> dict[str, float]:
    encoder.eval(), decoder.eval()
    row: dict[str, float] = {}
    with torch.no_grad():
        last, feat, codes = pre_sphere(encoder, x)
        inputs = [x, *codes[:-1]]
        for i, (c, u) in enumerate(zip(codes, inputs, strict=True)):
            row[f"density{i}"] = float((c != 0).float().mean())
            row[f"scale{i}"] = float((c.flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1)).mean())
        row["last_code_norm"] = float(last.norm(dim=1).mean())
        row["pre_sphere_norm"] = float(feat.norm(dim=1).mean())
        z = encoder(x)
        x_hat = decoder(z)
        row["psnr"] = float(10 * torch.log10(4 / (x_hat.clamp(-1, 1) - x).pow(2).mean()))
        # where the game stands: the spread of the features and how far the decoder's are
        gram = z @ z.T
        row["mean_cos"] = float(gram[~torch.eye(len(z), dtype=torch.bool)].mean())
        start = objective(z, encoder(x_hat), None).as_dict()
        row["R_Z"] = float(start["R_Z"])
        row["samplewise"] = float(start["samplewise_distance"])
    sigma, rank, share = jacobian_rows(encoder, x[:n_jac], (x_hat - x)[:n_jac])
    row.update(jac_sigma_max=sigma, jac_rank=rank, err_in_rowspace=share)
    # decoder phase: gradient of its objective w.r.t. its parameters (encoder held)
    decoder.zero_grad(), encoder.zero_grad()
    terms = objective(z.detach(), encoder(decoder(z.detach())), None)
    terms.decoder_total.backward()
    row["grad_decoder"] = float(
        torch.cat([p.grad.flatten() for p in decoder.parameters() if p.grad is not None]).norm()
    )
    # encoder phase: gradient of what it maximises w.r.t. each stage's atoms
    encoder.zero_grad()
    with torch.no_grad():
        x_hat = decoder(encoder(x))
    terms = objective(encoder(x), encoder(x_hat), None)
    terms.total.backward()
    for i, stage in enumerate(encoder.stages):
        row[f"grad_enc{i}"] = float(stage.weight.grad.norm())
    # how far one Adam-like first step (every parameter by lr · sign of its gradient) moves the
    # features: 1 − cos(f_θ(x), f_θ'(x)) at lr = 1e-3
    row["feature_move"] = _sign_step_move(encoder, x, lr=1e-3)
    encoder.zero_grad(), decoder.zero_grad()
    return row


def _sign_step_move(encoder, x, lr: float) -> float:
    with torch.no_grad():
        before = encoder(x)
        saved = [p.detach().clone() for p in encoder.parameters()]
        for p in encoder.parameters():
            if p.grad is not None:
                p.add_(p.grad.sign(), alpha=lr)
        after = encoder(x)
        for p, s in zip(encoder.parameters(), saved, strict=True):
            p.copy_(s)
    return float(1 - (before * after).sum(1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--T", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--init", action="store_true", help="also the run's initial weights")
    parser.add_argument(
        "--projection-init-scale", type=float, help="build the --init models with this scale"
    )
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--jacobian-images", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, cfg = load_pretrained(args.checkpoint)
    objective = instantiate(cfg["loss"]["objective"])
    _, test = build_datasets(_dataset_config(cfg))
    x = torch.stack([test[i][0] for i in range(args.images)])
    sets = [("trained", model.encoder, model.decoder)]
    if args.init:
        if args.projection_init_scale is not None:
            cfg["model"]["encoder"]["projection_init_scale"] = args.projection_init_scale
        sets.append(("init", *initial_models(cfg)))
    keys = None
    for name, enc, dec in sets:
        for t in args.T:
            set_unroll(enc, dec, n_iter=t)
            row = measure(enc.float(), dec.float(), objective, x, args.jacobian_images)
            if keys is None:
                keys = list(row)
                print("| weights | T | " + " | ".join(keys) + " |")
                print("|---|---|" + "---|" * len(keys))
            print(
                f"| {name} | {t} | " + " | ".join(f"{row[k]:.3g}" for k in keys) + " |", flush=True
            )


def _dataset_config(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.create(cfg["dataset"])


if __name__ == "__main__":
    main()
