"""Every notebook in notebooks/ runs top to bottom, and none is committed with outputs.

The notebooks are found by glob, so a new notebook is tested without touching this file.
Each one runs in a fresh ``python3`` kernel (executorkit must be importable there; it is
installed in the environment) with a temporary working directory.

A code cell may list text its output must contain, in its metadata::

    {"executorkit": {"expected_output": ["step 0: finished"]}}

which checks, for example, that what a task prints really reaches the notebook.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell


def _ids(path: Path) -> str:
    return path.name


def _stream_text(cell: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", [])
                   if out.get("output_type") == "stream")


def _skip_without_backend(name: str) -> None:
    """Notebooks about a backend skip, with the reason, where that backend is missing."""
    import capabilities

    for backend in ("slurm", "mpi"):
        if name.startswith(backend):
            capabilities.require(backend)
    if name.startswith("flux"):  # also needs a running broker (test.sh: inside flux start)
        from conftest import flux_missing

        if flux_missing() is not None:
            pytest.skip(flux_missing())


def skip_without_backend(name: str) -> None:
    _skip_without_backend(name)


class NotebookRuns:
    """Each notebook executed at most once per test session (the docs build renders the
    same run's outputs): ``run(path)`` -> the executed notebook, or the failure text."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.done: dict[Path, tuple[nbformat.NotebookNode, str | None]] = {}

    def run(self, path: Path) -> tuple[nbformat.NotebookNode, str | None]:
        if path not in self.done:
            self.done[path] = self._execute(path)
        return self.done[path]

    def _execute(self, path: Path) -> tuple[nbformat.NotebookNode, str | None]:
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError

        cwd = self.workdir / path.stem
        cwd.mkdir()
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb,
            timeout=CELL_TIMEOUT,
            kernel_name="python3",
            resources={"metadata": {"path": str(cwd)}},  # the kernel's working directory
        )
        try:
            client.execute()
        except CellExecutionError as exc:
            return nb, str(exc)
        return nb, None


@pytest.mark.slow
@pytest.mark.parametrize("path", [  # notebooks about Flux run with the Flux tests (test.sh)
    pytest.param(p, marks=pytest.mark.flux) if p.name.startswith("flux") else p
    for p in NOTEBOOKS], ids=_ids)
def test_notebook_runs(path: Path, notebook_runs: NotebookRuns) -> None:
    _skip_without_backend(path.name)
    nb, failure = notebook_runs.run(path)
    if failure is not None:
        pytest.fail(f"notebook {path.name} failed:\n{failure}", pytrace=False)

    for index, cell in enumerate(nb.cells):
        expected = cell.get("metadata", {}).get("executorkit", {}).get("expected_output", [])
        if not expected:
            continue
        text = _stream_text(cell)
        missing = [item for item in expected if item not in text]
        assert not missing, (
            f"{path.name}, cell {index}: output lacks {missing}; the cell printed:\n{text}"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_is_committed_clean(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    dirty = [
        index
        for index, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, (
        f"{path.name} has stored outputs or execution counts in cells {dirty}; clear them "
        f"(for example: jupyter nbconvert --clear-output --inplace {path.name})"
    )


def test_notebooks_found() -> None:
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"
