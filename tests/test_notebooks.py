"""The notebooks run top to bottom, in smoke mode, in a fresh Jupyter kernel.

Every ``notebooks/*.ipynb`` is executed with nbclient, with ``LIPDP_SMOKE=1`` in the
kernel's environment: each notebook reads that variable and shrinks its work (fewer
epochs, smaller data) so the whole run stays short. The executed copies go to pytest's
temporary folder; the notebooks in the repository are never rewritten.

The kernel is the ``python3`` kernel, which jupyter_client starts with the interpreter
running pytest (``test_kernel_is_this_interpreter`` checks it), so the notebooks see the
same installed lipdp as the other tests.
"""

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
MAX_NOTEBOOK_BYTES = 1_000_000  # stored outputs stay small: the repository is no image store
KERNEL_NAME = "python3"
CELL_TIMEOUT_S = 600


def _execute(nb, tmp_path, name, cwd=NOTEBOOKS_DIR):
    """Run `nb` in a fresh kernel working in `cwd` (notebooks/ by default); save the result under tmp_path."""
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(cwd)}},
    )
    try:
        client.execute()
    finally:  # keep what ran, also on failure, for a look with `pytest --basetemp=DIR`
        nbformat.write(nb, str(tmp_path / name))
    return nb


def _sources(path):
    return "\n".join(cell.source for cell in nbformat.read(str(path), as_version=4).cells)


def test_kernel_is_this_interpreter(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    _execute(nb, tmp_path, "kernel_check.ipynb", cwd=tmp_path)
    printed = "".join(output.get("text", "") for output in nb.cells[0].outputs).strip()
    assert Path(printed).resolve() == Path(sys.executable).resolve()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LIPDP_SMOKE", "1")  # before the kernel starts: it inherits the environment
    nb = nbformat.read(str(path), as_version=4)
    _execute(nb, tmp_path, path.name)
    errors = [output for cell in nb.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors, errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_has_smoke_switch(path):
    assert "LIPDP_SMOKE" in _sources(path), f"{path.name} never reads LIPDP_SMOKE, so its test run is full-size"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_is_small(path):
    size = path.stat().st_size
    assert size < MAX_NOTEBOOK_BYTES, f"{path.name} is {size:,} bytes: clear or shrink its stored outputs"
