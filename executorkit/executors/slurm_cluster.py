"""SlurmClusterExecutor: every call an ``sbatch`` job, results through the cache directory.

Flow of one call::

    submit() -> cache key -> hit? done.   queued/running job with that name? re-attach.
             -> input file + job script -> sbatch --dependency=afterok:<upstream jobs>
    monitor thread (about once a second, one squeue for all active jobs):
             entry <key>.h5 written by the job -> result or error
             job ended without an entry (time limit, node failure, scancel) -> clear error

The driver can go away: ``shutdown(wait=False)`` leaves the jobs queued or running, and the
same script run again re-attaches to them by cache key instead of submitting them again,
and takes finished results from the cache.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any

import cloudpickle

from executorkit import graph
from executorkit._pickling import dumps_args
from executorkit._syspath import snapshot
from executorkit.cache._hook import _name
from executorkit.cache._keys import compute_key
from executorkit.command import Command, CommandCall, run_command
from executorkit.engine import THREAD_VARIABLES
from executorkit.errors import (
    DependencyError,
    ExecutorkitError,
    RemoteError,
    RemoteTraceback,
    ResourceError,
    TaskTimeoutError,
    dependency_error,
)
from executorkit.executors._compat import ExecutorkitExecutor, check_function
from executorkit.launchers.queue import TERMINAL, SlurmQueue, job_script, sbatch_command
from executorkit.resources import Capabilities, Resources, merge, parse
from executorkit.transport import Upstream

log = logging.getLogger("executorkit")


class JobFailedError(ExecutorkitError):
    """A batch job ended without recording a result (``state`` says how, e.g. TIMEOUT)."""

    def __init__(self, message: str, *, job_id: str, state: str):
        super().__init__(message)
        self.job_id = job_id
        self.state = state


class JobFuture(Future):
    """Future of one batch job; ``cancel()`` also cancels a running job (``scancel``)."""

    _job: _Job | None = None

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        job = self._job
        if job is not None and job.job_id is not None:
            job.executor._queue.cancel([job.job_id])
        return True


class _Job:
    __slots__ = ("dependents", "executor", "future", "job_id", "key", "res")

    def __init__(self, executor: SlurmClusterExecutor, key: str, res: Resources) -> None:
        self.executor = executor
        self.key = key
        self.res = res
        self.job_id: str | None = None
        self.future = JobFuture()
        self.future._job = self
        self.dependents: list[_Job] = []


class SlurmClusterExecutor(ExecutorkitExecutor):
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
    """

    def __init__(self, max_workers: int | None = None, *,
                 cache_directory: str | os.PathLike[str] | None = None,
                 resource_dict: Mapping[str, Any] | None = None,
                 disable_dependencies: bool = False, wait: bool = True,
                 poll_interval: float = 1.0, **compatible: Any) -> None:
        unknown = set(compatible) - _ACCEPTED - set(_UNSUPPORTED)
        if unknown:
            raise TypeError(f"unexpected parameter(s) {sorted(unknown)}")
        for name, reason in _UNSUPPORTED.items():
            if compatible.get(name):
                raise ResourceError(f"SlurmClusterExecutor does not support {name}: {reason}",
                                    key=name, allowed="leave it unset")
        from executorkit.cache._access import remove_stale_temporaries
        from executorkit.cache._store import CacheStore

        self._dir = os.path.abspath(os.fspath(cache_directory or "executorkit_cache"))
        self._defaults = parse(resource_dict)
        self._store = CacheStore(self._dir)
        remove_stale_temporaries(self._dir)
        self._queue = SlurmQueue()
        self._disable_dependencies = disable_dependencies
        self._wait_on_exit = wait
        self._poll = poll_interval
        self._pmi_mode: str | None = compatible.get("pmi_mode")
        self._lock = threading.Condition()
        self._active: dict[str, _Job] = {}  # job id -> job
        self._pending: set[Future] = set()
        self._attached: dict[str, tuple[str, str, str, str]] | None = None
        self._grace: dict[str, float] = {}
        self._live: dict[str, _Job] = {}  # key -> its job in this session
        self._shutdown = False
        self._monitor: threading.Thread | None = None

    # ----------------------------------------------------------------- submit
    def submit(  # type: ignore[override]  # adds the resource_dict keyword
        self, fn: Callable[..., Any], /, *args: Any,
        resource_dict: Mapping[str, Any] | None = None, **kwargs: Any,
    ) -> Future:
        """Submit ``fn(*args, **kwargs)`` as a batch job; Futures in the arguments become
        ``afterok`` dependencies. ``resource_dict`` overrides the executor's defaults key by
        key. Raises ResourceError (a ValueError) for a bad or unsupported resource_dict."""
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, got {type(fn).__name__}")
        check_function(fn)
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        res = _CAPS.check(merge(self._defaults, resource_dict))
        if res.cache_directory not in (None, self._dir):
            raise ResourceError("SlurmClusterExecutor keeps calls in its own cache_directory",
                                key="cache_directory", allowed="the executor's directory")
        if isinstance(fn, Command):  # a program run: see executorkit.command
            if args or kwargs:
                raise TypeError("a Command takes no call arguments: put them in its argv")
            fn, args = run_command, (CommandCall(fn, res.env, res.cwd),)
        deps = graph.find_futures(args, kwargs)
        if deps and self._disable_dependencies:
            raise ValueError("a Future was passed as an argument but disable_dependencies=True")
        foreign = [d for d in deps if not self._ours(d) and not d.done()]
        if foreign:  # wait for futures of other executors, then submit with their values
            proxy: Future = Future()
            remaining = [len(foreign)]

            def input_done(_: Future) -> None:
                with self._lock:
                    remaining[0] -= 1
                    if remaining[0]:
                        return
                if proxy.cancelled():
                    return  # cancelled while its inputs were running: never submitted
                try:
                    inner = self.submit(fn, *args, resource_dict=resource_dict, **kwargs)
                except BaseException as exc:
                    proxy.set_exception(exc)
                else:
                    _chain(inner, proxy)

            for dep in foreign:
                dep.add_done_callback(input_done)
            return proxy
        return self._submit_ready(fn, args, kwargs, res)

    def _submit_ready(self, fn: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any], res: Resources) -> Future:
        for dep in graph.find_futures(args, kwargs):
            if not self._ours(dep) and (dep.cancelled() or dep.exception() is not None):
                failed_input: Future = Future()
                failed_input.set_exception(_dependency_error(fn, dep))
                return failed_input
        # finished futures of other executors take part by value (key and input file)
        args, kwargs = graph.substitute_call(
            args, kwargs, lambda f: f if self._ours(f) else f.result())
        for dep in graph.find_futures(args, kwargs):
            if dep.done() and (dep.cancelled() or dep.exception() is not None):
                failed: Future = Future()
                failed.set_exception(_dependency_error(fn, dep))
                return failed
        key = res.cache_key or compute_key(fn, args, kwargs, future_key=_job_key)
        with self._lock:
            twin = self._live.get(key)
        if twin is not None and not twin.future.done():
            same: Future = Future()  # the same call is already queued or running
            _chain(twin.future, same)
            return same
        job = _Job(self, key, res)
        hit, value = self._store.lookup(key)
        if hit:
            job.future.set_result(value)
            return job.future
        attached = self._attach(key)
        if attached is None:
            # A failed entry is a miss; remove it, or it would read as the new run's result.
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._store.path(key))
        upstream = [d._job for d in graph.find_futures(args, kwargs)  # type: ignore[attr-defined]
                    if self._ours(d) and not d.done()]
        if attached is None:
            self._submit_job(job, fn, args, kwargs, upstream)
        else:
            job.job_id = attached
        for up in upstream:
            up.future.add_done_callback(functools.partial(self._upstream_done, job))
        with self._lock:
            if job.job_id is not None:
                self._active[job.job_id] = job
                self._live[key] = job
            self._lock.notify_all()
        self._ensure_monitor()
        return job.future

    def _submit_job(self, job: _Job, fn: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any], upstream: list[_Job]) -> None:
        def marker(f: Future) -> Any:
            if self._ours(f):
                return Upstream(f._job.key)  # type: ignore[attr-defined]
            return f.result()  # a finished future of another executor

        m_args, m_kwargs = graph.substitute_call(args, kwargs, marker)
        spec = {"key": job.key, "cache_directory": self._dir, "cores": job.res.cores,
                "fn": cloudpickle.dumps(fn), "args": dumps_args(m_args, m_kwargs),
                "function_name": _name(fn), "resource_dict": job.res.as_dict(),
                "sys_path": snapshot()}
        base = os.path.join(self._dir, job.key)
        os.makedirs(os.path.dirname(base), exist_ok=True)  # a cache_key "subdir/name"
        if job.res.cwd:
            os.makedirs(job.res.cwd, exist_ok=True)  # sbatch --chdir does not create it
        with open(base + ".in.pkl.tmp", "wb") as fh:
            pickle.dump(spec, fh)
        os.replace(base + ".in.pkl.tmp", base + ".in.pkl")
        env = [(k, str(job.res.threads_per_core)) for k in THREAD_VARIABLES]
        env += list(job.res.env)
        with open(base + ".sh", "w") as script:
            script.write(job_script(job.res, input_file=base + ".in.pkl", env=env,
                                    pmi_mode=self._pmi_mode, job_name=job.key))
        after = [u.job_id for u in upstream if u.job_id is not None]
        cmd = sbatch_command(job.res, job_name=job.key, script=base + ".sh",
                             output=base + ".out", after_ok=after)
        job.job_id = self._queue.submit(cmd)

    def _ours(self, fut: Future) -> bool:
        """A future of this executor (its result will be in this cache directory)."""
        job = getattr(fut, "_job", None)
        return isinstance(fut, JobFuture) and job is not None and job.executor is self

    def _attach(self, key: str) -> str | None:
        """Job id of a queued or running job of this user for this key *and* this cache
        directory (its batch script is ours), left by an earlier driver."""
        if self._attached is None:
            self._attached = self._queue.jobs_by_name()
        found = self._attached.pop(key, None)
        if found is None:
            return None
        job_id, state, reason, script = found
        if state in TERMINAL or os.path.abspath(script) != os.path.join(self._dir, key + ".sh"):
            return None
        if state == "PENDING" and reason == "DependencyNeverSatisfied":
            self._queue.cancel([job_id])  # its inputs run again now: submit it afresh
            return None
        return job_id

    # ----------------------------------------------------------------- monitor
    def _ensure_monitor(self) -> None:
        with self._lock:
            if self._monitor is None or not self._monitor.is_alive():
                self._monitor = threading.Thread(target=self._watch, daemon=True,
                                                 name="executorkit-slurm-monitor")
                self._monitor.start()

    def _watch(self) -> None:
        while True:
            with self._lock:
                while not self._active:
                    if self._shutdown:
                        return
                    self._lock.wait()
                jobs = dict(self._active)
            try:
                self._check(jobs)
            except Exception:  # never die silently: keep watching, say why
                log.exception("checking Slurm jobs failed")
            with self._lock:
                self._lock.wait(self._poll)

    def _check(self, jobs: dict[str, _Job]) -> None:
        for job_id, job in jobs.items():
            if job.future.done():
                self._forget(job_id)
            elif os.path.exists(self._store.path(job.key)):
                self._complete(job_id, job)
        left = {j: job for j, job in jobs.items() if not job.future.done()}
        if not left:
            return
        for job_id, state in self._queue.states(left).items():
            job = left[job_id]
            if state == "UNKNOWN":
                continue  # Slurm could not tell: ask again next time
            if state == "COMPLETED" and self._completed_grace(job):
                continue  # the job wrote its entry; a shared file system may show it late
            if state == "DEPENDENCY_NEVER_SATISFIED":
                self._queue.cancel([job_id])
                state = "an upstream job failed"
            elif state not in TERMINAL and state != "GONE":
                continue
            if os.path.exists(self._store.path(job.key)):
                self._complete(job_id, job)  # the entry appeared after our first look
                continue
            log_file = os.path.join(self._dir, f"{job.key}.out")
            message = (f"Slurm job {job_id} ({job.key}) ended {state} without a result; its "
                       f"log is {log_file}")
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

    def _complete(self, job_id: str, job: _Job) -> None:
        try:
            record = self._store.read(job.key)
        except Exception as exc:
            self._fail(job_id, job, exc)
            return
        if record.status == "done":
            try:
                value = pickle.loads(record.output)  # type: ignore[arg-type]
            except Exception as exc:
                self._fail(job_id, job, exc)
                return
            with contextlib.suppress(InvalidStateError):
                job.future.set_result(value)
            self._forget(job_id)
        else:
            self._fail(job_id, job, _stored_error(record))

    def _fail(self, job_id: str, job: _Job, exc: BaseException) -> None:
        with contextlib.suppress(InvalidStateError):
            job.future.set_exception(exc)
        self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._active.pop(job_id, None)
            self._lock.notify_all()

    def _upstream_done(self, job: _Job, upstream: Future) -> None:
        if upstream.cancelled() or upstream.exception() is not None:
            if job.job_id is not None:
                self._queue.cancel([job.job_id])
            with contextlib.suppress(InvalidStateError):
                job.future.set_exception(_dependency_error(None, upstream))
            if job.job_id is not None:
                self._forget(job.job_id)

    # ----------------------------------------------------------------- lifecycle
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            jobs = list(self._active.items())
            self._lock.notify_all()
        if cancel_futures:
            states = self._queue.states([j for j, _ in jobs])
            for job_id, job in jobs:
                if states.get(job_id) == "PENDING":
                    job.future.cancel()
        if wait:
            for _, job in jobs:
                with contextlib.suppress(BaseException):
                    job.future.exception()

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=self._wait_on_exit)

    def __len__(self) -> int:
        """Calls submitted and not finished yet."""
        with self._lock:
            return sum(not job.future.done() for job in self._live.values()) + \
                sum(not f.done() for f in self._pending)

    @property
    def info(self) -> dict[str, Any]:
        """Settings and counts: ``backend``, ``cache_directory``, ``resource_dict`` (the
        defaults), ``unfinished`` (as ``len(exe)``)."""
        return {"backend": "SlurmClusterExecutor", "cache_directory": self._dir,
                "resource_dict": self._defaults.as_dict(), "unfinished": len(self)}

    @property
    def max_workers(self) -> None:
        """None: Slurm decides how many jobs run at once."""
        return None

    def batched(self, futures: Iterable[Future], n: int) -> list[Future]:
        from executorkit.streaming import batched

        return batched(list(futures), n)


