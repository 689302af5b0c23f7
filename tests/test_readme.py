"""The README's code runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_moe_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README lost its Python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    y, block = namespace["y"], namespace["block"]
    assert y.shape == (8, 128, 256)
    assert block.moe.w_in[...].sharding.spec[0] == "expert"


def test_readme_commands_match_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = 'pip install -e ".[test]" && python -m pytest -q'
    assert test_command in README.read_text() and test_command in ci
