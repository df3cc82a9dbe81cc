"""Shared fixtures: an executor factory over every available mode, and a check that no test
leaves a process behind."""

from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# Workers import the task functions of tests/taskfuncs.py by name.
if HERE not in sys.path:
    sys.path.insert(0, HERE)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (HERE, os.environ.get("PYTHONPATH")) if p
)

import capabilities  # noqa: E402  (needs the path set above)

MODES = {
    "per-task": {},
    "block": {"block_allocation": True},
}


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_executor(mode: str):
    """``make_executor(**kwargs)`` -> a SingleNodeExecutor in the current mode, shut down
    (cancelling what is left) after the test."""
    from executorkit import SingleNodeExecutor

    created = []

    def make(**kwargs):
        exe = SingleNodeExecutor(**{**MODES[mode], **kwargs})
        created.append(exe)
        return exe

    yield make
    for exe in created:
        exe.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(autouse=True)
def scratch_cwd(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test runs in a temporary working directory: nothing a test or its tasks write
    there (the output files of Command calls, say) lands in the repository."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def notebook_runs(tmp_path_factory: pytest.TempPathFactory):
    """Executes each notebook once per session (test_notebooks and test_docs share it)."""
    from test_notebooks import NotebookRuns

    return NotebookRuns(tmp_path_factory.mktemp("notebook-runs"))


def _descendants() -> list[psutil.Process]:
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(autouse=True)
def no_leftover_processes():
    before = {p.pid for p in _descendants()}
    yield
    deadline = time.monotonic() + 15
    while True:
        left = [p for p in _descendants() if p.pid not in before]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # waiting for a condition, not ordering events
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.01) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI a skip for a missing required capability is a failure (see capabilities)."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and capabilities.in_ci()) or hasattr(report, "wasxfail"):
        return
    skip_reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
    markers = {mark.name for mark in item.iter_markers()}
    needed = capabilities.required_skip(str(skip_reason).removeprefix("Skipped: "), markers)
    if needed is not None:
        report.outcome = "failed"
        report.longrepr = (f"CI is set and this test skipped for want of {needed}: "
                           f"{skip_reason}. The project's set-up (.ci_support/setup.sh, the "
                           "'test' extra, start-slurm.sh) must provide it.")
