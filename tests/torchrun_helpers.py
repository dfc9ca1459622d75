"""Running ``ctrl_csc.cli.train.run`` as ranks of a local gloo group (multi-process tests)."""

import datetime
import os
import socket

import torch
import torch.distributed as dist

from ctrl_csc.cli.train import run


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_rank(rank, world, port, cfg, outs):
    """Rank ``rank`` of ``world``: the torchrun environment, one thread, ``run(cfg, outs[rank])``
    (each rank may be handed its own directory, as ``${now:...}`` may do)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    run(cfg, outs[rank])


def sgd_overrides(lr: float) -> list[str]:
    """Plain SGD for both players: an update is lr × the gradient, so a gradient off by a factor
    (a missing or doubled average over ranks) shows in the weights (Adam would normalise it)."""
    return [
        item
        for part in ("encoder", "decoder")
        for item in (
            f"optim.{part}._target_=torch.optim.SGD",
            f"~optim.{part}.betas",
            f"optim.{part}.lr={lr}",
        )
    ]


def spawn_ranks(cfg, outs, world: int = 2) -> None:
    """``train_rank`` on ``world`` spawned processes of one local gloo group; raises if one
    fails."""
    torch.multiprocessing.start_processes(
        train_rank,
        args=(world, free_port(), cfg, outs),
        nprocs=world,
        join=True,
        start_method="spawn",
    )


def init_local_group(rank: int, world: int, port: int, backend: str = "gloo") -> None:
    """Join rank ``rank`` of a ``world``-process group on the loopback interface (one CPU thread,
    a 60 s timeout); the caller destroys it."""
    torch.set_num_threads(1)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
