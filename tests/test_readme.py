"""The README's Python example runs as written (two training steps instead of 200)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path):
    block = re.search(r"## From Python\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "max_steps=200" in block and '"runs/demo"' in block
    block = block.replace("max_steps=200", "max_steps=2").replace(
        '"runs/demo"', repr(str(tmp_path))
    )
    exec(compile(block, str(README), "exec"), {})
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_readme_commands_are_the_ci_commands():
    text = README.read_text()
    for tag in ("ci:setup", "ci:test"):
        assert f"<!-- {tag} -->\n```bash\n" in text
