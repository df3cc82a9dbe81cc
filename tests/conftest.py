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
# The same behaviour suite on FluxJobExecutor, when a Flux broker is reachable.
FLUX_MODES = {
    "flux-per-task": {},
    "flux-block": {"block_allocation": True},
}


def flux_missing() -> str | None:
    """Why no Flux broker is usable from this process (None: one is)."""
    if capabilities.missing("flux") is not None:
        return capabilities.reason("flux")
    if not os.environ.get("FLUX_URI"):
        return "needs flux: no Flux broker, FLUX_URI is not set (run inside `flux start`)"
    return None


# The modules of the shared behaviour suite that also run on FluxJobExecutor (the flux
# modes of ``mode``; test_command: a Command is a Flux job of the program itself). The
# fault-injection, stdlib-parity and retry suites probe SingleNodeExecutor's own machinery
# (fork server, thousands of calls): their flux-mode items are left out rather than run
# against Flux.
FLUX_SUITE = {"test_executor", "test_dependencies", "test_cancel", "test_task_resources",
              "test_cache_executor", "test_mpi", "test_notebooks", "test_syspath",
              "test_command"}


def _flux_mode_elsewhere(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    mode = params.get("mode", params.get("mpi_exe"))
    return (isinstance(mode, str) and mode.startswith("flux")
            and item.module.__name__.rsplit(".", 1)[-1] not in FLUX_SUITE)


def pytest_collection_modifyitems(config, items):
    drop = [i for i in items if _flux_mode_elsewhere(i)]
    # .ci_support/test.sh runs the Flux tests inside Flux instances of their own; its main
    # run (without a broker) leaves them out instead of reporting them as skipped.
    if os.environ.get("EXECUTORKIT_FLUX_SEPARATE") == "1" and not os.environ.get("FLUX_URI"):
        drop += [i for i in items if i.get_closest_marker("flux") is not None
                 or i.get_closest_marker("flux_nodes") is not None]
    if drop:
        gone = set(map(id, drop))
        config.hook.pytest_deselected(items=drop)
        items[:] = [i for i in items if id(i) not in gone]


@pytest.fixture(params=[*MODES, *(pytest.param(m, marks=pytest.mark.flux) for m in FLUX_MODES)])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def new_executor(mode: str, **kwargs):
    """An executor in ``mode``: SingleNodeExecutor, or FluxJobExecutor in the flux modes
    (the test skips with the reason when no Flux broker is reachable)."""
    if mode in FLUX_MODES:
        reason = flux_missing()
        if reason:
            pytest.skip(reason)
        from executorkit import FluxJobExecutor

        return FluxJobExecutor(**{**FLUX_MODES[mode], **kwargs})
    from executorkit import SingleNodeExecutor

    return SingleNodeExecutor(**{**MODES[mode], **kwargs})


@pytest.fixture
def make_executor(mode: str):
    """``make_executor(**kwargs)`` -> an executor in the current mode (see ``new_executor``),
    shut down (cancelling what is left) after the test."""
    if mode in FLUX_MODES and flux_missing():
        pytest.skip(flux_missing())
    created = []

    def make(**kwargs):
        exe = new_executor(mode, **kwargs)
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


def dial(address, timeout: float = 30.0):
    """A raw socket connected to an engine's ``address`` (a local socket's name or a TCP host
    and port), as a peer that does not know the secret would connect."""
    import socket

    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address)
        return sock
    return socket.create_connection(address, timeout=timeout)


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


@pytest.fixture
def module_for_workers(tmp_path, monkeypatch):
    """``make(prefix, source, imported=True)``: write ``source`` as a uniquely named module
    in ``tmp_path`` that the driver and every worker can import (sys.path and PYTHONPATH),
    import it (unless ``imported`` is false) and return it, or its name; forgotten after
    the test."""
    import textwrap
    import uuid

    names: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))

    def make(prefix: str, source: str, imported: bool = True):
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return __import__(name) if imported else name

    yield make
    for name in names:
        sys.modules.pop(name, None)
