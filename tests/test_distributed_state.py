"""Under torch.distributed: one run directory (rank 0's), per-rank random streams seeded by
(seed, rank), and every rank's random state in the checkpoint."""

import json

import pytest
import torch
import torch.distributed as dist
from distributed_workers import (
    BN_MODEL,
    BN_SIZES,
    LR,
    bn_layers,
    bn_problem,
    bn_run,
    bn_worker,
    check_game,
    compose_train,
    game_worker,
    join_workers,
)
from hydra import compose, initialize_config_dir
from torchrun_helpers import free_port, sgd_overrides, spawn_ranks, train_rank

from ctrl_csc.cli.common import config_dir
from ctrl_csc.cli.train import run
from ctrl_csc.engine import load_checkpoint
from ctrl_csc.engine.distributed import rank_seed
from ctrl_csc.engine.syncnorm import GlobalBatchNorm, sync_batch_norms


def test_rank_seeds_are_distinct_and_fixed_by_seed_and_rank():
    seeds = {rank_seed(s, r) for s in range(4) for r in range(8)}
    assert len(seeds) == 32 and all(0 <= x < 2**63 for x in seeds)
    assert rank_seed(3, 1) == rank_seed(3, 1) != rank_seed(1, 3)


@pytest.mark.distributed
def test_two_ranks_share_rank_0s_directory_and_draw_their_own_noise(tmp_path):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train", overrides=["trainer=smoke", "trainer.max_steps=2", "loss.noise_std=0.1"]
        )
    outs = [tmp_path / "rank0", tmp_path / "rank1"]
    torch.multiprocessing.start_processes(
        train_rank, args=(2, free_port(), cfg, outs), nprocs=2, join=True, start_method="spawn"
    )
    assert not outs[1].exists()  # rank 1 wrote into rank 0's directory, not its own
    state = load_checkpoint(outs[0] / "checkpoints" / "last.pt")
    ranks = state["rng_ranks"]
    assert len(ranks) == 2
    assert torch.equal(ranks[0]["torch"], state["rng"]["torch"])
    # the same number of draws from streams seeded alike would leave equal states
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


# ------------------------------------------------------------ batch norm over the global batch


