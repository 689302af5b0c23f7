"""Every notebook in notebooks/ runs top to bottom without an error (nbclient, kernel python3).

The notebooks assert their own numbers (group algebra, routing against a
plain-Python fill, memory and all-to-all bytes against formulas, restored
checkpoints equal to the live state), so a wrong number fails here too. They
are committed with their outputs (so tables and plots show where the
repository is browsed) and run here again from the repository root.
"""

from __future__ import annotations

from pathlib import Path

import nbclient  # the `test` extra installs nbclient, nbformat, ipykernel, matplotlib
import nbformat
import pytest
from jupyter_core.utils import run_sync

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = [
    "01_ted_mesh_and_sharding.ipynb",
    "02_moe_routing_and_collectives.ipynb",
    "03_memory_and_communication.ipynb",
    "04_train_and_inspect.ipynb",
    "05_load_balance.ipynb",
    "06_pipeline.ipynb",
]
CELL_TIMEOUT_S = 300


def test_all_notebooks_present():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs(path):
    """Committed executed top to bottom (plots included), without errors; 8 CPU devices requested before jax."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"run {path.name} top to bottom and save it: jupyter nbconvert --to notebook --execute --inplace {path}"
    )
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    for cell in code:
        if "plt.show()" in cell.source:
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), f"a plot of {path.name} lost its image"
    first = code[0].source
    assert "--xla_force_host_platform_device_count=8" in first and "import jax" not in first


@pytest.fixture(scope="module")
def kernel():
    """One kernel for all the notebooks: each starting one paid ~4 s of CPU to import ipykernel, jax, tedjax
    and matplotlib again. Each notebook first gets the kernel back as it started (RESET below)."""
    # The kernel inherits this process's environment: conftest's fast-compile XLA flags, the CPU platform.
    km = nbclient.NotebookClient(nbformat.v4.new_notebook(), kernel_name="python3").create_kernel_manager()
    run_sync(km.start_kernel)(cwd=str(ROOT))
    yield km
    run_sync(km.shutdown_kernel)(now=True)


# Run before each notebook: no name survives from the notebook before (%reset -f also drops the names of
# imported modules, so a missing import still fails), no figure, the starting directory. Every notebook sets
# XLA_FLAGS for the same 8 devices before it imports jax (test_committed_with_outputs checks that), so a jax
# already set up by an earlier notebook is the one it would have made.
RESET = f"%reset -f\nimport matplotlib.pyplot, os\nmatplotlib.pyplot.close('all')\nos.chdir({str(ROOT)!r})\n%reset -f"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel):
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(RESET))
    client = nbclient.NotebookClient(nb, km=kernel, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})  # fmt: skip
    try:
        client.execute()  # raises CellExecutionError, naming the cell, on any error
    except BaseException:
        run_sync(kernel.restart_kernel)(now=True)  # (a hung cell must not hold up the next notebook)
        raise
    finally:
        if client.kc is not None:
            client.kc.stop_channels()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
