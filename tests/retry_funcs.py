"""Task functions for the retry tests (importable by workers)."""

import os
import signal


def die_unless_two_threads():
    """Dies like an out-of-memory kill unless it was given two threads per core."""
    if os.environ.get("OMP_NUM_THREADS") != "2":
        os.kill(os.getpid(), signal.SIGKILL)
    return "ok with 2 threads"


def always_die():
    os.kill(os.getpid(), signal.SIGKILL)


def fail_first_time(marker):
    """Raises ValueError the first time (per marker file), then succeeds."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise ValueError("first attempt fails")
    return "second attempt"


def add_one(x):
    return x + 1


def hang_first_time(marker):
    """Hangs the first time (per marker file), so that attempt can only end by a timeout."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        signal.pause()
    return "second attempt"
