"""The checkpoint layout documented in engine/checkpoint.py is the one the trainer writes."""

import re

from tiny_players import make_trainer

from ctrl_csc.engine import checkpoint, load_checkpoint


def test_documented_keys_are_the_written_keys(tmp_path):
    layout = checkpoint.__doc__.split("::", 1)[1].split("\n\n", 2)[1]
    layout = re.sub(r"#.*", "", layout)
    documented, depth = set(), 0
    for m in re.finditer(r'[{}\[\]]|"(\w+)":', layout):  # the keys of the outer dict only
        token = m.group(0)
        depth += (token in "{[") - (token in "}]")
        if m.group(1) and depth == 1:
            documented.add(m.group(1))
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit()
    written = set(load_checkpoint(tmp_path / "checkpoints" / "last.pt"))
    assert "epoch" not in written
    # rng_ranks is written only under torchrun (tests/test_distributed_state.py)
    assert documented - {"rng_ranks"} == written, (documented, written)
