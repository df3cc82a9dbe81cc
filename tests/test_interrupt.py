"""One Ctrl-C stops everything: running calls are killed, waiting ones cancelled, no process
is left, and the script ends with KeyboardInterrupt (issue 10, point 4).

A real script runs in a subprocess; the test sends SIGINT once every call that can run is
known to be running (each call creates a file first), then checks how the script ended and
that every process it had started is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest
from conftest import wait_until
from test_mpi import HAVE_MPI

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "interrupt_script.py")
RUNNING = {"per-task": 2, "block": 2, "mpi": 2, "mpi-block": 2}  # started files expected
HANG_GUARD = 60  # seconds; the calls themselves would sleep for 600


def _started(directory: str) -> int:
    return sum(name.endswith(".started") for name in os.listdir(directory))


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("style", ["with", "plain"])
@pytest.mark.parametrize("mode", [
    "per-task", "block",
    pytest.param("mpi", marks=[pytest.mark.mpi, pytest.mark.skipif(not HAVE_MPI,
                                                                    reason="needs MPI")]),
    pytest.param("mpi-block", marks=[pytest.mark.mpi,
                                     pytest.mark.skipif(not HAVE_MPI, reason="needs MPI")]),
])
def test_one_ctrl_c_stops_everything(tmp_path, mode, style):
    directory = str(tmp_path)
    proc = subprocess.Popen([sys.executable, SCRIPT, mode, style, directory],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _started(directory) >= RUNNING[mode] or proc.poll() is not None,
                   timeout=HANG_GUARD)
        assert proc.poll() is None, proc.communicate()
        started = psutil.Process(proc.pid).children(recursive=True)
        assert started  # the fork server, the workers (and mpiexec with its ranks)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG_GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGINT, err
    assert "KeyboardInterrupt" in err
    assert "Exception ignored" not in err and "Exception in thread" not in err, err
    wait_until(lambda: not _alive(started), timeout=HANG_GUARD)
    # the two calls that were waiting never started
    assert _started(directory) == RUNNING[mode]
