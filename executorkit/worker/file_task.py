"""Run one call inside a batch job: ``python -m executorkit.worker.file_task INPUT``.

The input file (written by SlurmClusterExecutor next to the cache) holds the pickled call;
arguments that were futures of the same executor are :class:`Upstream` markers naming the
cache key of the task that produces them. Those results are read from the cache here, so
a whole DAG can be queued at once with Slurm ``afterok`` dependencies. The outcome (result
or error, with timing and host) is written as the call's cache entry, atomically.

With ``cores > 1`` the job script starts this program on every rank with ``srun``; each
rank runs the function and rank 0 records the list of results in rank order.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import socket
import sys
import time
from typing import Any

import cloudpickle

from executorkit import _syspath
from executorkit.errors import DependencyError
from executorkit.transport import Upstream
from executorkit.worker._call import error_info, unpickle
from executorkit.worker._shm import release_own


def _resolve(value: Any, store: Any) -> Any:
    if isinstance(value, Upstream):
        hit, result = store.lookup(value.key)
        if not hit:
            raise DependencyError(f"the result of upstream task {value.key} is not in the "
                                  f"cache (it failed or its entry was removed)")
        return result
    return value


def _substitute(obj: Any, store: Any) -> Any:
    """Replace Upstream markers anywhere in ``obj`` (same containers as the driver)."""
    if isinstance(obj, Upstream):
        return _resolve(obj, store)
    if isinstance(obj, (list, tuple, set, frozenset, dict)):
        items = obj.items() if isinstance(obj, dict) else None
        if items is not None:
            return type(obj)({k: _substitute(v, store) for k, v in items})
        rebuilt = [_substitute(v, store) for v in obj]
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*rebuilt)
        return type(obj)(rebuilt)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        clone = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(clone, f.name, _substitute(getattr(obj, f.name), store))
        return clone
    return obj


def _error_record(exc: BaseException) -> tuple[bytes | None, str]:
    info = error_info(exc)
    return info.exc, info.traceback


def main(path: str) -> int:
    from executorkit.cache._store import CacheRecord, CacheStore

    with open(path, "rb") as fh:
        spec = pickle.load(fh)
    if spec.get("sys_path"):
        _syspath.merge(spec["sys_path"])
    store = CacheStore(spec["cache_directory"])
    rank, size, comm = _mpi(spec["cores"])
    started = time.time()
    output = error = text = None
    raw_args: tuple[Any, ...] = ()
    raw_kwargs: dict[str, Any] = {}
    try:
        raw_args, raw_kwargs = unpickle(spec["args"])
        if size != spec["cores"]:
            raise RuntimeError(
                f"the call asked for {spec['cores']} MPI ranks but runs in a world of {size}: "
                f"srun did not start an MPI job (set pmi_mode to the cluster's PMI, e.g. "
                f"'pmi2' or 'pmix')")
        fn = unpickle(spec["fn"])
        args = tuple(_substitute(a, store) for a in raw_args)
        kwargs = {k: _substitute(v, store) for k, v in raw_kwargs.items()}
        result = fn(*args, **kwargs)
        if comm is not None:
            result = comm.gather(result, root=0)
        output = cloudpickle.dumps(result)
    except BaseException as exc:
        error, text = _error_record(exc)
        if size > 1:
            text = f"[rank {rank} of {size}]\n{text}"
    sys.stdout.flush()
    if rank != 0 and error is None:
        return 0
    record = CacheRecord(
        key=spec["key"], function_name=spec["function_name"], function=spec["fn"],
        args=cloudpickle.dumps(tuple(raw_args)), kwargs=cloudpickle.dumps(raw_kwargs),
        resource_dict=spec["resource_dict"],
        status="done" if error is None and text is None else "failed", output=output,
        error=error, error_text=text, started=started, finished=time.time(),
        hostname=socket.gethostname(), pid=os.getpid(),
    )
    store.write(record)
    if comm is not None and text is not None:
        release_own()  # (this node's MPICH files: the job ends without MPI_Finalize)
        comm.Abort(1)  # other ranks may wait in a collective: stop them
    return 0 if text is None else 1


def _mpi(cores: int) -> tuple[int, int, Any]:
    if cores <= 1:
        return 0, 1, None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm.Get_rank(), comm.Get_size(), comm


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