def _job_key(fut: Future) -> str:
    return fut._job.key  # type: ignore[attr-defined]  # only JobFutures remain here


def _chain(source: Future, target: Future) -> None:
    def copy(f: Future) -> None:
        with contextlib.suppress(InvalidStateError):  # the caller cancelled the target
            if f.cancelled():
                target.cancel()
            elif f.exception() is not None:
                target.set_exception(f.exception())
            else:
                target.set_result(f.result())

    source.add_done_callback(copy)


def _dependency_error(fn: Any, upstream: Future) -> DependencyError:
    cause: BaseException = (CancelledError("input future was cancelled") if upstream.cancelled()
                            else upstream.exception())  # type: ignore[assignment]
    name = getattr(fn, "__qualname__", "the call") if fn is not None else "the call"
    job = getattr(upstream, "_job", None)
    label = f"job {job.key}" if job is not None else "future"
    return dependency_error(name, label, cause, future=upstream)


def _stored_error(record: Any) -> BaseException:
    exc: BaseException | None = None
    if record.error is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(record.error)
    if exc is None:
        lines = (record.error_text or "").strip().splitlines()
        exc = RemoteError("error", lines[-1] if lines else "the job failed")
    if record.error_text:
        exc.__cause__ = RemoteTraceback(record.error_text)
    return exc


