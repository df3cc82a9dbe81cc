"""Calls as batch jobs of a queue system, results through the cache directory.

The queue-system-neutral half of SlurmClusterExecutor and FluxClusterExecutor. Flow of one
call::

    submit() -> cache key -> hit? done.   queued/running job with that name? re-attach.
             -> <key>.in.pkl (the call) -> backend submits a job named <key> that runs
                ``python -m executorkit.worker.file_task <key>.in.pkl``, with an
                ``afterok`` dependency on the jobs of its input futures
    backend (Slurm: a monitor thread; Flux: job event watches) reports a job's end:
             entry <key>.h5 written by the job -> result or error
             no entry (time limit, cancel, node failure) -> clear error naming the state

A subclass says how jobs are submitted, found again, cancelled and watched (the hooks at
the end of :class:`BatchExecutor`); everything else (dependencies, duplicates, the cache,
failure propagation, shutdown) lives here once.

The driver can go away: ``shutdown(wait=False)`` (or a killed driver) leaves the jobs queued
or running, and the same script run again re-attaches to them by cache key instead of
submitting them again, and takes finished results from the cache.

The live ``status.json`` (:mod:`executorkit.executors._batch_status`) hears of each job when
it is queued, when the backend reports it running (:meth:`BatchExecutor._job_running`) and
when its future is done.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import CANCELLED
from typing import Any

import cloudpickle

from executorkit import graph
from executorkit._pickling import dumps_args
from executorkit._syspath import snapshot
from executorkit.cache._hook import _name
from executorkit.cache._keys import compute_key
from executorkit.command import Command, CommandCall, run_command
from executorkit.errors import (
    DependencyError,
    ExecutorkitError,
    RemoteError,
    RemoteTraceback,
    ResourceError,
    dependency_error,
    task_exception,
)
from executorkit.executors._base import _status_path
from executorkit.executors._batch_status import BatchStatus
from executorkit.executors._compat import ExecutorkitExecutor, check_function
from executorkit.resources import Capabilities, Resources, merge, parse
from executorkit.transport import Upstream


class JobFailedError(ExecutorkitError):
    """A batch job ended without recording a result (``state`` says how, e.g. TIMEOUT)."""

    def __init__(self, message: str, *, job_id: str, state: str):
        super().__init__(message)
        self.job_id = job_id
        self.state = state


class _CancelNotifies(Future):
    """A Future that nothing ever marks running: a successful ``cancel()`` also notifies
    its waiters, as an executor picking the work item would. Without that the stdlib's
    ``wait()`` and ``as_completed()`` never count the future as done (they only see
    CANCELLED_AND_NOTIFIED) and wait forever."""

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        # Once only, also when a done-callback of this cancel cancels it again (a proxy and
        # its job); the condition is reentrant and guards the state of this Future we own.
        with self._condition:
            if self._state == CANCELLED:
                self.set_running_or_notify_cancel()
        return True


class JobFuture(_CancelNotifies):
    """Future of one batch job; ``cancel()`` also cancels a running job."""

    _job: _Job | None = None

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        job = self._job
        if job is not None and job.job_id is not None:
            job.executor._cancel_jobs([job.job_id])
        return True


class _Job:
    __slots__ = ("executor", "future", "job_id", "key", "res", "upstream")

    def __init__(self, executor: BatchExecutor, key: str, res: Resources) -> None:
        self.executor = executor
        self.key = key
        self.res = res
        self.job_id: str | None = None
        self.future = JobFuture()
        self.future._job = self
        self.upstream: list[_Job] = []


# Accepted for executorlib compatibility: the queue system decides these for batch jobs.
ACCEPTED = frozenset({"max_cores", "hostname_localhost", "refresh_rate", "log_obj_size",
                      "restart_limit", "openmpi_oversubscribe", "pmi_mode", "max_gpus"})
UNSUPPORTED = {
    "block_allocation": "every call is its own batch job (use the job executor inside a job)",
    "init_function": "it needs block_allocation",
    "plot_dependency_graph": "use SingleNodeExecutor(plot_dependency_graph=True) for a dry run",
    "plot_dependency_graph_filename": "see plot_dependency_graph",
    "export_workflow_filename": "use SingleNodeExecutor for a dry run",
    "progress": "not available for batch jobs yet",
    "pysqa_config_directory": "executorkit submits jobs itself, without pysqa: give your own "
                              "job script as resource_dict['submission_template'] (Slurm) "
                              "and queue options as resource_dict['slurm_cmd_args']",
}
# Keys every batch executor refuses: retries run in the engine of the job executors.
BATCH_REFUSED = {
    "max_retries": "retries run in the engine of the job executors (use SlurmJobExecutor "
                   "or FluxJobExecutor inside an allocation)",
    "retry_escalation": "see max_retries",
    "retry_on": "see max_retries",
}


class BatchExecutor(ExecutorkitExecutor):
    """Base of the cluster executors; documented on SlurmClusterExecutor and
    FluxClusterExecutor. Subclasses set ``_caps`` and implement the hooks below."""

    _caps: Capabilities
    _accepted: frozenset[str] = ACCEPTED
    _unsupported: Mapping[str, str] = UNSUPPORTED

    def __init__(self, *, cache_directory: str | os.PathLike[str] | None,
                 resource_dict: Mapping[str, Any] | None, disable_dependencies: bool,
                 wait: bool, compatible: Mapping[str, Any],
                 status_file: str | os.PathLike[str] | bool | None = None) -> None:
        unknown = set(compatible) - self._accepted - set(self._unsupported)
        if unknown:
            raise TypeError(f"unexpected parameter(s) {sorted(unknown)}")
        for name, reason in self._unsupported.items():
            if compatible.get(name):
                raise ResourceError(f"{type(self).__name__} does not support {name}: {reason}",
                                    key=name, allowed="leave it unset")
        from executorkit.cache._access import remove_stale_temporaries
        from executorkit.cache._store import CacheStore

        self._dir = os.path.abspath(os.fspath(cache_directory or "executorkit_cache"))
        self._defaults = parse(resource_dict)
        self._store = CacheStore(self._dir)
        remove_stale_temporaries(self._dir)
        self._disable_dependencies = disable_dependencies
        self._wait_on_exit = wait
        self._pmi_mode: str | None = compatible.get("pmi_mode")
        self._lock = threading.Condition()
        self._active: dict[str, _Job] = {}  # job id -> job
        self._live: dict[str, _Job] = {}  # key -> its job in this session
        self._pending: set[Future] = set()  # calls waiting for other executors' futures
        self._shutdown = False
        path = _status_path(status_file, self._dir)
        self._status = None if path is None else BatchStatus(path, executor=type(self).__name__)

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
        res = self._check(merge(self._defaults, resource_dict))
        if res.cache_directory not in (None, self._dir):
            raise ResourceError(f"{type(self).__name__} keeps calls in its own cache_directory",
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
            return self._after_foreign(foreign, fn, args, kwargs, resource_dict)
        return self._submit_ready(fn, args, kwargs, res)

    def _check(self, res: Resources) -> Resources:
        """What this backend can grant (a subclass may check more than the pool size)."""
        return self._caps.check(res)

    def _after_foreign(self, foreign: list[Future], fn: Callable[..., Any],
                       args: tuple[Any, ...], kwargs: dict[str, Any],
                       resource_dict: Mapping[str, Any] | None) -> Future:
        proxy: Future = _CancelNotifies()
        with self._lock:
            self._pending.add(proxy)
        proxy.add_done_callback(self._pending.discard)

        def inputs_done() -> None:
            if proxy.cancelled():
                return  # cancelled while its inputs were running: never submitted
            try:
                inner = self.submit(fn, *args, resource_dict=resource_dict, **kwargs)
            except BaseException as exc:
                proxy.set_exception(exc)
            else:
                _chain(inner, proxy)
                # one call, one job: cancelling the proxy cancels the job it stands for
                proxy.add_done_callback(lambda p: p.cancelled() and inner.cancel())

        when_all_done(foreign, inputs_done)
        return proxy

    def _submit_ready(self, fn: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any], res: Resources) -> Future:
        for dep in graph.find_futures(args, kwargs):
            if not self._ours(dep) and (dep.cancelled() or dep.exception() is not None):
                return _failed(_dependency_error(fn, dep))
        # finished futures of other executors take part by value (key and input file)
        args, kwargs = graph.substitute_call(
            args, kwargs, lambda f: f if self._ours(f) else f.result())
        for dep in graph.find_futures(args, kwargs):
            if dep.done() and (dep.cancelled() or dep.exception() is not None):
                return _failed(_dependency_error(fn, dep))
        key = res.cache_key or compute_key(fn, args, kwargs, future_key=_job_key)
        with self._lock:
            twin = self._live.get(key)
        if twin is not None and not twin.future.done():
            same: Future = _CancelNotifies()  # the same call is already queued or running
            _chain(twin.future, same)
            return same
        job = _Job(self, key, res)
        hit, value = self._store.lookup(key)
        if hit:
            job.future.set_result(value)
            if self._status is not None:
                self._status.queued(job, fn, args)
            return job.future
        attached = self._attach(key)
        if attached is None:
            # A failed entry is a miss; remove it, or it would read as the new run's result.
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._store.path(key))
        job.upstream = [d._job for d in graph.find_futures(args, kwargs)  # type: ignore[attr-defined]
                        if self._ours(d) and not d.done()]
        if attached is None:
            self._write_call(job, fn, args, kwargs)
            job.job_id = self._submit_job(job, [u.job_id for u in job.upstream
                                                if u.job_id is not None])
        else:
            job.job_id = attached
        for up in job.upstream:
            up.future.add_done_callback(functools.partial(self._upstream_done, job))
        with self._lock:
            self._active[job.job_id] = job
            self._live[key] = job
            self._lock.notify_all()
        if self._status is not None:
            self._status.queued(job, fn, args)
        self._track(job)
        return job.future

    def _write_call(self, job: _Job, fn: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> None:
        """``<key>.in.pkl``: the call for worker/file_task.py, upstream futures as markers."""
        def marker(f: Future) -> Any:
            if self._ours(f):
                return Upstream(f._job.key)  # type: ignore[attr-defined]
            return f.result()  # a finished future of another executor

        m_args, m_kwargs = graph.substitute_call(args, kwargs, marker)
        spec = {"key": job.key, "cache_directory": self._dir, "cores": job.res.cores,
                "fn": cloudpickle.dumps(fn), "args": dumps_args(m_args, m_kwargs),
                "function_name": _name(fn), "resource_dict": job.res.as_dict(),
                "sys_path": snapshot()}  # (the job imports through the driver's path)
        if job.res.cwd:
            os.makedirs(job.res.cwd, exist_ok=True)  # queue systems do not create it
        path = self.input_file(job.key)
        os.makedirs(os.path.dirname(path), exist_ok=True)  # a cache_key "subdir/name"
        with open(path + ".tmp", "wb") as fh:
            pickle.dump(spec, fh)
        os.replace(path + ".tmp", path)

    def input_file(self, key: str) -> str:
        """The file holding call ``key`` for its batch job."""
        return os.path.join(self._dir, key + ".in.pkl")

    def log_file(self, key: str) -> str:
        """The output (stdout and stderr) of the batch job of call ``key``."""
        return os.path.join(self._dir, key + ".out")

    def _ours(self, fut: Future) -> bool:
        """A future of this executor (its result will be in this cache directory)."""
        job = getattr(fut, "_job", None)
        return isinstance(fut, JobFuture) and job is not None and job.executor is self

    # ----------------------------------------------------------------- completion
    def _entry_exists(self, job: _Job) -> bool:
        return os.path.exists(self._store.path(job.key))

    def _complete(self, job_id: str, job: _Job) -> None:
        """The job wrote its entry: its result or its error completes the future."""
        try:
            record = self._store.read(job.key)
        except Exception as exc:
            self._fail(job_id, job, exc)
            return
        self._job_running(job, started=record.started, host=record.hostname)  # as it ran
        if record.status != "done":
            self._fail(job_id, job, _stored_error(record))
            return
        try:
            value = pickle.loads(record.output)  # type: ignore[arg-type]
        except Exception as exc:
            self._fail(job_id, job, exc)
            return
        with contextlib.suppress(InvalidStateError):
            job.future.set_result(value)
        self._forget(job_id)

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
                self._cancel_jobs([job.job_id])
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
            waiting = self._not_started([j for j, _ in jobs])
            for job_id, job in jobs:
                if job_id in waiting:
                    job.future.cancel()
        if wait:
            for _, job in jobs:
                with contextlib.suppress(BaseException):
                    job.future.exception()
        if self._status is not None:
            self._status.close()
        self._stopped(wait)

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
        return {"backend": type(self).__name__, "cache_directory": self._dir,
                "resource_dict": self._defaults.as_dict(), "unfinished": len(self)}

    @property
    def max_workers(self) -> None:
        """None: the queue system decides how many jobs run at once."""
        return None

    @max_workers.setter
    def max_workers(self, value: int) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} cannot resize (max_workers={value!r}): every call is its "
            "own batch job and the queue system decides how many run at once")

    def batched(self, futures: Iterable[Future], n: int) -> list[Future]:
        from executorkit.streaming import batched

        return batched(list(futures), n)

    # ----------------------------------------------------------------- backend hooks
    def _submit_job(self, job: _Job, after_ok: list[str]) -> str:
        """Submit the job for ``job.key`` (its input file is written); return its id."""
        raise NotImplementedError

    def _attach(self, key: str) -> str | None:
        """Id of a queued or running job of this user for this key and cache directory."""
        raise NotImplementedError

    def _cancel_jobs(self, job_ids: list[str]) -> None:
        raise NotImplementedError

    def _track(self, job: _Job) -> None:
        """Start watching a submitted or re-attached job until it ends."""
        raise NotImplementedError

    def _not_started(self, job_ids: list[str]) -> set[str]:
        """The jobs among ``job_ids`` still waiting in the queue."""
        raise NotImplementedError

    def _stopped(self, wait: bool) -> None:
        """Called at the end of shutdown (release connections)."""

    def _job_running(self, job: _Job, *, started: float | None, host: str | None) -> None:
        """The backend reports that ``job`` runs (for the status file; repeats are fine)."""
        if self._status is not None:
            self._status.running(job, started=started, host=host)


def when_all_done(futures: list[Future], action: Callable[[], None]) -> None:
    """Call ``action()`` once, in the thread that completes the last of ``futures``."""
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        action()

    for fut in futures:
        fut.add_done_callback(one_done)


def _job_key(fut: Future) -> str:
    return fut._job.key  # type: ignore[attr-defined]  # only JobFutures remain here


def _failed(exc: BaseException) -> Future:
    fut: Future = Future()
    fut.set_exception(exc)
    return fut


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
    exc = task_exception(exc, getattr(record, "function_name", None) or "the call")
    if record.error_text:
        exc.__cause__ = RemoteTraceback(record.error_text)
    return exc


def keys_in(cache_directory: str | os.PathLike[str]) -> set[str]:
    """Cache keys of the calls a cluster executor submitted from ``cache_directory``
    (keys "subdir/name" live in sub-directories)."""
    directory = os.fspath(cache_directory)
    names = set()
    for folder, _, files in os.walk(directory):
        rel = os.path.relpath(folder, directory)
        for f in files:
            if f.endswith(".in.pkl"):
                names.add(f[:-7] if rel == "." else f"{rel}/{f[:-7]}")
    return names
