"""The house rules every stage notebook follows, checked the same way for each of them."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat


def assert_thin_and_clean(path: Path, parameters: set[str]) -> None:
    """No outputs, one `parameters` cell assigning exactly `parameters`, no def/class anywhere."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters'"
    assigned = {t.id for n in ast.parse(tagged[0].source).body for t in n.targets}
    assert assigned == parameters, f"{path.name}: parameters {sorted(assigned ^ parameters)} differ"
    assert {"data_dir", "output_dir", "preset"} <= assigned
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: has outputs"
        tree = ast.parse(cell.source)
        defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        assert not defs, f"{path.name}: def/class in a notebook belongs in utils/"


def run_notebook(path: Path, parameters: dict, tmp_path: Path, monkeypatch) -> Path:
    """Execute a stage notebook with papermill from the repository root, as CI and the pipeline
    do (utils importable, headless matplotlib); returns the executed notebook's path."""
    import papermill as pm

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", str(repo))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    executed = tmp_path / "executed.ipynb"
    pm.execute_notebook(
        str(path),
        str(executed),
        parameters=parameters,
        kernel_name="python3",
        cwd=str(repo),
        progress_bar=False,
    )
    return executed


def write_standin_notebook(path: Path, parameters: list[str], body: str) -> None:
    """A stand-in stage notebook: a tagged parameters cell (every name None) and one body cell."""
    params = nbformat.v4.new_code_cell("\n".join(f"{name} = None" for name in parameters))
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(body)])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)
