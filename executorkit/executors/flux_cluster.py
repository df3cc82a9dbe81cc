"""FluxClusterExecutor: every call a Flux batch job (a nested instance), results through
the cache directory.

The call's path is drawn in :mod:`executorkit.executors._batch`; this module adds Flux's
part: the jobspec (``flux batch`` semantics, job name = cache key, ``afterok``
dependencies) and the end of each job as an event of its eventlog, so no thread polls.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from executorkit.engine import THREAD_VARIABLES
from executorkit.errors import TaskTimeoutError
from executorkit.executors._batch import (
    ACCEPTED,
    BATCH_REFUSED,
    BatchExecutor,
    JobFailedError,
    _Job,
    keys_in,
    when_all_done,
)
from executorkit.launchers.flux_batch import (
    FluxBatchQueue,
    FluxUnavailableError,
    JobEnd,
    batch_jobspec,
    batch_script,
    check_shape,
    flux_command,
)
from executorkit.launchers.pythonpath import worker_environment
from executorkit.resources import Capabilities, Resources

log = logging.getLogger("executorkit")


class FluxClusterExecutor(BatchExecutor):
    """Submit each call as its own Flux batch job: a nested Flux instance over the call's
    resources (``flux batch`` semantics), from outside or inside an instance.

    ``flux_uri`` names the instance to submit to (default: ``$FLUX_URI`` inside an
    instance, else the system instance). ``exe.submit(fn, *args, resource_dict={...})``:
    ``cores`` ranks (run with ``flux run`` inside the job, MPI through Flux's PMI; the
    result is the list of per-rank values), each with ``threads_per_core`` cores
    (``OMP_NUM_THREADS`` and friends set) and ``gpus_per_core`` GPUs; ``num_nodes``,
    ``exclusive`` (needs ``num_nodes``), ``run_time_max`` -> the job's time limit
    (``TaskTimeoutError`` when reached), ``cwd``, ``env``. A request the instance can never
    grant is refused at ``submit`` with a ``ResourceError`` naming the key.

    ``cache_directory`` (default ``./executorkit_cache``) must be visible to the instance's
    nodes: calls, results and job logs (``<key>.out``) live there. Jobs are named by cache
    key. Futures passed as arguments become ``afterok`` dependencies, so a whole DAG is
    queued at once; an upstream failure fails its dependents (``DependencyError``).
    ``cancel()`` cancels the job, queued or running. A job that ends without a result fails
    its future as soon as Flux reports the end, with a ``JobFailedError`` carrying Flux's
    state (the exception type: ``cancel``, ``exec``, ``alloc``...) and the log path.
    ``shutdown(wait=False)`` (or a killed driver) leaves jobs in Flux; the same calls
    submitted again re-attach to them by cache key, so each runs once. Inside a job, the
    call can open ``FluxJobExecutor()``: its pool is the job's nested instance.
    ``status_file`` is as on SingleNodeExecutor (default ``<cache_directory>/status.json``,
    ``False``: none), kept from the jobs' eventlogs; its pool is what the unfinished calls
    ask for.
    """

    _accepted = ACCEPTED | {"flux_executor_nesting", "flux_log_files"}
    _unsupported = {
        **BatchExecutor._unsupported,
        "flux_executor": "FluxClusterExecutor connects by URI (pass flux_uri=...)",
    }
    _refused = {
        "priority": "Flux orders batch jobs itself",
        "error_log_file": "each job keeps its own log, <cache_directory>/<key>.out",
        "slurm_cmd_args": "it is for Slurm executors only",
        **BATCH_REFUSED,
    }

    def __init__(self, max_workers: int | None = None, *,
                 cache_directory: str | os.PathLike[str] | None = None,
                 resource_dict: Mapping[str, Any] | None = None,
                 disable_dependencies: bool = False, wait: bool = True,
                 status_file: str | os.PathLike[str] | bool | None = None,
                 flux_uri: str | None = None, **compatible: Any) -> None:
        super().__init__(cache_directory=cache_directory, resource_dict=resource_dict,
                         disable_dependencies=disable_dependencies, wait=wait,
                         status_file=status_file, compatible=compatible)
        self._queue = FluxBatchQueue(flux_uri)
        try:
            self._pool = self._queue.pool()
        except BaseException:
            self._queue.close()
            raise
        self._caps = Capabilities(
            "FluxClusterExecutor", max_cpus=self._pool.cores, max_gpus=self._pool.gpus,
            max_nodes=self._pool.nodes, unsupported=self._refused)
        self._flux = flux_command()
        self._running: dict[str, str] | None = None  # name -> job id, read once

    def _check(self, res: Resources) -> Resources:
        res = self._caps.check(res)
        check_shape(res, self._pool)
        return res

    # ----------------------------------------------------------------- backend hooks
    def _submit_job(self, job: _Job, after_ok: list[str]) -> str:
        res = job.res
        environment = worker_environment()  # the job imports what this driver imports
        environment.update(dict.fromkeys(THREAD_VARIABLES, str(res.threads_per_core)))
        environment.update(res.env)
        script = batch_script(res, input_file=self.input_file(job.key), flux=self._flux,
                              pmi_mode=self._pmi_mode)
        spec = batch_jobspec(res, key=job.key, script=script, cache_directory=self._dir,
                             environment=environment, after_ok=after_ok, flux=self._flux)
        return self._queue.submit(spec)

    def _attach(self, key: str) -> str | None:
        """Id of a pending or running job of this user named ``key`` that was submitted
        for this cache directory (left by an earlier driver)."""
        if self._running is None:
            self._running = self._queue.jobs_by_name()
        job_id = self._running.pop(key, None)
        if job_id is None or self._queue.cache_directory_of(job_id) != self._dir:
            return None
        return job_id

    def _cancel_jobs(self, job_ids: list[str]) -> None:
        try:
            self._queue.cancel(job_ids)
        except FluxUnavailableError as exc:  # cancel() keeps the stdlib's contract: no raise
            log.warning("could not cancel Flux job(s) %s: %s", ", ".join(job_ids), exc)

    def _not_started(self, job_ids: list[str]) -> set[str]:
        return {j for j in job_ids if not self._queue.started(j)}

    def _track(self, job: _Job) -> None:
        job_id = job.job_id
        assert job_id is not None
        self._queue.watch(job_id, lambda end: self._ended(job, end),
                          on_start=lambda t: self._job_running(job, started=t, host=None))

    def _stopped(self, wait: bool) -> None:
        with self._lock:
            idle = not self._active
        if wait or idle:
            self._queue.close()  # without wait, the watches go on for the running futures

    def _forget(self, job_id: str) -> None:
        super()._forget(job_id)
        with self._lock:
            last = self._shutdown and not self._active
        if last:
            self._queue.close()  # the last job after shutdown(wait=False) has ended

    # ----------------------------------------------------------------- job ends
    def _ended(self, job: _Job, end: JobEnd) -> None:
        """Flux says the job ended (reactor thread): its entry, or why there is none."""
        job_id = end.job_id
        if job.future.done():
            self._forget(job_id)
            return
        if self._entry_exists(job):
            self._complete(job_id, job)
            return
        waiting = [u for u in job.upstream if not u.future.done()]
        if end.state == "dependency" and waiting:
            # It waited on a run of an input that failed: perhaps one left by an earlier
            # driver, while this session runs that input again. This session's run decides.
            self._forget(job_id)
            self._resubmit_after(job, waiting)
            return
        message = (f"{end.describe()}; call {job.key} left no result; its log is "
                   f"{self.log_file(job.key)}")
        if end.state == "timeout":
            self._fail(job_id, job, TaskTimeoutError(f"{message} (run_time_max reached)"))
        else:
            self._fail(job_id, job, JobFailedError(message, job_id=job_id, state=end.state))


    def _resubmit_after(self, job: _Job, waiting: list[_Job]) -> None:
        """Submit ``job`` again once all of ``waiting`` succeeded (a failure among them
        fails it through ``_upstream_done`` instead)."""
        def inputs_done() -> None:
            if job.future.done() or any(u.future.cancelled() or u.future.exception()
                                        for u in waiting):
                return
            try:
                job.job_id = self._submit_job(job, [])
            except Exception as exc:
                job.future.set_exception(exc)
                return
            with self._lock:
                self._active[job.job_id] = job
            self._track(job)

        when_all_done([u.future for u in waiting], inputs_done)


def terminate_flux_jobs(cache_directory: str | os.PathLike[str],
                        flux_uri: str | None = None, only: str | None = None) -> int:
    """Cancel the pending or running Flux jobs of the calls kept in ``cache_directory``
    (named by cache key, submitted for this directory), or only the one of key ``only``;
    returns how many."""
    names = keys_in(cache_directory)
    if only is not None:
        names &= {only}
    if not names:
        return 0
    here = os.path.abspath(cache_directory)
    queue = FluxBatchQueue(flux_uri)
    try:
        ids = [job_id for name, job_id in queue.jobs_by_name().items()
               if name in names and queue.cache_directory_of(job_id) == here]
        queue.cancel(ids)
    finally:
        queue.close()
    return len(ids)

