"""Where a decoder update moves the transcriptions: inside or outside what the encoder can see.

For a training checkpoint (``.pt``, with the decoder's Adam state) of a sample-wise CSC-CTRL run,
on held-out images ``x`` with ``z = f(x)`` and ``x̂ = g(z)``:

- the encoder's row space at each ``x̂``: the span of the rows of its Jacobian ``∂f/∂x`` (``d``
  directions of the ``C·H·W`` pixels), by QR;
- for a step of the decoder's weights along a direction ``δθ`` (the decoder objective's gradient
  as SGD takes it; the gradient divided by Adam's ``√v̂`` as Adam takes it; its sign; a random
  direction), the change of ``x̂`` by central differences, and the share of its energy in that
  row space (averaged over images);
- the same share for the decoder's error ``x̂ − x`` and for white noise (``d / (C·H·W)``).

    python experiments/decoder_rowspace.py /path/to/run/checkpoints/last.pt

Float64 throughout; eval mode (no batch statistics). experiments/notes/photos.md §12.
"""

from __future__ import annotations

import argparse

import torch

import ctrl_csc
from ctrl_csc.data import build_dataset
from ctrl_csc.engine.checkpoint import load_checkpoint
from ctrl_csc.losses import CTRLObjective


def row_space_bases(f, images: torch.Tensor) -> list[torch.Tensor]:
    """An orthonormal basis ``(C·H·W, d)`` of the encoder's Jacobian row space at each image."""
    out = []
    for u in images:
        jac = torch.autograd.functional.jacobian(lambda v: f(v.unsqueeze(0))[0], u)
        q, _ = torch.linalg.qr(jac.reshape(jac.shape[0], -1).T)
        out.append(q)
    return out


def share(bases: list[torch.Tensor], v: torch.Tensor) -> float:
    """Mean over images of the fraction of ``‖v_i‖²`` inside image ``i``'s row space."""
    vals = [(q.T @ vi.flatten()).pow(2).sum() / vi.pow(2).sum() for q, vi in zip(bases, v)]
    return float(torch.stack(vals).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--images", type=int, default=32, help="held-out images in the batch")
    ap.add_argument("--jacobians", type=int, default=8, help="images whose row space is taken")
    args = ap.parse_args()
    torch.manual_seed(0)

    model, cfg = ctrl_csc.load_pretrained(args.checkpoint)
    f, g = model.encoder.double().eval(), model.decoder.double().eval()
    for p in f.parameters():
        p.requires_grad_(False)
    data = dict(cfg["dataset"])
    options = {k: data[k] for k in ("photos", "train_size", "test_size") if data.get(k)}
    if data["name"] != "natural_patches":
        options = {}
    test = build_dataset(data["name"], "test", **options)
    stride = max(1, len(test) // args.images)
    x = torch.stack([test[i][0] for i in range(0, len(test), stride)][: args.images]).double()

    o = cfg["loss"]["objective"]
    objective = CTRLObjective("samplewise", eps_sq=o["eps_sq"], beta=o["beta"],
                              distance=o["distance"], encoder_beta=0.0)  # fmt: skip
    params = list(g.parameters())
    state = load_checkpoint(args.checkpoint)["optimizers"]["decoder"]["state"]
    beta2 = 0.999
    correction = 1 - beta2 ** float(state[0]["step"])
    second = [state[i]["exp_avg_sq"].double() / correction for i in range(len(params))]

    with torch.no_grad():
        z = f(x)
    loss = objective(z, f(g(z)), None).decoder_total
    grads = torch.autograd.grad(loss, params)
    directions = {
        "gradient (SGD)": list(grads),
        "gradient / sqrt(v) (Adam)": [gr / (v.sqrt() + 1e-8) for gr, v in zip(grads, second)],
        "sign of the gradient": [gr.sign() for gr in grads],
        "random": [torch.randn_like(gr) for gr in grads],
    }

    def decoded(delta, h):
        with torch.no_grad():
            for p, dp in zip(params, delta):
                p.add_(h * dp)
            out = g(z)
            for p, dp in zip(params, delta):
                p.sub_(h * dp)
        return out

    with torch.no_grad():
        x_hat = g(z)
    k = args.jacobians
    bases = row_space_bases(f, x_hat[:k])
    print(f"share of the energy in the encoder's row space at x̂ ({k} images, d = {z.shape[1]}):")
    for name, delta in directions.items():
        norm = torch.sqrt(sum(dp.pow(2).sum() for dp in delta))
        delta = [dp / norm for dp in delta]
        h = 1e-4
        dx = (decoded(delta, h) - decoded(delta, -h)) / (2 * h)
        print(f"  decoder step, {name:28s} {share(bases, dx[:k]):.3f}")
    print(f"  the error x̂ − x                          {share(bases, (x_hat - x)[:k]):.3f}")
    print(f"  white noise                             {share(bases, torch.randn_like(x[:k])):.3f}")


if __name__ == "__main__":
    main()
