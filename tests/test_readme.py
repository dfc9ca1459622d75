"""What the README states: its Python example runs as written (two training steps instead of
200), its model table's parameter counts are the configs'."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example(out_dir, steps=None) -> dict:
    """Run the README's Python example (in ``out_dir``; ``steps`` instead of its 200); return
    its namespace."""
    block = re.search(r"## From Python\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert block.count("max_steps=200") == 2 and '"runs/demo"' in block
    if steps is not None:
        block = block.replace("max_steps=200", f"max_steps={steps}")
    block = block.replace('"runs/demo"', repr(str(out_dir)))
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    return namespace


def test_readme_python_example_runs(tmp_path):
    python_example(tmp_path, steps=2)
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_readme_python_example_learns(tmp_path):
    """As written (200 steps on mnist5k, about 1.5 min on 2 cores), the example reconstructs
    held-out digits: 20.3 dB measured (18.6 with both players at lr 1e-3), the mean training image
    scores 12.7."""
    torch.set_num_threads(2)
    psnr = python_example(tmp_path)["metrics"]["psnr"]
    assert psnr >= 18.0, f"the README's Python example reached {psnr:.2f} dB after 200 steps"


def test_readme_commands_are_the_ci_commands():
    text = README.read_text()
    for tag in ("ci:setup", "ci:test"):
        assert f"<!-- {tag} -->\n```bash\n" in text


def test_readme_parameter_counts_are_the_configs():
    """Each row of the model table, built from its config at the row's resolution (the name's
    ``_<size>``, 32 otherwise) with 3 channels, has the parameter count the README gives."""
    from hydra import compose, initialize_config_dir

    from ctrl_csc.cli.common import build_models, config_dir

    table = README.read_text().split("| `model=` | for | parameters | what |\n")[1].split("\n\n")[0]
    rows = re.findall(
        r"^\| (`[a-z_0-9]+`(?: / `[a-z_0-9]+`)?) \| [^|]* \| ([0-9./ M]+) \|", table, re.M
    )
    assert len(rows) >= 10
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for names, counts in rows:
            for name, count in zip(re.findall(r"`(\w+)`", names), counts.split(" / "), strict=True):
                size = int(m.group(1)) if (m := re.search(r"_(\d+)$", name)) else 32
                over = [f"model={name}", "dataset.channels=3", f"dataset.image_size={size}"]
                f, g = build_models(compose("train", overrides=over).model)
                total = sum(p.numel() for m in (f, g) for p in m.parameters())
                assert f"{total / 1e6:.2f} M" == count.strip(), (name, total)
