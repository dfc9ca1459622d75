"""Process-group set-up, a resumable, rank-aware sampler, and preemption signals.

One code path for one device and many: under ``torchrun`` the environment variables ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` are set and :func:`setup_distributed` joins the group (NCCL on
GPUs, gloo on CPUs); without them it returns a single-process context.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

log = logging.getLogger("ctrl_csc")

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "agree_on_run_dir",
    "gather_objects",
    "rank_seed",
    "PreemptionGuard",
    "TrainingPreempted",
    "SINGLE_PROCESS",
    "DistContext",
    "setup_distributed",
    "teardown_distributed",
    "ResumableSampler",
    "resolve_device",
]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = DistContext()


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:<local_rank>`` where a GPU is present, else ``cpu``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto"
            )
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    return dev


def setup_distributed(device: str = "auto", backend: str | None = None) -> DistContext:
    """Join the process group started by torchrun (if any) and pick this process's device."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        _export_slurm_environment()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"))
    return DistContext(rank, world_size, local_rank, dev)


def _export_slurm_environment() -> None:
    """Under Slurm (one task per GPU, e.g. hydra-submitit-launcher) set RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun would."""
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        raise RuntimeError(
            "a multi-task Slurm job needs submitit to set up torch.distributed: "
            "pip install 'ctrl_csc[slurm]', or start the job with torchrun"
        ) from None
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ResumableSampler(Sampler[int]):
    """Shuffles with a permutation seeded by ``(seed, epoch)``, hands each rank its share, and can
    start part-way through an epoch — so a resumed run reads exactly the batches the uninterrupted
    run would have read, without loading the skipped ones.

    Each rank receives ``len(dataset) // world_size`` indices per epoch (the remainder is dropped so
    that every rank holds the same number), rank ``r`` taking positions ``r, r + W, ...`` of the
    permutation.
    """

    def __init__(
        self,
        num_samples: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples < world_size:
            raise ValueError(
                f"dataset of {num_samples} samples is smaller than the number of "
                f"processes ({world_size})"
            )
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Next iteration yields epoch ``epoch`` from this rank's ``start``-th index on."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_samples // self.world_size - self.start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        per_rank = self.num_samples // self.world_size
        mine = order[self.rank : per_rank * self.world_size : self.world_size]
        return iter(mine[self.start :].tolist())


# ---------------------------------------------------------------------------- preemption

#: Exit status of a run stopped by SIGTERM/SIGUSR1 after writing ``checkpoints/last.pt``
#: (``EX_TEMPFAIL``: try again later; a scheduler or wrapper script requeues on it).
PREEMPTED_EXIT_CODE = 75


class TrainingPreempted(SystemExit):
    """The run was stopped by a signal after finishing its step and writing ``last.pt``.

    A :class:`SystemExit` with status :data:`PREEMPTED_EXIT_CODE`, so that the console scripts
    exit with that status; Python callers can catch it.
    """

    def __init__(self, signum: int, step: int, path) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.signum, self.step, self.path = signum, step, path


class PreemptionGuard:
    """Turns SIGTERM / SIGUSR1 (and SIGUSR2 where submitit listens on it) into a request to stop
    at the end of the current training step.

    The handlers only set a flag (nothing is done inside a signal handler); the trainer asks
    :meth:`should_stop` after each step, which under ``torch.distributed`` agrees over all ranks
    (one tiny all-reduce) so that every rank stops after the same step. After the checkpoint is
    written, :meth:`requeue` hands the signal to the handler that was installed before (submitit's,
    under hydra-submitit-launcher: it resubmits the job), or else, in a plain Slurm job, runs
    ``scontrol requeue`` for this job. Handlers are installed only in the main thread and restored
    by :meth:`uninstall`.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, ctx: DistContext, requeue: bool = True) -> None:
        self.ctx, self.requeue_enabled = ctx, requeue
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        names = list(self.SIGNALS)
        usr2 = getattr(signal, "SIGUSR2", None)
        if usr2 is not None and callable(signal.getsignal(usr2)):  # submitit's timeout signal
            names.append("SIGUSR2")
        for name in names:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.signum = signum

    def should_stop(self) -> bool:
        if not self.ctx.distributed:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else 1], device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = signal.SIGTERM  # another rank was signalled
        return bool(flag.item())

    def requeue(self) -> str | None:
        """Ask the scheduler to run the job again; returns how, or ``None``."""
        if not self.requeue_enabled or self.signum is None:
            return None
        previous = self._previous.get(self.signum)
        self.uninstall()
        if callable(previous):  # submitit's handler: checkpoints the launcher, requeues, exits
            previous(self.signum, None)
            return "submitit"
        job = os.environ.get("SLURM_JOB_ID")
        if not job or not self.ctx.is_main or shutil.which("scontrol") is None:
            return None
        if os.environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("scontrol requeue %s failed: %s", job, done.stderr.strip())
            return None
        return f"scontrol requeue {job}"


# ---------------------------------------------------------------------------- per-rank state


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random streams in a run seeded with ``seed``: a hash of the
    pair, so that ranks draw independent noise (rank 0 included; one process keeps ``seed``)."""
    digest = hashlib.sha256(f"ctrl_csc:{int(seed)}:{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def agree_on_run_dir(path: str | os.PathLike, ctx: DistContext) -> Path:
    """Rank 0's run directory on every rank. Under torchrun each process composes its own Hydra
    config, and ``${now:...}`` in ``hydra.run.dir`` may differ between them by a second."""
    if not ctx.distributed:
        return Path(path)
    chosen = [str(path)]
    dist.broadcast_object_list(chosen, src=0)
    if chosen[0] != str(path):
        log.info("rank %d writes to rank 0's run directory %s (not %s)", ctx.rank, chosen[0], path)
    return Path(chosen[0])


def gather_objects(obj, ctx: DistContext) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
