"""Workers and problems of the two-rank tests (gloo on the CPU, NCCL on two GPUs), in a module of
their own so that spawned processes import them by a plain name: the global batch norm on an
uneven split, rounds of the CTRL game with batch norm in both players, and the objective of a
tiny linear encoder with its features gathered over ranks."""

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torchrun_helpers import init_local_group

from ctrl_csc.cli.common import build_models, config_dir
from ctrl_csc.engine import CTRLStep, Game
from ctrl_csc.engine.distributed import DistContext
from ctrl_csc.engine.steps import frozen_statistics
from ctrl_csc.engine.syncnorm import GlobalBatchNorm, sync_batch_norms
from ctrl_csc.losses import CTRLObjective, all_gather, all_gather_with_grad

LR = 1e-3  # SGD learning rate of the two-player runs
BN_SIZES = (5, 3)  # rows of rank 0 and rank 1 (uneven, as in the last batch of an epoch)


def bn_problem():
    g = torch.Generator().manual_seed(1)
    x = 2.0 + 3.0 * torch.randn(sum(BN_SIZES), 4, 3, 3, generator=g, dtype=torch.float64)
    x1d = torch.randn(sum(BN_SIZES), 6, generator=g, dtype=torch.float64) - 1.0
    c = torch.randn(x.shape, generator=g, dtype=torch.float64)
    c1d = torch.randn(x1d.shape, generator=g, dtype=torch.float64)
    return x, x1d, c, c1d


def bn_layers():
    torch.manual_seed(2)
    bn2 = torch.nn.BatchNorm2d(4).double()
    bn1 = torch.nn.BatchNorm1d(6, momentum=None).double()  # cumulative average
    with torch.no_grad():
        for bn in (bn2, bn1):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn2, bn1


def bn_run(bn2, bn1, x, x1d, c, c1d):
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


def bn_worker(rank, port, out_dir):
    init_local_group(rank, 2, port)
    try:
        x, x1d, c, c1d = bn_problem()
        lo = sum(BN_SIZES[:rank])
        mine = slice(lo, lo + BN_SIZES[rank])
        model = torch.nn.Sequential(*bn_layers())
        params = [id(p) for p in model.parameters()] + [id(b) for b in model.buffers()]
        model = sync_batch_norms(model)
        assert all(isinstance(m, GlobalBatchNorm) for m in model)
        assert params == [id(p) for p in model.parameters()] + [id(b) for b in model.buffers()]
        out = bn_run(*model, x[mine], x1d[mine], c[mine], c1d[mine])
        out["loss"] = out["loss"].reshape(1)
        for key in ("loss", "gparams"):  # Σ over ranks of the local losses = the global loss
            for t in out[key] if isinstance(out[key], list) else [out[key]]:
                dist.all_reduce(t)
        torch.save(out, out_dir / f"bn_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def join_workers(ctx, seconds=120):
    deadline = time.monotonic() + seconds
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            assert time.monotonic() < deadline, f"distributed workers did not finish in {seconds} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def compose_train(overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# The quickstart model with batch norm between the stages of both players (the paper configs'
# decoder, the DCGAN baselines' encoder).
BN_MODEL = ["model.encoder.norm=batch", "model.decoder.norm=batch"]
GAME_STEPS, GAME_BATCH = 2, 16


def game_problem():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(GAME_BATCH, 1, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    return x, torch.randint(0, 10, (GAME_BATCH,), generator=g)


def play_game(ctx, x, y, joint_batch):
    """``GAME_STEPS`` rounds of CTRLStep through Game (DDP and the global batch norm when
    distributed) in float64 on ``ctx.device``, SGD; the objective terms of each round, the final
    states (on the CPU) and the classes of the batch norms the game ran with."""
    torch.manual_seed(0)
    f, g = (m.double() for m in build_models(compose_train(BN_MODEL).model, ctx.device))
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


def game_worker(rank, port, out_dir, backend="gloo"):
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    init_local_group(rank, 2, port, backend)
    try:
        x, y = game_problem()
        # rank r holds rows r, r + 2, ... as ResumableSampler hands them out
        for joint_batch in (False, True):
            ctx = DistContext(rank, 2, rank, device)
            out = play_game(ctx, x[rank::2], y[rank::2], joint_batch)
            torch.save(out, out_dir / f"game_rank{rank}_{joint_batch}.pt")
    finally:
        dist.destroy_process_group()


def check_game(tmp_path, joint_batch, device, norm_class):
    """The ranks' results in ``tmp_path`` against one process on ``device``; the ranks ran with
    batch norms of class ``norm_class`` (the one process with plain BatchNorm2d)."""
    x, y = game_problem()
    terms_one, one, norms_one = play_game(DistContext(device=device), x, y, joint_batch)
    assert norms_one == {"BatchNorm2d"}
    torch.manual_seed(0)
    init = dict(zip(("encoder", "decoder"), build_models(compose_train(BN_MODEL).model)))
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
                # moved: not vacuous (the rate and gain are constants of the architecture)
                constant = k in ("projection_rate", "last_stage_gain")
                if v.is_floating_point() and v.shape == start[k].shape and not constant:
                    assert not torch.equal(v, start[k].double()), f"{part}.{k} did not move"
            counts = [v for k, v in one[part].items() if k.endswith("num_batches_tracked")]
            # per round the encoder counts f(X) and f(X̂), or the one f([X; X̂]), and the
            # decoder its own phase's pass: each player's passes in the other's phase are frozen
            per_round = {"encoder": 1 if joint_batch else 2, "decoder": 1}[part]
            assert all(int(c) == per_round * GAME_STEPS for c in counts), (part, counts)


# --------------------------------------------- the objective on two ranks (test_losses_distributed)
WORLD = 2
D_IN, D = 10, 6
SCENARIOS = [
    {"name": "binary", "variant": "binary", "sizes": (6, 6)},
    {"name": "multiclass", "variant": "multiclass", "sizes": (10, 10), "K": 4},
    {"name": "multiclass_uneven", "variant": "multiclass", "sizes": (7, 5), "K": 3},
    {"name": "samplewise", "variant": "samplewise", "sizes": (6, 6), "beta": 0.5},
    {"name": "samplewise_l2", "variant": "samplewise", "sizes": (5, 8), "distance": "l2"},
]


def objective_problem(sc):
    g = torch.Generator().manual_seed(0)
    n = sum(sc["sizes"])
    X = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    Xh = X + 0.3 * torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    W = torch.randn(D_IN, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, sc.get("K", 1), (n,), generator=g)
    return X, Xh, W, y


def evaluate_objective(sc, X, Xh, W, y):
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


def objective_worker(rank, port, out_dir):
    init_local_group(rank, WORLD, port)
    try:
        results = {}
        for sc in SCENARIOS:
            X, Xh, W, y = objective_problem(sc)
            lo = sum(sc["sizes"][:rank])
            sl = slice(lo, lo + sc["sizes"][rank])
            r = evaluate_objective(sc, X[sl], Xh[sl], W, y[sl])
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
