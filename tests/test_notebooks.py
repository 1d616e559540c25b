"""The notebooks run top to bottom (small settings) and are stored executed, without errors.

nbclient starts kernel "python3"; jupyter_client launches its `python` with the running interpreter
(sys.executable), i.e. this .venv, and each notebook prints the interpreter it runs on so that is
checked too. JAXCHUNK_NOTEBOOK_SMALL=1 makes the parameter cells pick small settings.
"""
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = ["01_chunked_prefill.ipynb", "02_chunk_size_sweep.ipynb", "03_serving.ipynb"]


def outputs_text(nb) -> str:
    return "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []))


@pytest.mark.parametrize("name", ALL)
def test_stored_notebook_is_executed_without_errors(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count for cell in code), "store the notebook executed"
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "run top to bottom"
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert any(out.output_type == "display_data" and "image/png" in out.data
               for cell in code for out in cell.outputs), "plots are stored"


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(ALL[0], marks=pytest.mark.model), ALL[1], ALL[2]])
def test_notebook_runs(name, monkeypatch, tmp_path):
    monkeypatch.setenv("JAXCHUNK_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAXCHUNK_NOTEBOOK_OUT", str(tmp_path))  # notebooks 02 / 03: the run's output
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    assert f"kernel python: {sys.executable}" in outputs_text(nb)
