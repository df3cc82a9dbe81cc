"""SingleNodeExecutor: every call in its own process on this machine."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from executorkit._pickling import driver_imports
from executorkit.engine import EngineConfig
from executorkit.errors import ResourceError
from executorkit.executors._base import BaseExecutor, PoolParams, gpu_pool, gpu_variable
from executorkit.launchers.local import (
    MPICH_LOOPBACK,
    LocalLauncher,
    find_mpiexec,
    mpi_flavor,
    mpiexec_command,
)
from executorkit.resources import Capabilities, Resources


class SingleNodeExecutor(BaseExecutor):
    """Run Python functions in parallel processes on this machine.

    ``with SingleNodeExecutor() as exe: fut = exe.submit(fn, x, resource_dict={...})``

    By default each call runs in its own process, forked from a warm fork server, pinned to
    the CPUs it was granted, with its own environment and working directory. With
    ``block_allocation=True`` calls run in persistent workers instead (faster for tiny
    calls; ``init_function`` state).

    Parameters (executorlib's names, so switching is a change of import):

    max_workers
        Per-task mode: the most calls running at once (and, without ``max_cores``, the pool
        size in CPUs). Block allocation: the number of persistent workers. Also a property
        that may be set while the executor runs: block allocation starts the new workers at
        once (each runs ``init_function``) or retires workers, which take no new calls and
        stop once the calls already sent to them are done (no call is lost or restarted).
        Per-task mode: as if created with the new value (with ``max_cores``, the most calls
        at once in that fixed pool; without, a pool of that many calls' CPUs; calls already
        running keep theirs). A size of 0, more than ``max_cores`` allows, or a pool a
        waiting call would not fit in is refused with ``ResourceError``.
    cache_directory
        Keep every result in a hash-keyed HDF5 cache there; a repeated call is answered
        from it without starting a process.
    max_cores
        CPUs in the pool. Default: the CPUs this process may run on (inside an executorkit
        task: what that task was granted).
    resource_dict
        Defaults for every call (keys: see ``executorkit.resources``). With block
        allocation it sizes each worker.
    max_gpus
        The GPU pool: a count or a list of ids. Default: the ids in ``CUDA_VISIBLE_DEVICES``
        (or the vendor's variable) if set, else none. Each call gets
        ``cores * gpus_per_core`` GPUs of its own through the vendor's visibility variable.
    block_allocation, init_function
        Persistent workers; ``init_function()`` runs once per worker and returns a dict
        whose entries are passed by name to functions that take a parameter of that name.
    restart_limit
        How often a crashed block-allocation worker is replaced before the executor gives
        up (per worker; workers stopped on purpose, by cancel or a time limit, don't count).
    disable_dependencies
        Make a Future argument an error instead of a dependency.
    wait
        Whether leaving the ``with`` block waits for running calls.
    progress
        Show a progress bar (tqdm): done, running, waiting and failed calls.
    status_file
        A live ``status.json`` (see ``executorkit status DIR``), replaced atomically at most
        about once a second while something changes: counts per state, each call's state,
        start time, host, resources and attempt, the pool's busy fraction. Default: in the
        ``cache_directory`` when there is one; a path (a file, or a directory to put
        ``status.json`` in) elsewhere; ``False``: none.
    log_obj_size
        Log the pickled size of every call and result (logger ``executorkit``, INFO).
    preload
        Modules the fork server imports before it forks workers, so no call pays for
        importing them. ``"auto"`` (the default): those the driver script itself imported,
        by the names in its namespace (``import numpy as np``, ``from mymod import
        simulate``), as workers forked from the driver would have them; the standard
        library, the script itself, notebook and test-runner machinery and ``mpi4py.MPI``
        are left out. A list of names (``["numpy", "scipy.linalg"]``) instead, or ``[]``
        for none. The modules a submitted function needs (its own module and the modules
        its code uses) are learned and imported there anyway after its first call. Modules
        are imported with the thread variables of a default call (``threads_per_core`` of
        the executor's ``resource_dict``); a call asking for other thread counts then starts
        in a fresh interpreter, so that libraries size their thread pools for it. numpy's
        global random state is drawn anew for every worker, as in a new process.
    plot_dependency_graph, plot_dependency_graph_filename, export_workflow_filename
        A dry run: nothing runs; at shutdown the graph of the submitted calls is drawn
        (inline in Jupyter, or a ``.png``/``.svg`` file) and/or written as Python Workflow
        Definition JSON (see ``executorkit.export``). As in executorlib, every future of a
        dry run is done at once with the result ``None`` (so are items taken from it with
        ``get_item_from_future``/``split_future``): ``.result()`` never waits.
    hostname_localhost, refresh_rate, openmpi_oversubscribe
        Accepted for compatibility. Local work always stays on this machine (a local socket,
        see docs/architecture.md "Transport"), nothing polls, and there is no MPI launch yet.

    Done-callbacks run on the executor's engine thread (the one that starts calls and
    completes futures): while one runs, nothing else happens, so keep them short; there,
    ``shutdown(wait=True)`` raises ``RuntimeError`` (it would wait for itself).

    Ctrl-C: leaving the ``with`` block by ``KeyboardInterrupt`` (or pressing Ctrl-C while
    ``shutdown`` waits) kills the running calls, cancels the rest and lets the interrupt
    through; ``terminate()`` does the same on demand. Workers import through the driver's
    ``sys.path`` as it is at submit (see ``executorkit.pickle_by_value`` for modules only
    the driver has).

    Cancelling: ``future.cancel()`` also works on a *running* call (its process is killed,
    its resources freed, and calls depending on it fail with ``DependencyError``); this is
    an intentional extension of the ``concurrent.futures`` contract.
    """

    _backend = "SingleNodeExecutor"

    def __init__(self, max_workers: int | None = None, *, preload: Iterable[str] | str = "auto",
                 **kwargs: Any) -> None:
        self._user_preload = _check_preload(preload)
        super().__init__(max_workers, **kwargs)

    def _engine_config(self, p: PoolParams) -> tuple[EngineConfig, Capabilities]:
        available = sorted(os.sched_getaffinity(0))
        granted = os.environ.get("EXECUTORKIT_CPUS")  # nested inside an executorkit task
        default_cores = int(granted) if granted and granted.isdigit() else len(available)
        gpus = gpu_pool(p.max_gpus)
        plan = self._plan_pool(
            max_workers=p.max_workers, max_cores=p.max_cores, default_cores=default_cores,
            gpus=len(gpus), unsupported={"slurm_cmd_args": "it is for Slurm executors only"})
        real = plan.pool <= len(available)
        cpus = tuple(available[:plan.pool]) if real else tuple(range(plan.pool))
        forward = sys.stdout is not sys.__stdout__ or sys.stderr is not sys.__stderr__
        config = EngineConfig(
            launcher=LocalLauncher(forward_output=forward, preload=self._preload(),
                                   mpiexec=self._mpiexec()),
            cpus=cpus, gpus=gpus, real_cpus=real, gpu_variable=gpu_variable(),
            max_running=plan.max_running, block_workers=plan.workers,
            worker_res=self._defaults, init_function=p.init_function,
            restart_limit=p.restart_limit, mpi_command=self._mpi_command(),
            preload=self._user_preload, local_socket=True,
        )
        return config, plan.caps

    def _pool_cpus(self, pool: int) -> tuple[tuple[int, ...], bool]:
        # As at creation: pinned to this process's CPUs while the pool fits on them (the
        # workers already running keep theirs: a pool is only ever extended at its end).
        available = sorted(os.sched_getaffinity(0))
        if pool <= len(available):
            return tuple(available[:pool]), True
        return tuple(range(pool)), False

    def _check_resources(self, res: Resources) -> Resources:
        if res.cores > 1 and self._mpi_command() is None:
            raise ResourceError(
                f"resource_dict['cores']={res.cores} runs the function on MPI ranks, which "
                f"needs mpi4py and an mpiexec (pip install mpi4py mpich)", key="cores",
                allowed="cores=1 without MPI")
        return res

    def _mpiexec(self) -> tuple[str, ...]:
        """mpiexec (and its flags) for programs run as MPI jobs; () if there is none."""
        mpiexec = find_mpiexec()
        if mpiexec is None:
            return ()
        flavor = mpi_flavor(mpiexec)
        if self._openmpi_oversubscribe and flavor == "openmpi":
            return (mpiexec, "--oversubscribe")
        return (mpiexec, *MPICH_LOOPBACK) if flavor == "mpich" else (mpiexec,)

    def _mpi_command(self) -> Callable[[int], tuple[str, ...]] | None:
        mpiexec = find_mpiexec()
        if mpiexec is None or importlib.util.find_spec("mpi4py") is None:
            return None
        flavor = mpi_flavor(mpiexec)
        oversubscribe = self._openmpi_oversubscribe
        return functools.partial(mpiexec_command, mpiexec=mpiexec, flavor=flavor,
                                 oversubscribe=oversubscribe)


def _check_preload(preload: Iterable[str] | str) -> tuple[str, ...]:
    if preload == "auto":
        return driver_imports()
    allowed = ("'auto' (the modules the driver script imported) or a list of importable "
               "module names, e.g. ['numpy', 'scipy.linalg']")
    if isinstance(preload, (str, bytes)) or not isinstance(preload, Iterable):
        raise ResourceError(f"preload must be 'auto' or a list of module names, got "
                            f"{preload!r}", key="preload", allowed=allowed)
    names = tuple(preload)
    for name in names:
        if not isinstance(name, str) or not name or name == "__main__":
            raise ResourceError(f"preload: {name!r} is not a module name the fork server "
                                f"can import", key="preload", allowed=allowed)
    return names
