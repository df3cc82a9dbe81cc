"""Slurm executors: SlurmJobExecutor (job steps inside an allocation, or one srun job
allocation per call outside of one)."""

from __future__ import annotations

import os
import socket
from typing import Any, NamedTuple

from executorkit.engine import EngineConfig
from executorkit.errors import ResourceError
from executorkit.executors._base import BaseExecutor, PoolParams
from executorkit.launchers.slurm import SrunLauncher, allocation, pool_of, smallest_node
from executorkit.resources import Capabilities


class SlurmJobExecutor(BaseExecutor):
    """Run each call with ``srun``: a job step inside the current allocation, or, outside
    of one, its own job allocation.

    Use it in a batch script or an ``salloc`` session: the pool is the allocation
    (``SLURM_JOB_CPUS_PER_NODE``, ``SLURM_JOB_NUM_NODES``, ``SLURM_GPUS_ON_NODE``), and calls
    run side by side as steps, started as soon as the CPUs they ask for are free. Every
    resource_dict key maps to ``srun``: ``cores`` -> ``--ntasks`` (MPI ranks, results in rank
    order), ``threads_per_core`` -> ``--cpus-per-task``, ``gpus_per_core`` ->
    ``--gpus-per-task``, ``num_nodes`` -> ``--nodes``, ``exclusive`` -> ``--exclusive``,
    ``run_time_max`` -> ``--time`` (and a precise timer of our own), ``cwd`` -> ``--chdir``,
    ``slurm_cmd_args`` are appended as they are. A :class:`~executorkit.Command` of
    ``cores=n > 1`` is itself the step (``srun --ntasks n ... program``), started and
    watched by a small worker beside the driver; with ``cores=1`` it runs in its worker's
    step. Steps use ``--exact`` so they share the allocation; on clusters where memory is a
    consumable resource, add e.g. ``"slurm_cmd_args": ["--mem-per-cpu=2G"]`` so steps do not
    each claim all memory.

    Parameters as :class:`~executorkit.SingleNodeExecutor`, plus ``pmi_mode`` (``srun
    --mpi``, e.g. ``"pmi2"`` or ``"pmix"``; default: the cluster's ``MpiDefault``).
    ``max_cores`` may shrink the pool below the allocation. Workers connect back to this
    host's name (``hostname_localhost=True``: to 127.0.0.1, enough for one node).

    Outside an allocation (``SLURM_JOB_ID`` not set, e.g. on a login node) each call, or
    each block-allocation worker, is an ``srun`` that makes its own job allocation, as in
    executorlib; ``max_cores`` or ``max_workers`` is then required and limits how many CPUs
    (calls, workers) are in use at once. The resource mapping, cancel, ``run_time_max`` and
    errors are the same; a call waits in Slurm's queue like any job, and ``--time`` (from
    ``run_time_max``, else the partition's default) limits its job.
    """

    _backend = "SlurmJobExecutor"

    def __init__(self, max_workers: int | None = None, *, pmi_mode: str | None = None,
                 **kwargs: Any) -> None:
        self._pmi_mode = pmi_mode
        super().__init__(max_workers, **kwargs)

    def _engine_config(self, p: PoolParams) -> tuple[EngineConfig, Capabilities]:
        where = (self._inside_allocation(p) if "SLURM_JOB_ID" in os.environ
                 else self._own_allocations(p))
        gpus = where.gpus
        if p.max_gpus is not None:
            gpus = p.max_gpus if isinstance(p.max_gpus, int) else len(tuple(p.max_gpus))
        plan = self._plan_pool(max_workers=p.max_workers, max_cores=where.limit,
                               default_cores=where.pool, gpus=gpus, unsupported={},
                               max_nodes=where.nodes)
        local = bool(self._hostname_localhost)
        launcher = SrunLauncher(pmi_mode=self._pmi_mode, cpus_per_node=where.per_node,
                                overlap=where.nested)
        config = EngineConfig(
            launcher=launcher, cpus=tuple(range(plan.pool)),
            gpus=tuple(range(gpus)), real_cpus=False, max_running=plan.max_running,
            block_workers=plan.workers, worker_res=self._defaults,
            init_function=p.init_function, restart_limit=p.restart_limit,
            # Steps (or jobs) may run on other nodes: listen on every interface (frames are
            # authenticated) and tell workers this host's name, which the nodes resolve.
            bind_host="127.0.0.1" if local else "0.0.0.0",
            advertise_host="127.0.0.1" if local else socket.gethostname(),
        )
        return config, plan.caps

    def _inside_allocation(self, p: PoolParams) -> _Where:
        cpus, nodes, gpus = allocation(os.environ)
        per_node = smallest_node(os.environ.get("SLURM_JOB_CPUS_PER_NODE")
                                 or os.environ.get("SLURM_CPUS_ON_NODE", "1"))
        # Inside a step of our own (a call that opened an executor), the pool is what that
        # call was granted, and steps overlap it instead of waiting for the outer step's CPUs.
        nested = bool("SLURM_STEP_ID" in os.environ and os.environ.get("EXECUTORKIT_CPUS"))
        if nested:
            cpus = per_node = int(os.environ["EXECUTORKIT_CPUS"])
        pool = pool_of(p.max_cores, cpus)
        return _Where(pool, pool, nodes, gpus, per_node, nested)

    def _own_allocations(self, p: PoolParams) -> _Where:
        """Outside an allocation every srun makes its own: the pool is the user's limit."""
        if p.max_cores is None and p.max_workers is None:
            raise ResourceError(
                "SlurmJobExecutor outside a Slurm allocation (SLURM_JOB_ID is not set) runs "
                "each call as its own srun job allocation and needs the pool size: pass "
                "max_cores=N (CPUs in use at once) or max_workers=N (calls, or block "
                "workers, at once); or run inside salloc/sbatch", key="max_cores",
                allowed="max_cores or max_workers, a positive int")
        pool = p.max_cores or p.max_workers * self._defaults.cpus  # type: ignore[operator]
        # Slurm places each job (a job spans at most one node per CPU it asks for); without
        # max_cores the pool follows max_workers, also when it is resized.
        return _Where(pool, p.max_cores, pool, 0, None, False)


class _Where(NamedTuple):
    """Where the calls of a SlurmJobExecutor run."""

    pool: int  # CPUs in use at once
    limit: int | None  # the most CPUs the pool may grow to (None: it follows max_workers)
    nodes: int
    gpus: int
    per_node: int | None  # CPUs of the smallest node, when known
    nested: bool  # inside a step of an outer executorkit call
