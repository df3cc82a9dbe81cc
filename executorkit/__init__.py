"""executorkit: concurrent.futures executors for laptops, Slurm and Flux.

Only public names live here. Each is imported on first use, so ``import executorkit`` stays
cheap and never loads h5py, pandas, mpi4py or flux.
"""

from __future__ import annotations

import importlib
from typing import Any

from executorkit._version import __version__

_PUBLIC = {
    "SingleNodeExecutor": "executorkit.executors.single",
    "SlurmJobExecutor": "executorkit.executors.slurm",
    "SlurmClusterExecutor": "executorkit.executors.slurm_cluster",
    "FluxJobExecutor": "executorkit.executors.flux",
    "FluxClusterExecutor": "executorkit.executors.flux",
    "get_cache_data": "executorkit.cache",
    "get_future_from_cache": "executorkit.cache",
    "clear_cache": "executorkit.cache",
    "terminate_tasks_in_cache": "executorkit.executors.terminate",
    "terminate_task_in_cache": "executorkit.executors.terminate",
    "get_item_from_future": "executorkit.streaming",
    "split_future": "executorkit.streaming",
    "as_completed": "executorkit.streaming",
    "batched": "executorkit.streaming",
    "Command": "executorkit.command",
    "CommandResult": "executorkit.command",
    "CommandError": "executorkit.command",
    "campaign_report": "executorkit._report",
    "pickle_by_value": "executorkit._pickling",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'executorkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