# Slurm grants batch jobs; what it cannot honour for one is refused at submit.
_CAPS = Capabilities(
    "SlurmClusterExecutor", max_cpus=1 << 30, max_gpus=1 << 30, max_nodes=1 << 30,
    batch_scripts=True,
    unsupported={
        "priority": "Slurm orders batch jobs itself (pass --nice or --priority in "
                    "slurm_cmd_args)",
        "error_log_file": "each job keeps its own log, <cache_directory>/<key>.out",
        "max_retries": "retries run in the engine of the job executors (use "
                       "SlurmJobExecutor inside an allocation)",
        "retry_escalation": "see max_retries",
        "retry_on": "see max_retries",
    })

# accepted for executorlib compatibility; Slurm decides these for batch jobs
_ACCEPTED = {"max_cores", "hostname_localhost", "refresh_rate", "log_obj_size",
             "restart_limit", "openmpi_oversubscribe", "pmi_mode", "max_gpus"}
_UNSUPPORTED = {
    "block_allocation": "every call is its own batch job (use SlurmJobExecutor inside a job)",
    "init_function": "it needs block_allocation",
    "plot_dependency_graph": "use SingleNodeExecutor(plot_dependency_graph=True) for a dry run",
    "plot_dependency_graph_filename": "see plot_dependency_graph",
    "export_workflow_filename": "use SingleNodeExecutor for a dry run",
    "progress": "not available for batch jobs yet",
    "pysqa_config_directory": "executorkit runs sbatch itself, without pysqa: give your own "
                              "job script as resource_dict['submission_template'] and queue "
                              "options as resource_dict['slurm_cmd_args']",
}


