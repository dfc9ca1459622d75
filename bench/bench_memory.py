"""Memory of backpropagating through a CSC stage, per backward mode and number of iterations.

Run:  .venv/bin/python bench/bench_memory.py [--batch 64] [--size 32] [--channels 64]
      [--n-iters 2 5 10 20] [--device cpu|cuda] [--threads 2] [--no-time]

Prints one JSON line per (n_iter, backward) for a ``channels → channels`` 3×3 stage (FISTA,
non-negative, λ = 0.1, train mode) on a ``(batch, channels, size, size)`` input that requires
grad, loss ``Σ z²``:

* ``saved_mib``: the bytes held for backward when the forward returns, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` over *distinct* storages (a tensor saved by two
  operations counts once; the input ``x`` and the code ``z`` are included). Works on CPU.
* ``peak_saved_mib``: the most saved bytes alive at any moment of forward + backward, as those
  hooks see them (for ``checkpoint``, ``torch.utils.checkpoint`` keeps the tensors of the segment
  it replays in backward out of sight of outer hooks: see ``peak_alloc_mib``).
* ``peak_alloc_mib`` (CPU): the most bytes allocated at any moment of forward + backward beyond
  what was allocated before, from the allocation events of ``torch.profiler``
  (``profile_memory=True``): every tensor, saved or temporary, replayed segments and the CG
  vectors of ``implicit`` included. ``None`` where the profiler gives no events.
* ``ratio_vs_t2_unrolled``: ``saved_mib`` over that of T = 2 unrolled (the issue's target: ≤ 1.5
  at T = 10 with checkpoint or implicit).
* ``cuda_peak_mib`` (``--device cuda``): ``torch.cuda.max_memory_allocated`` during forward +
  backward minus what was allocated before (the input, the stage), i.e. everything the step needs.
* ``fwdbwd_ms``: one forward + backward (median of ``--repeats``), to show what each mode costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ctrl_csc.nn import CSCLayer
from ctrl_csc.nn.saved import SavedBytes

MODES = ("unrolled", "checkpoint", "implicit")
MIB = 2.0**20


def cpu_peak_allocated(run) -> int | None:
    """The most bytes allocated on the CPU at any moment of ``run()`` beyond those allocated
    before it: the running sum of the profiler's allocation (+) and release (−) events in time
    order. ``None`` if this torch's profiler records none."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    try:
        events = [
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        ]
    except AttributeError:  # the results' layout is not public API
        return None
    if not events:
        return None
    total = peak = 0
    for _, nbytes in sorted(events):
        total += nbytes
        peak = max(peak, total)
    return peak


def measure(args, n_iter: int, mode: str) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    c = args.channels
    layer = CSCLayer(c, c, 3, lmbda=0.1, n_iter=n_iter, backward=mode).to(device)
    x = torch.randn(args.batch, c, args.size, args.size, device=device, requires_grad=True)
    layer(x.detach())  # initial power iterations (not measured)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).square().sum().backward()

    counter = SavedBytes()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with counter.hooks():
        layer.zero_grad(set_to_none=True)
        z = layer(x)
        saved = counter.live
        z.square().sum().backward()
        del z
    row = {
        "bench": "csc_memory",
        "stage": f"{c}->{c}",
        "size": args.size,
        "batch": args.batch,
        "n_iter": n_iter,
        "backward": mode,
        "device": device.type,
        "code_mib": round(args.batch * c * args.size**2 * 4 / MIB, 2),
        "saved_mib": round(saved / MIB, 2),
        "peak_saved_mib": round(counter.peak / MIB, 2),
    }
    if device.type == "cpu":
        peak = cpu_peak_allocated(step)
        row["peak_alloc_mib"] = None if peak is None else round(peak / MIB, 2)
    if device.type == "cuda":
        torch.cuda.synchronize()
        row["cuda_peak_mib"] = round((torch.cuda.max_memory_allocated() - before) / MIB, 2)
    if not args.no_time:
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        row["fwdbwd_ms"] = round(statistics.median(times), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--n-iters", type=int, nargs="+", default=[2, 5, 10, 20])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda")
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=1, help="timed forward+backward steps")
    parser.add_argument("--no-time", action="store_true", help="memory only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = None
    for n_iter in args.n_iters:
        for mode in args.modes:
            row = measure(args, n_iter, mode)
            if base is None and n_iter == 2 and mode == "unrolled":
                base = row["saved_mib"]
            if base is not None:
                row["ratio_vs_t2_unrolled"] = round(row["saved_mib"] / base, 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
