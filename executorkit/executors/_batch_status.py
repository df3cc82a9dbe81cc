"""The live ``status.json`` of a batch executor: the engine's StatusWriter, fed by job events.

The file is the one the engine-based executors keep (format in
:mod:`executorkit.engine._status`); only its inputs differ. A call is listed once its job is
submitted (or re-attached, or answered from the cache); it is "running" from the moment the
backend says so (Slurm: the monitor's ``squeue``, which also gives the start time and the
nodes; Flux: the job's ``start`` event, whose host this driver never learns, so it stays
null) and finished when its future is. Nothing here asks the queue system anything.

Job events arrive on any thread (submit, the Slurm monitor, the Flux reactor, done-callbacks),
so one lock guards the writer; its deferred write runs on a :class:`threading.Timer`, at most
one pending at a time and none while nothing changes. The pool of a batch executor is what
its unfinished calls ask for (``asked=True``): ``busy_now`` is the share of those CPUs the
queue system is running, ``busy_fraction`` the same over time (1.0: no job ever waited).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from executorkit import command
from executorkit.engine._records import FINISHED, QUEUED, RUNNING
from executorkit.engine._status import StatusWriter
from executorkit.resources import Resources


class _BatchCall:
    """One call as the status writer reads an engine task: ``id``, ``res``, ``state``,
    ``started``, ``worker.host``, ``failures``, ``name()`` and ``outcome()``."""

    __slots__ = ("failures", "future", "host", "id", "job_id", "key", "label", "res", "started",
                 "state")
    fn = args = None  # the name is known at once (the writer looks at these for programs)

    def __init__(self, call_id: int, job: Any, label: str) -> None:
        self.id = call_id
        self.key: str = job.key
        self.job_id: str | None = job.job_id
        self.res: Resources = job.res
        self.future: Future = job.future
        self.label = label
        self.state = QUEUED
        self.started: float | None = None
        self.host: str | None = None
        self.failures: tuple[BaseException, ...] | None = None

    @property
    def worker(self) -> _BatchCall:
        return self  # where the writer looks for the host of a running call

    def name(self) -> str:
        return self.label

    def outcome(self) -> tuple[str, BaseException | None]:
        fut = self.future
        if fut.cancelled():
            return "cancelled", None
        exc = fut.exception(timeout=0)
        return ("failed" if exc is not None else "done"), exc


class _Writer(StatusWriter):
    def _record(self, task: Any, finished: float | None) -> dict[str, Any]:
        record = super()._record(task, finished)
        record["key"] = task.key  # the cache key names the job and its files
        record["job_id"] = task.job_id
        return record


class BatchStatus:
    """``status.json`` of one batch executor; every method may be called from any thread."""

    def __init__(self, path: str, *, executor: str) -> None:
        self._lock = threading.Lock()
        self._writer = _Writer(path, self, executor=executor, cpus=0, gpus=0, asked=True)
        self._calls: dict[int, _BatchCall] = {}  # by id(job): unfinished calls
        self._ids = 0
        self._running = 0
        self._counts = {"done": 0, "failed": 0, "cancelled": 0}
        self._closed = False
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------ job events
    def queued(self, job: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """The job of a call was submitted or re-attached (a cache hit: finished at once)."""
        label = (command.label(args) if getattr(fn, "__executorkit_program__", False)
                 else None) or getattr(fn, "__qualname__", None) or repr(fn)
        with self._lock:
            if self._closed:
                return
            self._ids += 1
            call = _BatchCall(self._ids, job, label)
            self._calls[id(job)] = call
            self._writer.changed(call)
        job.future.add_done_callback(lambda _: self.finished(job))

    def running(self, job: Any, *, started: float | None, host: str | None) -> None:
        """The job runs, or ran: said by the backend (again and again, for Slurm: only news
        count) or by the call's cache entry (its own start and host, the most exact)."""
        with self._lock:
            call = self._calls.get(id(job))
            if self._closed or call is None or call.future.done():
                return
            news = call.state == QUEUED
            if news:
                call.state = RUNNING
                self._running += 1
            seen = (call.started if started is None else started,
                    call.host if host is None else host)
            if news or seen != (call.started, call.host):
                call.started, call.host = seen
                call.job_id = job.job_id
                self._writer.changed(call)

    def finished(self, job: Any) -> None:
        """The call's future is done (result, error or cancel)."""
        with self._lock:
            call = self._calls.pop(id(job), None)
            if not self._closed and call is not None:
                self._finish(call)

    def close(self) -> None:
        """The executor shut down: a last write that says so, with the states as last known
        (after ``shutdown(wait=False)`` the jobs live on)."""
        with self._lock:
            if self._closed:
                return
            for key, call in list(self._calls.items()):
                # a done-callback may still be on its way when shutdown's wait returns
                if call.future.done():
                    del self._calls[key]
                    self._finish(call)
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            self._writer.close()

    def _finish(self, call: _BatchCall) -> None:
        if call.state == RUNNING:
            self._running -= 1
        call.state = FINISHED
        outcome, exc = call.outcome()
        self._counts[outcome] += 1
        if exc is not None:
            call.failures = (exc,)
        self._writer.changed(call)

    # ------------------------------------------------------------ what the writer calls
    def counts(self) -> dict[str, int]:
        unfinished = len(self._calls)
        return {**self._counts, "submitted": self._ids, "running": self._running,
                "waiting": unfinished - self._running}

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        """The writer's deferred write (it keeps at most one pending)."""
        def run() -> None:
            with self._lock:
                self._timer = None
                fn()

        self._timer = threading.Timer(delay, run)
        self._timer.daemon = True
        self._timer.start()

