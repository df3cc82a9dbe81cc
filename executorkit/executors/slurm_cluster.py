"""SlurmClusterExecutor: every call an ``sbatch`` job, results through the cache directory.

The call's path is drawn in :mod:`executorkit.executors._batch`; this module adds Slurm's
part: the batch script and ``sbatch`` line, and a monitor thread that asks ``squeue`` about
all active jobs about once a second (Slurm cannot notify a client when a job ends).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from typing import Any

from executorkit.engine import THREAD_VARIABLES
from executorkit.errors import ResourceError, TaskTimeoutError
from executorkit.executors._batch import (
    BATCH_REFUSED,
    BatchExecutor,
    JobFailedError,
    _Job,
    keys_in,
)
from executorkit.launchers.pythonpath import worker_pythonpath
from executorkit.launchers.queue import TERMINAL, SlurmQueue, job_script, sbatch_command
from executorkit.resources import Capabilities, Resources

log = logging.getLogger("executorkit")
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SlurmClusterExecutor(BatchExecutor):
    """Submit each call as its own Slurm batch job (from a login node).

    ``exe.submit(fn, *args, resource_dict={...})``: ``cores`` -> ``--ntasks`` (MPI ranks via
    ``srun`` in the job), ``threads_per_core`` -> ``--cpus-per-task``, ``gpus_per_core`` ->
    ``--gpus-per-task``, ``num_nodes``, ``exclusive``, ``run_time_max`` -> ``--time``,
    ``cwd`` -> ``--chdir``; partition, account, memory and other scheduler options go in
    ``"slurm_cmd_args": ["--partition=debug", "--mem=4G"]``.

    ``cache_directory`` (default ``./executorkit_cache``) must be on a file system the
    compute nodes share: calls, results and job logs (``<key>.out``) live there. Futures
    passed as arguments become ``afterok`` job dependencies, so a whole DAG is queued at
    once; an upstream failure fails (and cancels) its dependents. ``cancel()`` runs
    ``scancel``. A job that ends without a result fails its future within about
    ``poll_interval`` seconds, naming Slurm's state. ``shutdown(wait=False)`` leaves jobs
    running; the same calls submitted again later re-attach to them by cache key.
    ``status_file`` is as on SingleNodeExecutor (default ``<cache_directory>/status.json``,
    ``False``: none), kept from the monitor's ``squeue`` (state, start and nodes of each
    job); its pool is what the unfinished calls ask for.
    """

    _caps = Capabilities(
        "SlurmClusterExecutor", max_cpus=1 << 30, max_gpus=1 << 30, max_nodes=1 << 30,
        batch_scripts=True,
        unsupported={
            "priority": "Slurm orders batch jobs itself (pass --nice or --priority in "
                        "slurm_cmd_args)",
            "error_log_file": "each job keeps its own log, <cache_directory>/<key>.out",
            **BATCH_REFUSED,
        })

    def __init__(self, max_workers: int | None = None, *,
                 cache_directory: str | os.PathLike[str] | None = None,
                 resource_dict: Mapping[str, Any] | None = None,
                 disable_dependencies: bool = False, wait: bool = True,
                 status_file: str | os.PathLike[str] | bool | None = None,
                 poll_interval: float = 1.0, **compatible: Any) -> None:
        super().__init__(cache_directory=cache_directory, resource_dict=resource_dict,
                         disable_dependencies=disable_dependencies, wait=wait,
                         status_file=status_file, compatible=compatible)
        self._queue = SlurmQueue()
        self._poll = poll_interval
        self._attached: dict[str, tuple[str, str, str, str]] | None = None
        self._grace: dict[str, float] = {}
        self._monitor: threading.Thread | None = None

    def _check(self, res: Resources) -> Resources:
        res = super()._check(res)
        # The batch script exports env with bash: a name bash cannot export would end the
        # script (or, unquoted, run as a command), far from the submit that caused it.
        bad = [name for name, _ in res.env if not _SHELL_NAME.fullmatch(name)]
        if bad:
            raise ResourceError(
                f"resource_dict['env'] name {bad[0]!r} cannot be exported by a batch script",
                key="env", allowed="names of letters, digits and '_', not starting with a digit")
        return res

    # ----------------------------------------------------------------- backend hooks
    def _submit_job(self, job: _Job, after_ok: list[str]) -> str:
        base = os.path.join(self._dir, job.key)
        env = [(k, str(job.res.threads_per_core)) for k in THREAD_VARIABLES]
        pythonpath = worker_pythonpath()  # the job imports what this driver imports
        if pythonpath:
            env.append(("PYTHONPATH", pythonpath))
        env += list(job.res.env)
        with open(base + ".sh", "w") as script:
            script.write(job_script(job.res, input_file=self.input_file(job.key), env=env,
                                    pmi_mode=self._pmi_mode, job_name=job.key))
        cmd = sbatch_command(job.res, job_name=job.key, script=base + ".sh",
                             output=self.log_file(job.key), after_ok=after_ok)
        return self._queue.submit(cmd)

    def _attach(self, key: str) -> str | None:
        """Job id of a queued or running job of this user for this key *and* this cache
        directory (its batch script is ours), left by an earlier driver."""
        if self._attached is None:
            self._attached = self._queue.jobs_by_name()
        found = self._attached.pop(key, None)
        if found is None:
            return None
        job_id, state, reason, script = found
        # COMPLETING: the script has ended and Slurm runs its epilog; it will write nothing
        # more. Attaching to it (a rerun right after the last, its cache emptied) would
        # wait for an entry that never comes.
        if state in TERMINAL or state == "COMPLETING" or \
                os.path.abspath(script) != os.path.join(self._dir, key + ".sh"):
            return None
        if state == "PENDING" and reason == "DependencyNeverSatisfied":
            self._queue.cancel([job_id])  # its inputs run again now: submit it afresh
            return None
        return job_id

    def _cancel_jobs(self, job_ids: list[str]) -> None:
        self._queue.cancel(job_ids)

    def _not_started(self, job_ids: list[str]) -> set[str]:
        return {j for j, state in self._queue.states(job_ids).items() if state == "PENDING"}

    def _track(self, job: _Job) -> None:
        with self._lock:
            if self._monitor is None or not self._monitor.is_alive():
                self._monitor = threading.Thread(target=self._watch, daemon=True,
                                                 name="executorkit-slurm-monitor")
                self._monitor.start()

    # ----------------------------------------------------------------- monitor
    def _watch(self) -> None:
        while True:
            with self._lock:
                while not self._active:
                    if self._shutdown:
                        return
                    self._lock.wait()
                jobs = dict(self._active)
            try:
                self._check_jobs(jobs)
            except Exception:  # never die silently: keep watching, say why
                log.exception("checking Slurm jobs failed")
            with self._lock:
                self._lock.wait(self._poll)

    def _check_jobs(self, jobs: dict[str, _Job]) -> None:
        for job_id, job in jobs.items():
            if job.future.done():
                self._forget(job_id)
            elif self._entry_exists(job):
                self._complete(job_id, job)
        left = {j: job for j, job in jobs.items() if not job.future.done()}
        if not left:
            return
        for job_id, seen in self._queue.jobs(left).items():
            job, state = left[job_id], seen.state
            if state == "RUNNING":
                self._job_running(job, started=seen.started, host=seen.nodes)
            if state == "UNKNOWN":
                continue  # Slurm could not tell: ask again next time
            if state == "COMPLETED" and self._completed_grace(job):
                continue  # the job wrote its entry; a shared file system may show it late
            if state == "DEPENDENCY_NEVER_SATISFIED":
                self._queue.cancel([job_id])
                state = "an upstream job failed"
            elif state not in TERMINAL and state != "GONE":
                continue
            if self._entry_exists(job):
                self._complete(job_id, job)  # the entry appeared after our first look
                continue
            message = (f"Slurm job {job_id} ({job.key}) ended {state} without a result; its "
                       f"log is {self.log_file(job.key)}")
            if state == "TIMEOUT":
                self._fail(job_id, job, TaskTimeoutError(
                    f"{message} (run_time_max / --time reached)"))
            else:
                self._fail(job_id, job, JobFailedError(message, job_id=job_id, state=state))

    def _completed_grace(self, job: _Job) -> bool:
        """A COMPLETED job without a visible entry: wait up to 30 s for it to appear."""
        first = self._grace.setdefault(job.key, time.monotonic())
        with contextlib.suppress(OSError):
            os.listdir(self._dir)  # revalidates cached directory attributes (NFS)
        return time.monotonic() - first < 30.0


def terminate_slurm_jobs(cache_directory: str | os.PathLike[str],
                         only: str | None = None) -> int:
    """Cancel the queued or running Slurm jobs of the calls kept in ``cache_directory``
    (named by cache key, running this directory's batch script), or only the one of key
    ``only``; returns how many."""
    names = keys_in(cache_directory)
    if only is not None:
        names &= {only}
    if not names:
        return 0
    queue = SlurmQueue()
    here = os.path.abspath(cache_directory)
    ids = [job_id for name, (job_id, state, _, script) in queue.jobs_by_name().items()
           if name in names and state not in TERMINAL
           and os.path.abspath(script) == os.path.join(here, name + ".sh")]
    queue.cancel(ids)
    return len(ids)
