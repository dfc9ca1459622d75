"""Under torch.distributed: one run directory (rank 0's), per-rank random streams seeded by
(seed, rank), and every rank's random state in the checkpoint."""

import datetime
import json
import time

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from torchrun_helpers import free_port, sgd_overrides, spawn_ranks, train_rank

from ctrl_csc.cli.common import build_models, config_dir
from ctrl_csc.cli.train import run
from ctrl_csc.engine import CTRLStep, Game, load_checkpoint
from ctrl_csc.engine.distributed import DistContext, rank_seed
from ctrl_csc.engine.steps import frozen_statistics
from ctrl_csc.engine.syncnorm import GlobalBatchNorm, sync_batch_norms
from ctrl_csc.losses import CTRLObjective


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

LR = 1e-3  # SGD learning rate of the two-player runs
BN_SIZES = (5, 3)  # rows of rank 0 and rank 1 (uneven, as in the last batch of an epoch)


def _bn_problem():
    g = torch.Generator().manual_seed(1)
    x = 2.0 + 3.0 * torch.randn(sum(BN_SIZES), 4, 3, 3, generator=g, dtype=torch.float64)
    x1d = torch.randn(sum(BN_SIZES), 6, generator=g, dtype=torch.float64) - 1.0
    c = torch.randn(x.shape, generator=g, dtype=torch.float64)
    c1d = torch.randn(x1d.shape, generator=g, dtype=torch.float64)
    return x, x1d, c, c1d


def _bn_layers():
    torch.manual_seed(2)
    bn2 = torch.nn.BatchNorm2d(4).double()
    bn1 = torch.nn.BatchNorm1d(6, momentum=None).double()  # cumulative average
    with torch.no_grad():
        for bn in (bn2, bn1):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn2, bn1


def _bn_run(bn2, bn1, x, x1d, c, c1d):
    """Two training forwards, one with momentum 0 (the decoder phase's frozen statistics), then
    one in eval mode; the loss Σ c·y of the first and the gradients of it."""
    x, x1d = x.clone().requires_grad_(), x1d.clone().requires_grad_()
    y = [bn2(x), bn1(x1d)]
    loss = (c * y[0]).sum() + (c1d * y[1]).sum()
    loss.backward()
    stats = {}
    for name, bn in (("bn2", bn2), ("bn1", bn1)):
        stats[name] = [bn.running_mean.clone(), bn.running_var.clone()]
    with frozen_statistics(torch.nn.Sequential(bn2, bn1)), torch.no_grad():
        bn2(x + 1.0), bn1(x1d * 2.0)
    for name, bn in (("bn2", bn2), ("bn1", bn1)):
        stats[name] += [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked]
    bn2.eval(), bn1.eval()
    with torch.no_grad():
        evals = [bn2(x), bn1(x1d)]
    return {
        "y": [t.detach() for t in y],
        "loss": loss.detach(),
        "gx": [x.grad, x1d.grad],
        "gparams": [bn2.weight.grad, bn2.bias.grad, bn1.weight.grad, bn1.bias.grad],
        "stats": stats,
        "eval": evals,
    }


