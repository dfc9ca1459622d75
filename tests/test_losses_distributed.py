"""The objective under torch.distributed (2 CPU processes, gloo) equals one process on the batch.

Each rank holds a share of the batch, a copy of a tiny linear "encoder" ``W`` and computes the
objective with ``gather=True``; parameter gradients are averaged over ranks as DDP does. Values,
averaged parameter gradients and the documented local-feature gradient (``world_size`` × the
single-process one, see ``ctrl_csc.losses.distributed``) are compared with a single process
holding the whole batch.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_workers import (
    SCENARIOS,
    WORLD,
    evaluate_objective,
    join_workers,
    objective_problem,
    objective_worker,
)
from torchrun_helpers import free_port


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_two_processes_equal_one_process(tmp_path):
    join_workers(
        mp.start_processes(
            objective_worker,
            args=(free_port(), tmp_path),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for sc in SCENARIOS:
        X, Xh, W, y = objective_problem(sc)
        single = evaluate_objective(sc, X, Xh, W, y)
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
