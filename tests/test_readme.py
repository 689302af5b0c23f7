"""The README's code runs as pasted, and every name in its API table exists after a plain `import tedjax`.

Each Python block runs in a fresh interpreter without the test suite's
XLA_FLAGS or JAX_PLATFORMS, as a reader would run it from a file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
TIMEOUT_S = 600


def fresh_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `code` from a file in a clean interpreter (no XLA_FLAGS, no JAX_PLATFORMS), from a scratch dir."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    script = tmp_path / "snippet.py"
    script.write_text(code)
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, "README lost its Python examples"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_as_pasted(index, tmp_path):
    run = fresh_python(BLOCKS[index], tmp_path)
    assert run.returncode == 0, f"README block {index} failed:\n{run.stderr[-4000:]}"
    out = run.stdout
    assert out.strip(), f"README block {index} prints nothing a reader can check"
    # What each block prints and the comments next to its prints say must agree.
    for spec in re.findall(r"print\(.*?\)\s+# (P\(.*?\))$", BLOCKS[index], re.M):
        assert spec in out, f"block {index} promises {spec} in a comment, printed:\n{out}"
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
    if losses:  # a training block: the loss goes down
        assert len(losses) >= 2 and losses[-1] < losses[0] - 1.0, out


def _api_names() -> list[str]:
    """Dotted names in the first column of the README's Public API table (`tedjax.x.y(...)`, then bare `z`
    for more names of the same module)."""
    section = README.read_text().split("## Public API", 1)[1].split("\n## ", 1)[0]
    names = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        module = "tedjax"
        for token in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
            token = token.split("(")[0].strip()
            if token.startswith("tedjax"):
                names.append(token)
                module = token.rsplit(".", 1)[0] if token.count(".") >= 2 else "tedjax"
            elif re.fullmatch(r"[A-Za-z_]\w*", token):
                names.append(f"{module}.{token}")
    return names


def test_api_table_names_work_after_import_tedjax(tmp_path):
    names = _api_names()
    assert {"tedjax.make_mesh", "tedjax.analysis.collectives", "tedjax.loop.run", "tedjax.train_step_fn"} <= set(
        names
    ), names
    code = (
        "import functools, tedjax\n"
        f"for name in {names!r}:\n"
        "    functools.reduce(getattr, name.split('.')[1:], tedjax)\n"
        f"print('ok', {len(names)})\n"
    )
    run = fresh_python(code, tmp_path)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def test_readme_commands_match_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    # 2 workers, one test file each at a time (module fixtures compile once); the 15 slowest tests printed
    test_command = 'pip install -e ".[test]" && python -m pytest -q -n 2 --dist loadfile --durations=15'
    assert test_command in README.read_text().splitlines() and test_command in ci.splitlines()
