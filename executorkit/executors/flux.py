"""Flux executors: FluxJobExecutor (jobs inside a Flux instance); FluxClusterExecutor
(batch jobs, in executors/flux_cluster.py) is re-exported here."""

from __future__ import annotations

import importlib.util
import os
import socket
from typing import Any

from executorkit.engine import EngineConfig
from executorkit.errors import ResourceError
from executorkit.executors._base import BaseExecutor, PoolParams
from executorkit.launchers.flux import (
    FluxLauncher,
    FluxUnavailableError,
    InstancePool,
    instance_pool,
    jobspec_for,
    open_handle,
    uri_of,
)
from executorkit.launchers.slurm import pool_of
from executorkit.resources import Capabilities, Resources

__all__ = ["FluxClusterExecutor", "FluxJobExecutor", "FluxUnavailableError"]


class FluxJobExecutor(BaseExecutor):
    """Run each call as a Flux job inside the current Flux instance.

    ``with FluxJobExecutor() as exe: exe.submit(fn, x, resource_dict={"cores": 2})`` in a
    script started by ``flux start``, ``flux alloc`` or ``flux batch``. The pool is the
    instance's resources (``flux resource list``: cores, nodes and GPUs up); calls start as
    jobs as soon as the cores they ask for are free, and Flux places them on its nodes.

    Each call's resource_dict becomes its jobspec: ``cores`` -> tasks (MPI ranks through
    Flux's PMI; the result is the list of per-rank results in rank order),
    ``threads_per_core`` -> cores per task, ``gpus_per_core`` -> GPUs per task (Flux sets
    ``CUDA_VISIBLE_DEVICES``), ``num_nodes`` and ``exclusive`` (whole nodes; without
    ``num_nodes`` as few as hold the call), ``run_time_max`` -> the job's duration (a few
    seconds over the limit; executorkit stops the call on time and fails it with
    ``TaskTimeoutError``), ``priority`` -> urgency (16 + priority, within Flux's range),
    ``cwd`` and ``env`` -> the job's working directory and environment. A job that Flux
    kills or that cannot start fails its future with a ``WorkerDiedError`` that quotes Flux's
    reason, the exit code or signal, the job id and the end of its stderr.

    Parameters as :class:`~executorkit.SingleNodeExecutor`, plus:

    flux_executor
        The instance to use: a ``flux.job.FluxExecutor`` (executorlib's parameter), a
        ``flux.Flux`` handle or a URI. Default: ``FLUX_URI``.
    flux_executor_nesting
        Run each call as the initial program of a nested Flux instance of the resources it
        asked for (one process, not MPI ranks), so a call can open a ``FluxJobExecutor`` of
        its own over exactly what it was granted.
    flux_log_files
        Keep each job's stdout and stderr as ``flux-JOBID.out``/``.err``: ``True`` puts them in
        the cache directory (else the current directory), a path puts them there. Otherwise a
        job's output is copied to the driver's stdout/stderr when the job ends.
    pmi_mode
        Flux's PMI for MPI calls (the ``pmi`` shell option, e.g. ``"simple"``, ``"pmix"``).
    hostname_localhost
        Workers connect to 127.0.0.1 (``True``) or to this host's name (``False``). Default:
        loopback on a one-node instance, the host name on more nodes.

    Per call, up to two one-core "warm" jobs are started ahead of demand; a plain call (one
    core, no priority, time limit, GPUs or node request) is handed to one, so it is still a
    Flux job of its own without waiting for the job to start. An idle warm job gives its
    core back after 2 s, and warm jobs are cancelled when a call Flux must place arrives.

    A :class:`~executorkit.Command` (per-call mode) is a Flux job of the program itself, no
    Python in between: ``cores`` tasks of it (an MPI program), its stdout/stderr written by
    the job shell into the call's cwd and read back by the driver into the
    ``CommandResult``.

    Block allocation runs each persistent worker as one long-running job sized by the
    executor-level resource_dict. ``cancel()`` of a running call cancels its job, which
    frees its resources.
    """

    _backend = "FluxJobExecutor"

    def __init__(self, max_workers: int | None = None, *, flux_executor: Any = None,
                 flux_executor_nesting: bool = False, flux_log_files: bool | str = False,
                 pmi_mode: str | None = None, **kwargs: Any) -> None:
        self._uri = uri_of(flux_executor)
        self._nesting = bool(flux_executor_nesting)
        self._log_files = flux_log_files
        if pmi_mode is not None and (not isinstance(pmi_mode, str) or not pmi_mode):
            raise ResourceError(f"pmi_mode must be a non-empty str or None, got {pmi_mode!r}",
                                key="pmi_mode", allowed="e.g. 'simple', 'pmix', or None")
        self._pmi_mode = pmi_mode
        self._pool: InstancePool | None = None
        super().__init__(max_workers, **kwargs)

    def _engine_config(self, p: PoolParams) -> tuple[EngineConfig, Capabilities]:
        handle = open_handle(self._uri)
        try:
            self._pool = pool = instance_pool(handle)
        finally:
            del handle
        cores = pool.cores
        granted = os.environ.get("EXECUTORKIT_CPUS", "")
        if "FLUX_JOB_ID" in os.environ and granted.isdigit():
            # a call of ours that opened an executor: its pool is what the call was granted
            cores = min(cores, int(granted))
        cores = pool_of(p.max_cores, cores)
        gpus = pool.gpus
        if p.max_gpus is not None:
            gpus = p.max_gpus if isinstance(p.max_gpus, int) else len(tuple(p.max_gpus))
        plan = self._plan_pool(
            max_workers=p.max_workers, max_cores=cores, default_cores=cores, gpus=gpus,
            unsupported={"slurm_cmd_args": "it is for Slurm executors only"},
            max_nodes=pool.nodes)
        local = (self._hostname_localhost if self._hostname_localhost is not None
                 else pool.nodes == 1)
        tmp = _private_base()
        # Per call: keep up to two one-core jobs started ahead of their calls (see the
        # class docstring), never more than the pool.
        warm = 0 if plan.workers else min(2, plan.pool)
        launcher = FluxLauncher(uri=self._uri, pool=pool, pmi_mode=self._pmi_mode,
                                nesting=self._nesting, log_dir=self._log_dir(), tmp_dir=tmp,
                                warm=warm)
        config = EngineConfig(
            launcher=launcher, cpus=tuple(range(plan.pool)), gpus=tuple(range(gpus)),
            real_cpus=False, max_running=plan.max_running, block_workers=plan.workers,
            worker_res=self._defaults, init_function=p.init_function,
            restart_limit=p.restart_limit, tmp_dir=tmp,
            bind_host="127.0.0.1" if local else "0.0.0.0",
            advertise_host="127.0.0.1" if local else socket.gethostname(),
        )
        return config, plan.caps

    def _log_dir(self) -> str | None:
        if not self._log_files:
            return None
        if isinstance(self._log_files, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(self._log_files))
        else:
            path = self._defaults.cache_directory or os.getcwd()
        os.makedirs(path, exist_ok=True)
        return path

    def _check_resources(self, res: Resources) -> Resources:
        pool = self._pool
        assert pool is not None
        if res.cores > 1 and not self._nesting and importlib.util.find_spec("mpi4py") is None:
            raise ResourceError(
                f"resource_dict['cores']={res.cores} runs the function on MPI ranks, which "
                f"needs mpi4py (pip install mpi4py mpich)", key="cores",
                allowed="cores=1 without mpi4py")
        if res.threads_per_core > pool.cores_per_node:
            raise ResourceError(
                f"resource_dict['threads_per_core']={res.threads_per_core} but the nodes of "
                f"this Flux instance have {pool.cores_per_node} cores (a rank's cores are on "
                f"one node)", key="threads_per_core", allowed=f"1..{pool.cores_per_node}")
        if res.num_nodes is not None and res.num_nodes > res.cores:
            raise ResourceError(
                f"resource_dict['num_nodes']={res.num_nodes} but the call has "
                f"cores={res.cores} ranks; Flux places at least one rank on each node",
                key="num_nodes", allowed=f"1..{res.cores} (at most cores)")
        try:  # anything else Flux's own jobspec rules refuse, refused now rather than later
            jobspec_for(res, ["true"], cwd="/", env={}, options={},
                        cores_per_node=pool.cores_per_node)
        except (ValueError, TypeError) as exc:
            raise ResourceError(f"Flux refuses this resource_dict: {exc}", key="resource_dict",
                                allowed="a request Flux's jobspec accepts") from exc
        return res


def _private_base() -> str:
    """Where boot files and MPI error reports go: visible from every node of the instance."""
    base = os.environ.get("EXECUTORKIT_TMPDIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "executorkit")
    os.makedirs(base, mode=0o700, exist_ok=True)
    return base


# FluxClusterExecutor lives in its own module (file-based batch jobs, shared with Slurm).
from executorkit.executors.flux_cluster import FluxClusterExecutor  # noqa: E402
