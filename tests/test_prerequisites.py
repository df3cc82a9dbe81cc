"""The test command checks its own prerequisites: under CI a missing backend fails."""

from __future__ import annotations

import os
import subprocess
import sys

import capabilities
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

SAMPLE = '''
import pytest

@pytest.mark.mpi
def test_marked_mpi():
    pytest.skip("mpiexec is not here")

def test_required_by_reason():
    pytest.skip("needs slurm: salloc not found")

def test_missing_module():
    pytest.importorskip("executorkit_no_such_module")

def test_unrelated_skip():
    pytest.skip("needs 2 CPUs to observe pinning")
'''


def _run_sample(tmp_path, ci: str | None) -> str:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
         "-rfs", "-o", "markers=mpi", "--rootdir", str(tmp_path), "-c", os.devnull,
         str(tmp_path / "test_sample.py")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env, check=False,
    )
    return proc.stdout + proc.stderr


def test_without_ci_missing_backends_skip(tmp_path):
    out = _run_sample(tmp_path, ci=None)
    assert "4 skipped" in out and "failed" not in out, out


def test_under_ci_a_skip_for_a_required_capability_fails(tmp_path):
    out = _run_sample(tmp_path, ci="true")
    assert "3 failed, 1 skipped" in out, out
    assert "FAILED test_sample.py::test_marked_mpi" in out
    assert "FAILED test_sample.py::test_required_by_reason" in out
    assert "FAILED test_sample.py::test_missing_module" in out
    assert "CI is set and this test skipped for want of mpi" in out


def test_the_prerequisite_check_names_what_is_missing(monkeypatch, capsys):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setitem(capabilities.PROBES, "fake", lambda: "fake backend not installed")
    monkeypatch.setattr(capabilities, "REQUIRED_IN_CI", (*capabilities.REQUIRED_IN_CI, "fake"))
    capabilities.missing.cache_clear()
    try:
        assert capabilities.main() == 1
    finally:
        capabilities.missing.cache_clear()
    assert "prerequisite missing: fake: fake backend not installed" in capsys.readouterr().err


@pytest.mark.parametrize("name", capabilities.REQUIRED_IN_CI)
def test_every_required_capability_has_a_probe(name):
    assert name in capabilities.PROBES


def test_outside_ci_the_prerequisite_check_only_reports(monkeypatch, capsys):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setitem(capabilities.PROBES, "fake", lambda: "fake backend not installed")
    monkeypatch.setattr(capabilities, "REQUIRED_IN_CI", (*capabilities.REQUIRED_IN_CI, "fake"))
    capabilities.missing.cache_clear()
    try:
        assert capabilities.main() == 0
    finally:
        capabilities.missing.cache_clear()
    assert "not here (its tests will skip): fake" in capsys.readouterr().err