def _bn_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        x, x1d, c, c1d = _bn_problem()
        lo = sum(BN_SIZES[:rank])
        mine = slice(lo, lo + BN_SIZES[rank])
        model = torch.nn.Sequential(*_bn_layers())
        params = [id(p) for p in model.parameters()] + [id(b) for b in model.buffers()]
        model = sync_batch_norms(model)
        assert all(isinstance(m, GlobalBatchNorm) for m in model)
        assert params == [id(p) for p in model.parameters()] + [id(b) for b in model.buffers()]
        out = _bn_run(*model, x[mine], x1d[mine], c[mine], c1d[mine])
        out["loss"] = out["loss"].reshape(1)
        for key in ("loss", "gparams"):  # Σ over ranks of the local losses = the global loss
            for t in out[key] if isinstance(out[key], list) else [out[key]]:
                dist.all_reduce(t)
        torch.save(out, out_dir / f"bn_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _join(ctx, seconds=120):
    deadline = time.monotonic() + seconds
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            assert time.monotonic() < deadline, f"distributed workers did not finish in {seconds} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def test_sync_batch_norms_is_plain_batch_norm_in_one_process():
    x, x1d, c, c1d = _bn_problem()
    plain, synced = _bn_run(*_bn_layers(), x, x1d, c, c1d), None
    model = sync_batch_norms(torch.nn.Sequential(*_bn_layers()))
    assert all(isinstance(m, GlobalBatchNorm) for m in model)
    synced = _bn_run(*model, x, x1d, c, c1d)
    torch.testing.assert_close(synced, plain, rtol=0, atol=0)
    assert sync_batch_norms(torch.nn.Linear(2, 2)).__class__ is torch.nn.Linear


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_global_batch_norm_on_two_ranks_is_batch_norm_on_the_whole_batch(tmp_path):
    """2 gloo ranks holding 5 and 3 rows = BatchNorm on the 8 rows: outputs, the input gradients
    of each rank's rows, the parameter gradients, the running statistics (unbiased global
    variance; momentum 0.1 and cumulative), untouched statistics at momentum 0 and eval mode."""
    _join(
        torch.multiprocessing.start_processes(
            _bn_worker, args=(free_port(), tmp_path), nprocs=2, join=False, start_method="spawn"
        )
    )
    x, x1d, c, c1d = _bn_problem()
    single = _bn_run(*_bn_layers(), x, x1d, c, c1d)
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


def _compose(overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# The quickstart model with batch norm between the stages of both players (the paper configs'
# decoder, the DCGAN baselines' encoder).
BN_MODEL = ["model.encoder.norm=batch", "model.decoder.norm=batch"]
GAME_STEPS, GAME_BATCH = 2, 16


def _game_problem():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(GAME_BATCH, 1, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    return x, torch.randint(0, 10, (GAME_BATCH,), generator=g)


def _play(ctx, x, y, joint_batch):
    """``GAME_STEPS`` rounds of CTRLStep through Game (DDP and the global batch norm when
    distributed) in float64 on ``ctx.device``, SGD; the objective terms of each round, the final
    states (on the CPU) and the classes of the batch norms the game ran with."""
    torch.manual_seed(0)
    f, g = (m.double() for m in build_models(_compose(BN_MODEL).model, ctx.device))
    opts = {
        "encoder": torch.optim.SGD(f.parameters(), lr=LR),
        "decoder": torch.optim.SGD(g.parameters(), lr=LR),
    }
    game = Game(f, g, opts, ctx)
    objective = CTRLObjective("multiclass", num_classes=10, gather=ctx.distributed)
    step = CTRLStep(objective, joint_batch=joint_batch)
    x, y = x.to(ctx.device), y.to(ctx.device)
    terms = []
    for _ in range(GAME_STEPS):
        game.begin_step()
        terms.append({k: float(v) for k, v in step(game, x, y).items()})
    states = {
        part: {k: v.cpu() for k, v in m.state_dict().items()}
        for part, m in (("encoder", game.raw_encoder), ("decoder", game.raw_decoder))
    }
    norms = {
        type(m).__name__
        for part in (game.raw_encoder, game.raw_decoder)
        for m in part.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }
    return terms, states, norms


def _game_worker(rank, port, out_dir, backend="gloo"):
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        x, y = _game_problem()
        # rank r holds rows r, r + 2, ... as ResumableSampler hands them out
        for joint_batch in (False, True):
            ctx = DistContext(rank, 2, rank, device)
            out = _play(ctx, x[rank::2], y[rank::2], joint_batch)
            torch.save(out, out_dir / f"game_rank{rank}_{joint_batch}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_ctrl_game_with_batch_norm_on_two_ranks_is_the_one_process_game(tmp_path):
    """Game + CTRLStep with ``norm: batch`` in both players, float64 models: 2 gloo ranks with
    8 images each = one process with the 16 — the objective of every round, every parameter after
    the SGD updates, and every batch norm's running statistics and batch count (the decoder phase
    must leave the encoder's alone: frozen_statistics; with ``joint_batch`` [X; X̂] is one
    batch)."""
    _join(
        torch.multiprocessing.start_processes(
            _game_worker, args=(free_port(), tmp_path), nprocs=2, join=False, start_method="spawn"
        )
    )
    for joint_batch in (False, True):
        _check_game(tmp_path, joint_batch, torch.device("cpu"), "GlobalBatchNorm")


def _check_game(tmp_path, joint_batch, device, norm_class):
    """The ranks' results in ``tmp_path`` against one process on ``device``; the ranks ran with
    batch norms of class ``norm_class`` (the one process with plain BatchNorm2d)."""
    x, y = _game_problem()
    terms_one, one, norms_one = _play(DistContext(device=device), x, y, joint_batch)
    assert norms_one == {"BatchNorm2d"}
    torch.manual_seed(0)
    init = dict(zip(("encoder", "decoder"), build_models(_compose(BN_MODEL).model)))
    for rank in range(2):
        terms_two, two, norms_two = torch.load(tmp_path / f"game_rank{rank}_{joint_batch}.pt")
        assert norms_two == {norm_class}
        if rank == 0:
            assert len(terms_two) == GAME_STEPS
            for a, b in zip(terms_two, terms_one):
                assert a.keys() == b.keys()
                assert list(a.values()) == pytest.approx(list(b.values()), rel=1e-9, abs=1e-12)
        for part in ("encoder", "decoder"):
            assert two[part].keys() == one[part].keys()
            start = init[part].state_dict()
            stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
            assert stats, f"the {part} has no batch norm: the comparison would be empty"
            for k, v in one[part].items():
                torch.testing.assert_close(two[part][k], v, rtol=1e-9, atol=1e-12, msg=k)
                if v.is_floating_point() and v.shape == start[k].shape:  # moved: not vacuous
                    assert not torch.equal(v, start[k].double()), f"{part}.{k} did not move"
            counts = [v for k, v in one[part].items() if k.endswith("num_batches_tracked")]
            # per round the encoder counts f(X) and f(X̂), or the one f([X; X̂]), and the
            # decoder its own phase's pass: each player's passes in the other's phase are frozen
            per_round = {"encoder": 1 if joint_batch else 2, "decoder": 1}[part]
            assert all(int(c) == per_round * GAME_STEPS for c in counts), (part, counts)


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
    run(_compose([*common, *sgd_overrides(0.0), "trainer.max_steps=1"]), tmp_path / "init")
    run(_compose([*common, *sgd_overrides(LR), "trainer.batch_size=16"]), tmp_path / "one")
    spawn_ranks(
        _compose([*common, *sgd_overrides(LR), "trainer.batch_size=8"]), [tmp_path / "two"] * 2
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
