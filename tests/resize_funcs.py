"""Functions the resize tests run in workers: a barrier that proves calls run at once."""

from __future__ import annotations

import os
import time


def init_tag():
    return {"tag": "initialised"}


def arrived(directory):
    return len(os.listdir(directory)) if os.path.isdir(directory) else 0


def meet(directory, n, tag=None, timeout=60.0):
    """Arrive at a barrier of ``n`` calls and wait for the others; once all came: (pid, tag,
    Slurm job id or None).

    Only calls running at the same time can all arrive: a call that has to wait for a free
    worker never gets here while the others wait, and they fail after ``timeout``.
    """
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{os.getpid()}.{time.monotonic_ns()}"), "w"):
        pass
    deadline = time.monotonic() + timeout
    while arrived(directory) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {arrived(directory)} of {n} calls ran at once")
        time.sleep(0.01)  # waiting for a condition (the other calls), not ordering events
    return os.getpid(), tag, os.environ.get("SLURM_JOB_ID")
