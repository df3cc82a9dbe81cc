"""The shared-memory files of an MPI job that did not end by itself.

MPICH keeps a POSIX shared-memory file per node and job (``/dev/shm/mpich_shm_*``, also for
a single process that initialises MPI) until MPI_Finalize. A job that is killed (cancel,
``run_time_max``, Ctrl-C, a driver that died) or aborts (a rank raised) never gets there,
and the file (one or a few MB of RAM) stays until the machine reboots. So:

* the first rank on each node of an MPI worker notes its job's files in the worker's private
  directory, and once the job is gone that directory is discarded with the files it names
  on this machine (:func:`discard_worker_dir`; files on other nodes are out of reach): by
  the engine, or by the fork server when the driver is gone;
* the fork server, killing a worker, first looks which files it has mapped, and removes
  them once it is dead;
* a worker that leaves without MPI_Finalize (``os._exit``, as forked workers do) removes its
  own first (:func:`release_own`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterable
from typing import Any

_SHM_PREFIX = "/dev/shm/mpich_shm_"


def _is_segment(path: str) -> bool:
    name = path[len(_SHM_PREFIX):]
    return path.startswith(_SHM_PREFIX) and bool(name) and "/" not in name and " " not in name


def mapped_segments(pid: int | str = "self") -> set[str]:
    """The MPICH shared-memory files process ``pid`` has mapped (and not yet removed)."""
    try:
        with open(f"/proc/{pid}/maps") as fh:
            paths = {line.split(maxsplit=5)[-1].strip() for line in fh if _SHM_PREFIX in line}
    except OSError:
        return set()
    return {p for p in paths if _is_segment(p)}


def unlink_segments(paths: Iterable[str]) -> list[str]:
    """Remove these MPICH files (those already gone are skipped); returns those removed."""
    removed = []
    for path in paths:
        if not _is_segment(path):
            continue  # (never anything but MPICH's own files)
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    return removed


def note_shared_memory(comm: Any, errdir: str) -> None:
    """In every rank of an MPI worker, once MPI is initialised (a collective): the first rank
    on each node writes the MPICH files it has mapped, with the node's name, to ``errdir``."""
    try:
        from mpi4py import MPI  # (initialised already: the rank's main imported it)

        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        first = node.Get_rank() == 0
        node.Free()
        paths = mapped_segments() if first else set()
        if not paths:
            return
        path = os.path.join(errdir, f"shm-rank-{comm.Get_rank()}.txt")
        with open(path + ".tmp", "w") as fh:
            fh.write("\n".join([socket.gethostname(), *sorted(paths)]) + "\n")
        os.replace(path + ".tmp", path)
    except Exception:  # (a courtesy: never a reason for the call to fail)
        pass


def remove_shared_memory(errdir: str) -> list[str]:
    """Remove the MPICH files the ranks of a finished job noted on this machine (a job that
    ended normally removed them itself). Returns those removed."""
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(errdir)
                 if n.startswith("shm-rank-") and n.endswith(".txt")]
    except OSError:
        return removed
    here = socket.gethostname()
    for name in names:
        try:
            with open(os.path.join(errdir, name)) as fh:
                host, *paths = fh.read().split("\n")
        except OSError:
            continue
        if host == here:  # (another node's /dev/shm is not ours to reach)
            removed += unlink_segments(paths)
    return removed


def discard_worker_dir(errdir: str) -> None:
    """An MPI worker is gone: remove the files its ranks noted here, then its directory."""
    import shutil  # (here: the fork server keeps its imports few)

    remove_shared_memory(errdir)
    shutil.rmtree(errdir, ignore_errors=True)


def release_own() -> None:
    """Before this process leaves without MPI_Finalize: remove the MPICH files it has mapped
    (nothing to do unless a call initialised MPI here). Its mappings stay valid until it is
    gone; other ranks of its job have theirs."""
    if "mpi4py.MPI" in sys.modules:
        unlink_segments(mapped_segments())
