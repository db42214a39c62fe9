"""Every notebook runs top to bottom (with MINEE_NOTEBOOK_QUICK=1: small corpus slices)."""
import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_four_tutorials():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]


def run_notebook(path, monkeypatch, model=None):
    """Execute the notebook at `path` (quick sizes), with MODEL = `model` if given; its code cells."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MINEE_NOTEBOOK_QUICK", "1")
    root = str(path.parents[1])
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{path.name} is committed with outputs; clear them"
    if model is not None:
        setup = next(c for c in nb.cells if c.cell_type == "code" and 'MODEL = "smollm2-135m"' in c.source)
        setup.source = setup.source.replace('MODEL = "smollm2-135m"', f"MODEL = {model!r}")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, smollm2_dir, monkeypatch):
    run_notebook(path, monkeypatch)


def test_paper_notebook_runs_on_gemma(gemma3_dir, monkeypatch):
    """Notebook 04 takes its model from MODEL alone: with Gemma 3 270M it runs top to bottom on
    Gemma's 36 exit points (the teacher-forcing cell prints how many it read)."""
    cells = run_notebook(NOTEBOOKS[3], monkeypatch, model="gemma3-270m")
    shown = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for c in cells for o in c.outputs)
    assert " tokens, 36 exit points, model perplexity " in shown, shown[:2000]
