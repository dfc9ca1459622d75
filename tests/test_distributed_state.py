"""Under torch.distributed: one run directory (rank 0's), per-rank random streams seeded by
(seed, rank), and every rank's random state in the checkpoint."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from torchrun_helpers import free_port, train_rank

from ctrl_csc.cli.common import config_dir
from ctrl_csc.engine import load_checkpoint
from ctrl_csc.engine.distributed import rank_seed


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
