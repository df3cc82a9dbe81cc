"""``terminate_tasks_in_cache`` and ``terminate_task_in_cache``: cancel the cluster jobs of
a cache directory, on every queue system that is reachable here."""

from __future__ import annotations

import os
import shutil

from executorkit.errors import ResourceError

_BACKENDS = ("slurm", "flux")


def terminate_tasks_in_cache(cache_directory: str | os.PathLike[str],
                             pysqa_config_directory: str | None = None,
                             backend: str | None = None, *,
                             flux_uri: str | None = None) -> int:
    """Cancel the queued or running batch jobs of the calls kept in ``cache_directory``
    (SlurmClusterExecutor and FluxClusterExecutor name jobs by cache key and tie them to
    the directory); returns how many jobs were cancelled.

    ``backend`` limits it to ``"slurm"`` or ``"flux"``; by default every queue system that
    is reachable is asked (Slurm: ``squeue`` on PATH; Flux: its bindings import and a
    broker answers at ``flux_uri``, ``$FLUX_URI`` or the system instance).
    ``pysqa_config_directory`` is executorlib's parameter, accepted and unused (executorkit
    talks to the queue systems directly)."""
    return _terminate(cache_directory, None, backend, flux_uri)


def terminate_task_in_cache(cache_directory: str | os.PathLike[str], cache_key: str,
                            pysqa_config_directory: str | None = None,
                            backend: str | None = None, *,
                            flux_uri: str | None = None) -> int:
    """Cancel the queued or running job of the call ``cache_key`` in ``cache_directory``;
    returns 1 if a job was cancelled, else 0. Parameters as
    :func:`terminate_tasks_in_cache`."""
    from executorkit.cache._store import entry_path

    entry_path(cache_directory, cache_key)  # refuses a malformed key
    return _terminate(cache_directory, cache_key, backend, flux_uri)


def _terminate(cache_directory: str | os.PathLike[str], only: str | None,
               backend: str | None, flux_uri: str | None) -> int:
    if backend not in (None, *_BACKENDS):
        raise ResourceError(f"backend={backend!r} is not a queue system executorkit knows",
                            key="backend", allowed="'slurm', 'flux' or None (all reachable)")
    cancelled = 0
    if backend == "slurm" or (backend is None and shutil.which("squeue")):
        from executorkit.executors.slurm_cluster import terminate_slurm_jobs

        cancelled += terminate_slurm_jobs(cache_directory, only)
    if backend == "flux" or (backend is None and _flux_reachable(flux_uri)):
        from executorkit.executors.flux_cluster import terminate_flux_jobs

        cancelled += terminate_flux_jobs(cache_directory, flux_uri, only)
    return cancelled


def _flux_reachable(uri: str | None) -> bool:
    from executorkit.launchers.flux_batch import FluxUnavailableError, import_flux

    try:
        flux = import_flux()
        handle = flux.Flux(uri) if uri else flux.Flux()
    except (FluxUnavailableError, OSError):
        return False
    handle.close()  # only asked whether a broker answers: do not keep the connection
    return True
