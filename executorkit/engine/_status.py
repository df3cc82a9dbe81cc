"""The live ``status.json`` of an executor: what ``executorkit status DIR`` shows.

The engine tells the :class:`StatusWriter` which task changed (:meth:`StatusWriter.changed`,
O(1), on the engine thread); at most about once a second a deferred call on the engine's
loop (never a thread of its own, never a poll) re-encodes only the calls that changed since
the last write and replaces the file atomically (temporary file, then rename). Nothing is
written while nothing changed, and nothing is written per call.

File layout (``format`` 1), one JSON object::

    format, executor, host, pid, started, updated (epoch seconds), closed (bool)
    pool        {"cpus": n, "gpus": m}
    counts      submitted, done, failed, cancelled, running, waiting
    busy_now    CPUs of running calls / pool CPUs, now
    busy_fraction   the same, averaged over the time since the first call started
                (``asked=True``, the batch executors: the pool is what the unfinished calls
                ask for, so ``pool`` is that now, with ``"asked": true``; ``busy_now`` is
                the share of it the queue system runs, ``busy_fraction`` running
                CPU-seconds / asked CPU-seconds since the first call was queued: 1.0 when
                no job ever waited in the queue)
    calls       [{"id", "function", "state", "started", "finished", "host", "resources",
                  "attempt", "error"}], the most recent calls (a call appears once it is
                queued; those still waiting for their inputs are only counted; a batch
                executor's also carry "key" and "job_id", and a null host or start where
                the queue system did not say)
    calls_omitted   finished calls dropped from ``calls`` (the cache keeps them all)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from typing import Any

from executorkit import command
from executorkit.engine._records import FINISHED, QUEUED, RUNNING, SENT, WAITING, _Task

log = logging.getLogger("executorkit")

FORMAT = 1
INTERVAL = 1.0  # seconds between two writes, at most
KEEP_FINISHED = 10_000  # finished calls listed; older ones are only counted
_STATES = {WAITING: "waiting", QUEUED: "queued", SENT: "queued", RUNNING: "running"}


class StatusWriter:
    """Keeps ``path`` up to date for one engine; every method runs on the engine thread
    (for a batch executor: under the lock of its ``BatchStatus``, which stands in for the
    engine's ``_later`` and ``counts``)."""

    def __init__(self, path: str, engine: Any, *, executor: str, cpus: int, gpus: int,
                 asked: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.engine = engine
        self.head = {"format": FORMAT, "executor": executor, "host": socket.gethostname(),
                     "pid": os.getpid(), "started": time.time(),
                     "pool": {"cpus": cpus, "gpus": gpus}}
        self.cpus = max(cpus, 1)
        self._changed: dict[int, _Task] = {}
        self._finished_at: dict[int, float] = {}
        self._names: dict[int, str] = {}  # what a call is called (a Command: its program)
        self._live: dict[int, str] = {}  # task id -> JSON of a call not finished yet
        self._done: OrderedDict[int, str] = OrderedDict()  # finished calls, oldest first
        self._omitted = 0
        self._busy = 0  # CPUs of running calls
        self._running: dict[int, int] = {}  # task id -> CPUs it holds
        self._busy_integral = 0.0  # CPU-seconds
        self._first_start: float | None = None
        self._last_change = time.monotonic()
        self._due = False
        self._last_write = 0.0
        self._closed = False
        # asked: the pool is the CPUs and GPUs of the unfinished calls (queued or running)
        self._asked: dict[int, tuple[int, int]] | None = {} if asked else None
        self._asked_now = [0, 0]
        self._asked_integral = 0.0  # CPU-seconds asked for

    # ------------------------------------------------------------ engine side, O(1)
    def changed(self, task: _Task) -> None:
        """``task`` changed state (queued, started, finished, queued again for a retry)."""
        if self._closed:
            return
        self._account(task)
        if task.id not in self._names:  # first seen: its arguments are still there
            self._names[task.id] = _name(task)
        self._changed[task.id] = task
        if task.state == FINISHED:
            self._finished_at[task.id] = time.time()
        if not self._due:
            self._due = True
            delay = max(0.0, self._last_write + INTERVAL - time.monotonic())
            self.engine._later(delay, self._write_due)

    def _account(self, task: _Task) -> None:
        """Integrate busy CPUs over time (the busy fraction)."""
        now = time.monotonic()
        self._busy_integral += self._busy * (now - self._last_change)
        if self._asked is not None:
            self._ask(task, now)
        self._last_change = now
        held = self._running.pop(task.id, 0)
        self._busy -= held
        if task.state == RUNNING:
            cpus = task.res.cpus
            self._running[task.id] = cpus
            self._busy += cpus
            if self._first_start is None:
                self._first_start = now

    def _ask(self, task: _Task, now: float) -> None:
        """Integrate the CPUs the unfinished calls ask for (``asked=True``)."""
        asked = self._asked
        assert asked is not None
        self._asked_integral += self._asked_now[0] * (now - self._last_change)
        cpus, gpus = asked.pop(task.id, (0, 0))
        if task.state != FINISHED:
            asked[task.id] = (task.res.cpus, task.res.gpus)
            cpus, gpus = cpus - task.res.cpus, gpus - task.res.gpus
        self._asked_now[0] -= cpus
        self._asked_now[1] -= gpus

    def _write_due(self) -> None:
        self._due = False
        if not self._closed:  # the last write said "closed": never overwrite it
            self.write()

    def close(self) -> None:
        """The executor shut down: a last write that says so."""
        if self._closed:
            return
        self.write(closed=True)
        self._closed = True

    # ------------------------------------------------------------ the write, O(changed)
    def write(self, *, closed: bool = False) -> None:
        self._last_write = time.monotonic()
        self._encode_changed()
        try:
            self._replace(self._document(closed))
        except OSError as exc:  # a status file is a courtesy: never break the campaign
            log.warning("could not write the status file %s: %s", self.path, exc)

    def _encode_changed(self) -> None:
        changed, self._changed = self._changed, {}
        for task in changed.values():
            finished = self._finished_at.pop(task.id, None)
            record = self._record(task, finished)
            record["function"] = self._names.get(task.id) or record["function"]
            text = json.dumps(record, default=str)
            if task.state == FINISHED:
                self._names.pop(task.id, None)
                self._live.pop(task.id, None)
                self._done[task.id] = text
                self._done.move_to_end(task.id)
            else:
                self._live[task.id] = text
                # A running call learns its host when its worker says hello: look again.
                if task.state == RUNNING and _host(task) is None:
                    self._changed[task.id] = task
        while len(self._done) > KEEP_FINISHED:
            self._done.popitem(last=False)
            self._omitted += 1

    def _record(self, task: _Task, finished: float | None) -> dict[str, Any]:
        """The JSON record of one call (a subclass may add fields)."""
        return _call(task, finished)

    def _document(self, closed: bool) -> str:
        now = time.monotonic()
        integral = self._busy_integral + self._busy * (now - self._last_change)
        if self._asked is None:
            span = now - self._first_start if self._first_start is not None else 0.0
            busy_now, cpu_time = self._busy / self.cpus, span * self.cpus
        else:
            cpu_time = self._asked_integral + self._asked_now[0] * (now - self._last_change)
            busy_now = self._busy / self._asked_now[0] if self._asked_now[0] else 0.0
        head = {**self.head, "updated": time.time(), "closed": closed,
                "counts": self.engine.counts(), "busy_now": round(busy_now, 4),
                "busy_fraction": round(integral / cpu_time, 4) if cpu_time > 0 else 0.0,
                "calls_omitted": self._omitted}
        if self._asked is not None:
            head["pool"] = {"cpus": self._asked_now[0], "gpus": self._asked_now[1],
                            "asked": True}
        text = json.dumps(head)
        calls = ",".join([*self._done.values(), *self._live.values()])
        return f'{text[:-1]}, "calls": [{calls}]}}\n'

    def _replace(self, text: str) -> None:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".status.{os.getpid()}.{id(self)}.tmp")
        try:
            with open(tmp, "w") as fh:
                fh.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _name(task: _Task) -> str:
    if getattr(task.fn, "__executorkit_program__", False):
        return command.label(task.args) or task.name()
    return task.name()


def _host(task: _Task) -> str | None:
    worker = task.worker
    return getattr(worker, "host", None) if worker is not None else None


def _call(task: _Task, finished: float | None) -> dict[str, Any]:
    res = task.res
    resources = {"cores": res.cores, "threads_per_core": res.threads_per_core,
                 "gpus_per_core": res.gpus_per_core,
                 **{k: v for k, v in res.as_dict().items() if k not in ("env", "retry_on")}}
    record: dict[str, Any] = {
        "id": task.id, "function": task.name(), "state": _state(task),
        "started": task.started, "host": _host(task), "resources": resources,
        "attempt": len(task.failures or ()) + (0 if task.state == FINISHED and
                                               _failed(task) else 1),
    }
    if task.state == FINISHED:
        record["finished"] = finished
        exc = _exception(task)
        if exc is not None:
            text = str(exc).strip()
            record["error"] = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    return record


def _state(task: _Task) -> str:
    if task.state != FINISHED:
        return _STATES[task.state]
    return task.outcome()[0]


def _failed(task: _Task) -> bool:
    return task.outcome()[0] == "failed"


def _exception(task: _Task) -> BaseException | None:
    return task.outcome()[1]
