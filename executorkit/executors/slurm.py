"""Slurm executors: SlurmJobExecutor (job steps inside an allocation)."""

from __future__ import annotations

import os
import socket
from typing import Any

from executorkit.engine import EngineConfig
from executorkit.executors._base import BaseExecutor, PoolParams
from executorkit.launchers.slurm import SrunLauncher, allocation, pool_of, smallest_node
from executorkit.resources import Capabilities


class SlurmJobExecutor(BaseExecutor):
    """Run each call as a Slurm job step (``srun``) inside the current allocation.

    Use it in a batch script or an ``salloc`` session: the pool is the allocation
    (``SLURM_JOB_CPUS_PER_NODE``, ``SLURM_JOB_NUM_NODES``, ``SLURM_GPUS_ON_NODE``), and calls
    run side by side as steps, started as soon as the CPUs they ask for are free. Every
    resource_dict key maps to ``srun``: ``cores`` -> ``--ntasks`` (MPI ranks, results in rank
    order), ``threads_per_core`` -> ``--cpus-per-task``, ``gpus_per_core`` ->
    ``--gpus-per-task``, ``num_nodes`` -> ``--nodes``, ``exclusive`` -> ``--exclusive``,
    ``run_time_max`` -> ``--time`` (and a precise timer of our own), ``cwd`` -> ``--chdir``,
    ``slurm_cmd_args`` are appended as they are. Steps use ``--exact`` so they share the
    allocation; on clusters where memory is a consumable resource, add e.g.
    ``"slurm_cmd_args": ["--mem-per-cpu=2G"]`` so steps do not each claim all memory.

    Parameters as :class:`~executorkit.SingleNodeExecutor`, plus ``pmi_mode`` (``srun
    --mpi``, e.g. ``"pmi2"`` or ``"pmix"``; default: the cluster's ``MpiDefault``).
    ``max_cores`` may shrink the pool below the allocation. Workers connect back to this
    host's name (``hostname_localhost=True``: to 127.0.0.1, enough for one node).
    """

    _backend = "SlurmJobExecutor"

    def __init__(self, max_workers: int | None = None, *, pmi_mode: str | None = None,
                 **kwargs: Any) -> None:
        self._pmi_mode = pmi_mode
        super().__init__(max_workers, **kwargs)

    def _engine_config(self, p: PoolParams) -> tuple[EngineConfig, Capabilities]:
        cpus, nodes, gpus = allocation(os.environ)
        per_node = smallest_node(os.environ.get("SLURM_JOB_CPUS_PER_NODE")
                                 or os.environ.get("SLURM_CPUS_ON_NODE", "1"))
        # Inside a step of our own (a call that opened an executor), the pool is what that
        # call was granted, and steps overlap it instead of waiting for the outer step's CPUs.
        nested = "SLURM_STEP_ID" in os.environ and os.environ.get("EXECUTORKIT_CPUS", "")
        if nested:
            cpus = per_node = int(os.environ["EXECUTORKIT_CPUS"])
        pool = pool_of(p.max_cores, cpus)
        if p.max_gpus is not None:
            gpus = p.max_gpus if isinstance(p.max_gpus, int) else len(tuple(p.max_gpus))
        plan = self._plan_pool(max_workers=p.max_workers, max_cores=pool, default_cores=pool,
                               gpus=gpus, unsupported={}, max_nodes=nodes)
        local = bool(self._hostname_localhost)
        launcher = SrunLauncher(pmi_mode=self._pmi_mode, cpus_per_node=per_node,
                                overlap=bool(nested))
        config = EngineConfig(
            launcher=launcher, cpus=tuple(range(plan.pool)),
            gpus=tuple(range(gpus)), real_cpus=False, max_running=plan.max_running,
            block_workers=plan.workers, worker_res=self._defaults,
            init_function=p.init_function, restart_limit=p.restart_limit,
            # Steps may run on other nodes: listen on every interface (frames are
            # authenticated) and tell workers this host's name, which the nodes resolve.
            bind_host="127.0.0.1" if local else "0.0.0.0",
            advertise_host="127.0.0.1" if local else socket.gethostname(),
        )
        return config, plan.caps