def test_sync_batch_norms_is_plain_batch_norm_in_one_process():
    x, x1d, c, c1d = bn_problem()
    plain, synced = bn_run(*bn_layers(), x, x1d, c, c1d), None
    model = sync_batch_norms(torch.nn.Sequential(*bn_layers()))
    assert all(isinstance(m, GlobalBatchNorm) for m in model)
    synced = bn_run(*model, x, x1d, c, c1d)
    torch.testing.assert_close(synced, plain, rtol=0, atol=0)
    assert sync_batch_norms(torch.nn.Linear(2, 2)).__class__ is torch.nn.Linear


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_global_batch_norm_on_two_ranks_is_batch_norm_on_the_whole_batch(tmp_path):
    """2 gloo ranks holding 5 and 3 rows = BatchNorm on the 8 rows: outputs, the input gradients
    of each rank's rows, the parameter gradients, the running statistics (unbiased global
    variance; momentum 0.1 and cumulative), untouched statistics at momentum 0 and eval mode."""
    join_workers(
        torch.multiprocessing.start_processes(
            bn_worker, args=(free_port(), tmp_path), nprocs=2, join=False, start_method="spawn"
        )
    )
    x, x1d, c, c1d = bn_problem()
    single = bn_run(*bn_layers(), x, x1d, c, c1d)
    for rank in range(2):
        r = torch.load(tmp_path / f"bn_rank{rank}.pt")
        lo = sum(BN_SIZES[:rank])
        mine = slice(lo, lo + BN_SIZES[rank])
        for key in ("y", "gx", "eval"):
            torch.testing.assert_close(
                r[key], [t[mine] for t in single[key]], rtol=1e-10, atol=1e-12
            )
        torch.testing.assert_close(r["loss"][0], single["loss"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r["gparams"], single["gparams"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r["stats"], single["stats"], rtol=1e-10, atol=1e-12)
        for name in ("bn2", "bn1"):  # momentum 0 left them exactly as they were
            mean, var, mean_frozen, var_frozen, _ = r["stats"][name]
            assert torch.equal(mean, mean_frozen) and torch.equal(var, var_frozen)


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_ctrl_game_with_batch_norm_on_two_ranks_is_the_one_process_game(tmp_path):
    """Game + CTRLStep with ``norm: batch`` in both players, float64 models: 2 gloo ranks with
    8 images each = one process with the 16 — the objective of every round, every parameter after
    the SGD updates, and every batch norm's running statistics and batch count (the decoder phase
    must leave the encoder's alone: frozen_statistics; with ``joint_batch`` [X; X̂] is one
    batch)."""
    join_workers(
        torch.multiprocessing.start_processes(
            game_worker, args=(free_port(), tmp_path), nprocs=2, join=False, start_method="spawn"
        )
    )
    for joint_batch in (False, True):
        check_game(tmp_path, joint_batch, torch.device("cpu"), "GlobalBatchNorm")


def _objective_rows(run_dir):
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[t] for r in rows if "objective/total" in r for t in sorted(r) if t.startswith("obj")]


def _states(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["models"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "model",
    [
        ["model=csc_ctrl_mini", *BN_MODEL, "loss.joint_batch=false"],
        ["model=dcgan_ctrl_mini", "loss.joint_batch=true"],
    ],
    ids=["csc_ctrl_mini", "dcgan_ctrl_mini_joint_batch"],
)
def test_two_processes_with_batch_norm_make_the_one_process_updates(tmp_path, model):
    """The training command with ``norm: batch``: 2 gloo processes with 8 images each = one
    process with the batch of 16 (the objective at every step, the SGD updates of both players,
    every batch norm's running statistics). Multiclass: labels gathered too.

    In float64 (``trainer.dtype``), where the property is exact. In float32 the two runs differ
    in summation order (chosen by the process count and the CPU's kernels), and the trajectory
    amplifies it: the relative λ's argmax among tied maxima (batch norm maps zero codes to a
    constant map) and the soft threshold's support follow the rounding. Measured after three
    steps, worst element relative to its size: float32 up to 17x (CSC, ATEN_CPU_CAPABILITY
    =default) or 2.4e-3 (avx2/avx512), DCGAN 7.5e-4; float64 4e-11 (CSC) and 5e-12 (DCGAN),
    objectives 2e-15, on every kernel set. No float32 tolerance holds on every CPU."""
    common = [
        "trainer=smoke",
        "trainer.max_steps=3",
        "trainer.dtype=float64",
        "loss=ctrl_multiclass",
        *model,
        "optim.lr_decay=none",
    ]
    run(compose_train([*common, *sgd_overrides(0.0), "trainer.max_steps=1"]), tmp_path / "init")
    run(compose_train([*common, *sgd_overrides(LR), "trainer.batch_size=16"]), tmp_path / "one")
    spawn_ranks(
        compose_train([*common, *sgd_overrides(LR), "trainer.batch_size=8"]), [tmp_path / "two"] * 2
    )

    one, two = _objective_rows(tmp_path / "one"), _objective_rows(tmp_path / "two")
    assert len(one) == len(two) >= 3 * 4
    assert two == pytest.approx(one, rel=1e-9, abs=1e-12)
    init, s_one, s_two = (_states(tmp_path / d) for d in ("init", "one", "two"))
    for part in ("encoder", "decoder"):
        assert s_one[part].keys() == s_two[part].keys() == init[part].keys()
        stats = [k for k in init[part] if k.endswith(("running_mean", "running_var"))]
        assert stats, f"the {part} has no batch norm: the comparison would be empty"
        for k in stats:  # the running statistics of the global batches, unbiased variance
            torch.testing.assert_close(s_two[part][k], s_one[part][k], rtol=1e-9, atol=1e-12)
        for k in init[part]:
            if k.endswith("num_batches_tracked"):
                assert torch.equal(s_two[part][k], s_one[part][k]), k
        weights = [
            k
            for k in init[part]
            if k not in stats
            and init[part][k].is_floating_point()
            and init[part][k].shape == s_one[part][k].shape
        ]
        d_one = torch.cat([(s_one[part][k] - init[part][k]).flatten() for k in weights])
        d_two = torch.cat([(s_two[part][k] - init[part][k]).flatten() for k in weights])
        assert d_one.norm() > 1e-3, f"the {part} did not move: the comparison would be empty"
        assert (d_two - d_one).norm() <= 1e-9 * d_one.norm(), (
            f"{part}: 2-process update off by {float((d_two - d_one).norm() / d_one.norm()):.3g}"
        )
