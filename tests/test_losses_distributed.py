"""The objective under torch.distributed (2 CPU processes, gloo) equals one process on the batch.

Each rank holds a share of the batch, a copy of a tiny linear "encoder" ``W`` and computes the
objective with ``gather=True``; parameter gradients are averaged over ranks as DDP does. Values,
averaged parameter gradients and the documented local-feature gradient (``world_size`` × the
single-process one, see ``ctrl_csc.losses.distributed``) are compared with a single process
holding the whole batch.
"""

import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchrun_helpers import free_port

from ctrl_csc.losses import CTRLObjective, all_gather, all_gather_with_grad

WORLD = 2
D_IN, D = 10, 6
SCENARIOS = [
    {"name": "binary", "variant": "binary", "sizes": (6, 6)},
    {"name": "multiclass", "variant": "multiclass", "sizes": (10, 10), "K": 4},
    {"name": "multiclass_uneven", "variant": "multiclass", "sizes": (7, 5), "K": 3},
    {"name": "samplewise", "variant": "samplewise", "sizes": (6, 6), "beta": 0.5},
    {"name": "samplewise_l2", "variant": "samplewise", "sizes": (5, 8), "distance": "l2"},
]


def _problem(sc):
    g = torch.Generator().manual_seed(0)
    n = sum(sc["sizes"])
    X = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    Xh = X + 0.3 * torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    W = torch.randn(D_IN, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, sc.get("K", 1), (n,), generator=g)
    return X, Xh, W, y


def _evaluate(sc, X, Xh, W, y):
    """Objective of the tiny encoder ``Z = normalize(X W)``; gradients of both players' sides."""
    obj = CTRLObjective(
        sc["variant"],
        num_classes=sc.get("K"),
        beta=sc.get("beta", 1.0),
        distance=sc.get("distance", "rate"),
        gather=True,
    )
    W = W.clone().requires_grad_()
    X = X.clone().requires_grad_()
    t = obj(F.normalize(X @ W, dim=1), F.normalize(Xh @ W, dim=1), y)
    g_enc = torch.autograd.grad(t.total, [W, X], retain_graph=True)
    g_dec = torch.autograd.grad(t.decoder_total, [W, X])
    return {"values": t.as_dict(), "gW": g_enc[0], "gX": g_enc[1], "gW_dec": g_dec[0]}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {}
        for sc in SCENARIOS:
            X, Xh, W, y = _problem(sc)
            lo = sum(sc["sizes"][:rank])
            sl = slice(lo, lo + sc["sizes"][rank])
            r = _evaluate(sc, X[sl], Xh[sl], W, y[sl])
            for key in ("gW", "gW_dec"):  # what DDP does to parameter gradients
                dist.all_reduce(r[key])
                r[key] /= WORLD
            results[sc["name"]] = r
        # the primitives alone: uneven shares, gradient convention
        x = torch.arange(3 * (rank + 1), dtype=torch.float64).reshape(-1, 1) + 10 * rank
        x.requires_grad_()
        full = all_gather_with_grad(x)
        (full * torch.arange(full.shape[0], dtype=torch.float64)[:, None]).sum().backward()
        results["primitive"] = {"full": full.detach(), "grad": x.grad, "ints": all_gather(x.long())}
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_two_processes_equal_one_process(tmp_path):
    ctx = mp.start_processes(
        _worker,
        args=(free_port(), tmp_path),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120
    try:
        # join() returns after any process ends (False while others still run); it raises if a
        # worker failed
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            assert time.monotonic() < deadline, "distributed workers did not finish in 120 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for sc in SCENARIOS:
        X, Xh, W, y = _problem(sc)
        single = _evaluate(sc, X, Xh, W, y)
        for rank, res in enumerate(ranks):
            r = res[sc["name"]]
            assert r["values"].keys() == single["values"].keys()
            for k, v in single["values"].items():
                assert r["values"][k] == pytest.approx(v, rel=1e-10, abs=1e-12), (sc["name"], k)
            torch.testing.assert_close(r["gW"], single["gW"], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(r["gW_dec"], single["gW_dec"], rtol=1e-9, atol=1e-12)
            lo = sum(sc["sizes"][:rank])
            local = single["gX"][lo : lo + sc["sizes"][rank]]
            torch.testing.assert_close(r["gX"], WORLD * local, rtol=1e-9, atol=1e-12)

    # all_gather_with_grad: rank 0 holds 3 rows, rank 1 holds 6; loss = Σ_i i·full[i] on each rank
    expect = torch.cat([torch.arange(3.0), torch.arange(6.0) + 10]).double()[:, None]
    for rank, res in enumerate(ranks):
        p = res["primitive"]
        torch.testing.assert_close(p["full"], expect)
        torch.testing.assert_close(p["ints"], expect.long())
        idx = torch.arange(3.0) if rank == 0 else torch.arange(3.0, 9.0)
        torch.testing.assert_close(p["grad"], WORLD * idx.double()[:, None])