def terminate_tasks_in_cache(cache_directory: str | os.PathLike[str],
                             pysqa_config_directory: str | None = None,
                             backend: str | None = None) -> int:
    """Cancel the queued or running Slurm jobs of the calls kept in ``cache_directory``
    (jobs are named by cache key). Returns how many jobs were cancelled.

    ``pysqa_config_directory`` and ``backend`` are executorlib's parameters: the first is
    accepted and unused (executorkit talks to Slurm directly), ``backend`` may be None or
    ``"slurm"``."""
    return _terminate(cache_directory, None, backend)


def terminate_task_in_cache(cache_directory: str | os.PathLike[str], cache_key: str,
                            pysqa_config_directory: str | None = None,
                            backend: str | None = None) -> int:
    """Cancel the queued or running Slurm job of the call ``cache_key`` in
    ``cache_directory``; returns 1 if a job was cancelled, else 0. Parameters as
    :func:`terminate_tasks_in_cache`."""
    from executorkit.cache._store import entry_path

    entry_path(cache_directory, cache_key)  # refuses a malformed key
    return _terminate(cache_directory, cache_key, backend)


def _terminate(cache_directory: str | os.PathLike[str], only: str | None,
               backend: str | None) -> int:
    if backend not in (None, "slurm"):
        raise ResourceError(f"backend={backend!r} is not supported here", key="backend",
                            allowed="None or 'slurm'")
    directory = os.fspath(cache_directory)
    names = set()
    for folder, _, files in os.walk(directory):  # keys "subdir/name" live in sub-directories
        rel = os.path.relpath(folder, directory)
        for f in files:
            if f.endswith(".sh"):
                names.add(f[:-3] if rel == "." else f"{rel}/{f[:-3]}")
    if only is not None:
        names &= {only}
    if not names:
        return 0
    queue = SlurmQueue()
    jobs = queue.jobs_by_name()
    here = os.path.abspath(directory)
    ids = [job_id for name, (job_id, state, _, script) in jobs.items()
           if name in names and state not in TERMINAL
           and os.path.abspath(script) == os.path.join(here, name + ".sh")]
    queue.cancel(ids)
    return len(ids)
