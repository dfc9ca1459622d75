"""Benchmark of the CSC stage (ctrl_csc.nn.CSCLayer) against a straightforward reference.

Run:  .venv/bin/python bench/bench_csc.py [--quick] [--repeats N] [--threads N] [--batch N]
      [--stages 64-64-1 ...] [--n-iters 2 5] [--no-compile]

Prints one JSON line per (stage, n_iter, mode):
  * ``train``: forward with autograd (power_iters=1 per call, as in training) and forward+backward;
  * ``eval``: forward under ``no_grad`` with the cached Lipschitz estimate.
Fields: median times in ms of ``ours`` and of the in-file ``reference`` (a FISTA that normalises the
atoms, runs a fresh 20-step power iteration, and recomputes the residual ``x − Dz`` and ``Dᵀ(·)`` in
every iteration, starting from ``z₀ = 0``), their ratio (``speedup_*`` > 1 means ours is faster),
and ``conv_equivalents`` = our forward time / one ``conv2d`` of the same shape, with the floor
``2T − 1`` and the target ``1.25 (2T − 1)`` beside it. All timings of a case are interleaved
(ours, reference, conv, ours, ...) in the same process and the median of ``--repeats`` is taken.

``ours`` is the eager solver; ``compiled_*`` fields are the same stage with ``compile=True`` (its
iterations as one ``torch.compile`` graph), measured in the same interleaved loop, when
``torch.compile`` works here (``"compile": false`` otherwise, or with ``--no-compile``).
``conv_cl_ms`` is the same conv on a channels-last input, for reference (the conv-equivalents
are against the plain NCHW ``conv2d`` the stage's input arrives as).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from ctrl_csc.nn import CSCLayer
from ctrl_csc.nn.compiled import compile_available

STAGES = [  # (in, out, stride) at 32x32
    (3, 64, 1),
    (64, 64, 1),
    (64, 128, 2),
]
N_ITERS = (2, 5)
REFERENCE_POWER_ITERS = 20


def reference_csc(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int,
    padding: int,
    lmbda: float,
    n_iter: int,
    power_iters: int = REFERENCE_POWER_ITERS,
) -> torch.Tensor:
    """Textbook non-negative FISTA for ½‖x − Dz‖² + λ‖z‖₁, z ≥ 0, from z₀ = 0.

    Re-normalises the atoms and runs a fresh power iteration on every call, and forms the
    residual ``x − D y`` and the gradient ``−Dᵀ(x − D y)`` in every iteration (2T convolutions).
    """
    atoms = weight / weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    h = (x.shape[-2] + 2 * padding - weight.shape[-1]) // stride + 1
    w = (x.shape[-1] + 2 * padding - weight.shape[-1]) // stride + 1
    out_pad = (
        (x.shape[-2] + 2 * padding - weight.shape[-1]) % stride,
        (x.shape[-1] + 2 * padding - weight.shape[-1]) % stride,
    )

    def synth(z):
        return F.conv_transpose2d(z, atoms, None, stride, padding, out_pad)

    def analysis(u):
        return F.conv2d(u, atoms, None, stride, padding)

    with torch.no_grad():
        v = torch.randn(1, weight.shape[0], h, w, dtype=x.dtype)
        lip = torch.ones(())
        for _ in range(power_iters):
            v = analysis(F.conv_transpose2d(v, atoms.detach(), None, stride, padding, out_pad))
            lip = v.norm()
            v = v / lip
    eta = 1.0 / lip
    z = torch.zeros(x.shape[0], weight.shape[0], h, w, dtype=x.dtype)
    z_prev = z
    tau = 1.0
    for t in range(n_iter):
        if t == 0:
            y = z
        else:
            tau_next = (1 + math.sqrt(1 + 4 * tau * tau)) / 2
            y = z + ((tau - 1) / tau_next) * (z - z_prev)
            tau = tau_next
        residual = x - synth(y)
        grad = -analysis(residual)
        z_prev = z
        z = torch.relu(y - eta * grad - eta * lmbda)
    return z


def _timed(fn, clock) -> float:
    start = clock()
    fn()
    return (clock() - start) * 1e3


def run_case(
    cin: int,
    cout: int,
    stride: int,
    n_iter: int,
    batch: int,
    size: int,
    repeats: int,
    clock,
    compiled: bool = False,
):
    torch.manual_seed(0)
    layer = CSCLayer(cin, cout, 3, stride=stride, lmbda=0.1, n_iter=n_iter)
    fused = CSCLayer(cin, cout, 3, stride=stride, lmbda=0.1, n_iter=n_iter, compile=True)
    fused.load_state_dict(layer.state_dict())
    x = torch.randn(batch, cin, size, size)
    x_grad = x.clone().requires_grad_(cin != 3)  # a first stage gets no input gradient
    weight = layer.weight
    padding = layer.padding
    layer(x)  # initial power iterations (not timed)
    g = torch.randn_like(layer(x))
    conv_weight = weight.detach().clone()
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def ours_train_fwd():
        layer.train()
        return layer(x_grad)

    def ours_train_fwdbwd():
        layer.train()
        (layer(x_grad) * g).sum().backward()

    def ours_eval_fwd():
        layer.eval()
        with torch.no_grad():
            return layer(x)

    def ref_train_fwd():
        return reference_csc(x_grad, weight, stride, padding, 0.1, n_iter)

    def ref_train_fwdbwd():
        (reference_csc(x_grad, weight, stride, padding, 0.1, n_iter) * g).sum().backward()

    def ref_eval_fwd():
        with torch.no_grad():
            return reference_csc(x, weight, stride, padding, 0.1, n_iter)

    def conv():
        with torch.no_grad():
            return F.conv2d(x, conv_weight, None, stride, padding)

    def conv_cl():
        with torch.no_grad():
            return F.conv2d(x_cl, conv_weight, None, stride, padding)

    def fused_train_fwd():
        fused.train()
        return fused(x_grad)

    def fused_train_fwdbwd():
        fused.train()
        (fused(x_grad) * g).sum().backward()

    def fused_eval_fwd():
        fused.eval()
        with torch.no_grad():
            return fused(x)

    # sanity: both solve the same problem (the estimates of L differ slightly)
    layer.eval()
    with torch.no_grad():
        ref = reference_csc(x, weight, stride, padding, 0.1, n_iter)
        rel_diff = float((layer(x) - ref).abs().max() / ref.abs().max())
    fns = {
        "ours_train_fwd": ours_train_fwd,
        "ref_train_fwd": ref_train_fwd,
        "ours_train_fwdbwd": ours_train_fwdbwd,
        "ref_train_fwdbwd": ref_train_fwdbwd,
        "ours_eval_fwd": ours_eval_fwd,
        "ref_eval_fwd": ref_eval_fwd,
        "conv": conv,
        "conv_cl": conv_cl,
    }
    if compiled:
        fns.update(
            fused_train_fwd=fused_train_fwd,
            fused_train_fwdbwd=fused_train_fwdbwd,
            fused_eval_fwd=fused_eval_fwd,
        )
        fused.eval()
        with torch.no_grad():  # the compiled solver computes the same code
            compiled_diff = float((fused(x) - ref).abs().max() / ref.abs().max())
    for fn in fns.values():  # warm-up (and compilation)
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, clock))
            weight.grad = None
            fused.weight.grad = None
            x_grad.grad = None
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = 2 * n_iter - 1
    common = {
        "bench": "csc_layer",
        "stage": f"{cin}->{cout}",
        "stride": stride,
        "size": size,
        "batch": batch,
        "n_iter": n_iter,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "conv_ms": round(med["conv"], 2),
        "conv_cl_ms": round(med["conv_cl"], 2),
        "conv_floor": floor,
        "conv_target": 1.25 * floor,
    }
    train = {
        **common,
        "mode": "train",
        "ours_fwd_ms": round(med["ours_train_fwd"], 2),
        "ref_fwd_ms": round(med["ref_train_fwd"], 2),
        "ours_fwdbwd_ms": round(med["ours_train_fwdbwd"], 2),
        "ref_fwdbwd_ms": round(med["ref_train_fwdbwd"], 2),
        "speedup_fwd": round(med["ref_train_fwd"] / med["ours_train_fwd"], 3),
        "speedup_fwdbwd": round(med["ref_train_fwdbwd"] / med["ours_train_fwdbwd"], 3),
        "conv_equivalents": round(med["ours_train_fwd"] / med["conv"], 2),
        "compile": compiled,
    }
    if compiled:
        train.update(
            compiled_fwd_ms=round(med["fused_train_fwd"], 2),
            compiled_fwdbwd_ms=round(med["fused_train_fwdbwd"], 2),
            compiled_speedup_fwdbwd=round(med["ref_train_fwdbwd"] / med["fused_train_fwdbwd"], 3),
            compiled_conv_equivalents=round(med["fused_train_fwd"] / med["conv"], 2),
        )
    evaluation = {
        **common,
        "mode": "eval",
        "ours_fwd_ms": round(med["ours_eval_fwd"], 2),
        "ref_fwd_ms": round(med["ref_eval_fwd"], 2),
        "speedup_fwd": round(med["ref_eval_fwd"] / med["ours_eval_fwd"], 3),
        "conv_equivalents": round(med["ours_eval_fwd"] / med["conv"], 2),
        "rel_diff_vs_ref": float(f"{rel_diff:.3g}"),  # only L's estimate differs
        "compile": compiled,
    }
    if compiled:
        evaluation.update(
            compiled_fwd_ms=round(med["fused_eval_fwd"], 2),
            compiled_conv_equivalents=round(med["fused_eval_fwd"] / med["conv"], 2),
            compiled_rel_diff_vs_ref=float(f"{compiled_diff:.3g}"),
        )
    return train, evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per function")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument(
        "--stages",
        nargs="+",
        default=[f"{i}-{o}-{s}" for i, o, s in STAGES],
        help="stages as IN-OUT-STRIDE (default: all)",
    )
    parser.add_argument("--n-iters", type=int, nargs="+", default=list(N_ITERS))
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled stage")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter; cpu: time.process_time (all threads' CPU time, less "
        "sensitive to other processes on a shared machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    compiled = not args.no_compile and compile_available()
    stages = [tuple(int(v) for v in spec.split("-")) for spec in args.stages]
    for cin, cout, stride in stages:
        for n_iter in args.n_iters:
            lines = run_case(
                cin, cout, stride, n_iter, args.batch, args.size, repeats, clock, compiled
            )
            for line in lines:
                print(json.dumps({**line, "clock": args.clock}), flush=True)


if __name__ == "__main__":
    main()
