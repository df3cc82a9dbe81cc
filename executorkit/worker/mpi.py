"""An MPI-parallel worker: ``mpiexec -n N python -m executorkit.worker.mpi BOOTFILE``.

Rank 0 talks to the driver like any worker; every call it receives is broadcast to all
ranks, each rank runs the function, and rank 0 returns the list of per-rank results in rank
order. The same program serves one call (per-task) or many (block allocation: the ranks
persist between calls).

No hang on partial failure: a rank whose call raises (or whose result cannot be pickled)
writes its error to ``<errdir>/task-<id>-rank-<r>.pkl`` and calls ``MPI_Abort``, which stops
every rank even if the others wait in a collective. The driver then reads that file and
fails the future with the rank's own traceback.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import sys
import time
from typing import Any

import cloudpickle

from executorkit.transport import ErrorInfo, Hello, InitFailed, RunTask, Stop, TaskDone, connect
from executorkit.worker import _call, loop
from executorkit.worker._shm import note_shared_memory, release_own


def error_file(errdir: str, task_id: int, rank: int) -> str:
    return os.path.join(errdir, f"task-{task_id}-rank-{rank}.pkl")


def _fail(comm: Any, errdir: str, task_id: int, info: ErrorInfo) -> None:
    where = f"[rank {comm.Get_rank()} of {comm.Get_size()}]"
    info.message = f"{where} {info.message}"
    info.traceback = f"{where}\n{info.traceback}"
    rank = comm.Get_rank()
    path = error_file(errdir, task_id, rank)
    with open(path + ".tmp", "wb") as fh:
        pickle.dump(info, fh)
    os.replace(path + ".tmp", path)
    _call._flush()
    release_own()  # (this node's files: the job ends without MPI_Finalize)
    comm.Abort(1)
    os._exit(1)  # Abort may return before the launcher kills us: never run on


def _run(comm: Any, msg: RunTask, errdir: str, init_values: Any) -> bytes:
    """This rank's share of one call: its pickled result, or abort the whole job."""
    try:
        fn, args, kwargs = _call.load_call(msg)
    except BaseException as exc:
        _fail(comm, errdir, msg.task_id, _call.error_info(exc, kind="serialization"))
    try:
        with _call._Setup(msg.setup):
            if init_values:
                kwargs = _call.inject(fn, args, kwargs, init_values)
            result = fn(*args, **kwargs)
    except BaseException as exc:
        _fail(comm, errdir, msg.task_id, _call.error_info(exc, skip_frames=1))
    finally:
        _call._flush()
    try:
        return cloudpickle.dumps(result)
    except BaseException as exc:
        info = _call.error_info(exc, kind="serialization")
        info.message = f"the result ({type(result).__qualname__}) cannot be pickled: {info.message}"
        _fail(comm, errdir, msg.task_id, info)
    raise AssertionError("unreachable")


def main(bootfile: str) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    boot = loop.read_boot(bootfile)
    errdir = boot["errdir"]
    note_shared_memory(comm, errdir)
    default_setup = boot.get("setup")
    chan = None
    if rank == 0:
        chan = connect(boot["address"], boot["secret"])
        loop.exit_without_driver(chan.sock)
    init_values = None
    if boot.get("init_payload") is not None:
        try:
            init_values = pickle.loads(boot["init_payload"])()
        except BaseException as exc:
            if chan is not None:
                chan.send(InitFailed(_call.error_info(exc)))
            comm.Abort(3)
    comm.barrier()  # every rank is initialised: now rank 0 says hello
    if chan is not None:
        with contextlib.suppress(OSError):
            os.remove(bootfile)  # every rank has read it; it holds the secret
        chan.send(Hello(boot["worker_id"], os.getpid(), socket.gethostname()))
    while True:
        msg: object = None
        if chan is not None:
            try:
                msg = chan.recv()
            except (EOFError, ConnectionError):
                msg = Stop()
        msg = comm.bcast(msg, root=0)
        if not isinstance(msg, RunTask):
            return 0
        if msg.setup is None:
            msg.setup = default_setup
        started = time.time()
        payload = _run(comm, msg, errdir, init_values)
        gathered = comm.gather(payload, root=0)
        if chan is not None:
            assert gathered is not None  # rank 0 receives the gather
            results = [pickle.loads(p) for p in gathered]
            done = TaskDone(msg.task_id, True, cloudpickle.dumps(results), started, time.time())
            _call._record(msg, done)
            chan.send(done)
        if not boot["persistent"]:
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
