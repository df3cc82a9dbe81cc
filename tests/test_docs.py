"""The documentation: Sphinx builds it with warnings as errors, and its examples run.

Every fenced ```` ```python ```` block in docs/*.md (and the README's) is executed, each in
a fresh interpreter in a temporary directory, so the examples cannot rot; blocks that need a
cluster are written as ```` ```{code-block} python ```` and only rendered. The build renders
the notebooks with the outputs of this session's run of them (see test_notebooks.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from test_notebooks import NOTEBOOKS, skip_without_backend

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _examples() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        if "_build" in page.parts:
            continue
        for number, match in enumerate(_BLOCK.finditer(page.read_text()), 1):
            found.append((f"{page.relative_to(ROOT)}#{number}", match[1]))
    return found


EXAMPLES = _examples()


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


@pytest.mark.parametrize("code", [c for _, c in EXAMPLES], ids=[i for i, _ in EXAMPLES])
def test_doc_example_runs(code: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"example failed:\n{code}\n--- stderr:\n{result.stderr}"


def test_examples_found() -> None:
    assert len(EXAMPLES) >= 5


def _executed_notebooks(target: Path, notebook_runs) -> None:
    """Replace the notebooks in the copied docs by this session's executed ones."""
    target.unlink() if target.is_symlink() else shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for path in NOTEBOOKS:
        try:
            skip_without_backend(path.name)
        except pytest.skip.Exception:
            shutil.copy(path, target / path.name)  # rendered without outputs
            continue
        nb, failure = notebook_runs.run(path)
        assert failure is None, f"notebook {path.name} failed:\n{failure}"
        nbformat.write(nb, target / path.name)


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path: Path, notebook_runs) -> None:
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    src = tmp_path / "docs"
    shutil.copytree(DOCS, src, symlinks=True, ignore=shutil.ignore_patterns("_build"))
    _executed_notebooks(src / "notebooks", notebook_runs)
    out = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(src),
         str(out)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}\n{result.stderr}"
    page = (out / "notebooks" / "quickstart.html").read_text()
    assert "output" in page  # rendered with outputs
    assert (out / "api.html").read_text().count("class=\"sig-name descname\"") >= 10
