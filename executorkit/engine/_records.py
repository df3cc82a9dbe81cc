"""What the engine knows about each task, worker process and connection, and the Future it
hands to callers; plain records, every decision is made by the engine's parts.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from executorkit.resources import Resources
from executorkit.transport import BlockingChannel, CacheSpec, FrameReader

# Task states. SENT: block allocation, in a worker's own queue behind calls that have no
# reply yet; not running (the worker reports its start), still cancellable.
WAITING, QUEUED, RUNNING, FINISHED, SENT = range(5)


class _EngineSide(Protocol):
    """What a task and its future call on the engine (from any thread)."""

    def post(self, fn: Callable[..., None], *args: Any) -> None: ...
    def dep_done(self, task: _Task, fut: Future) -> None: ...
    def cancelled(self, task: _Task, future: Future) -> None: ...


class TaskFuture(Future):
    """A ``concurrent.futures.Future`` whose ``cancel()`` also stops a running task.

    Stdlib futures cannot be cancelled once running; executorkit's can: the task's process
    is killed, its resources return to the pool, and tasks depending on it fail with
    :class:`~executorkit.errors.DependencyError`. The future stays in the stdlib's PENDING
    state while it runs (so the stdlib ``cancel`` accepts it); ``running()`` reports the
    truth.
    """

    _task: _Task | None = None

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        task = self._task
        if task is not None:
            # (the future goes along: by the time the engine sees this, the task may be
            # finished and have let go of it)
            task.engine.post(task.engine.cancelled, task, self)
        return True

    def running(self) -> bool:
        task = self._task
        return task is not None and task.state == RUNNING and not self.done()


class _Task:
    __slots__ = (
        "args", "cache_spec", "cancel_seen", "deadline", "deps", "deps_left", "engine",
        "failures", "fn", "future", "id", "key", "kwargs", "label", "outcome_", "path_version",
        "payload", "res", "slow", "started", "state", "timed_out", "worker",
    )

    def __init__(self, engine: _EngineSide, task_id: int, fn: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any], res: Resources) -> None:
        self.engine = engine
        self.id = task_id
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.res = res
        self.future: TaskFuture | None = TaskFuture()
        self.future._task = self
        self.label: str | None = None  # the name, kept once ``fn`` is released
        self.outcome_: tuple[str, BaseException | None] = ("", None)  # kept at release
        self.path_version = 0  # the driver's sys.path as of submit (see _tasks.py)
        self.state = WAITING
        self.deps: list[Future] | None = None
        self.deps_left = 0
        self.payload: tuple[bytes, bytes] | None = None
        self.worker: _Worker | None = None
        self.key: str | None = None
        self.cache_spec: CacheSpec | None = None
        self.deadline: float | None = None
        self.timed_out = False
        self.cancel_seen = False  # the engine has handled a cancel() of this task
        self.slow = False  # block allocation: counted in Engine._slow_active
        self.failures: list[BaseException] | None = None  # failed attempts (retries)
        self.started: float | None = None  # wall-clock start of the current attempt

    def input_done(self, fut: Future) -> None:
        """Done-callback on each input future; runs in whichever thread completed it."""
        self.engine.post(self.engine.dep_done, self, fut)

    def name(self) -> str:
        if self.label is not None:
            return self.label
        return getattr(self.fn, "__qualname__", None) or repr(self.fn)

    def outcome(self) -> tuple[str, BaseException | None]:
        """Of a finished task: "done", "failed" or "cancelled", and the exception."""
        fut = self.future
        if fut is None or not fut.done():
            return self.outcome_
        if fut.cancelled():
            return "cancelled", None
        exc = fut.exception(timeout=0)
        return ("failed" if exc is not None else "done"), exc

    def release(self, outcome: tuple[str, BaseException | None] | None = None) -> None:
        """Forget everything but the name and the cache key once finished.

        The future keeps its task (a later call may pass it as an argument: the cache key
        and the name in a DependencyError come from here), so the task must not keep the
        future: without that cycle a dropped future and its result are freed at once, not
        at the next full garbage collection. Nor may it keep the function (a bound method
        would keep its instance alive as long as the future) or the arguments.
        """
        self.label = self.name()
        self.outcome_ = self.outcome() if outcome is None else outcome
        self.args = self.kwargs = self.payload = self.deps = None  # type: ignore[assignment]
        self.fn = self.future = self.worker = None  # type: ignore[assignment]


class _Worker:
    """A worker process. ``tasks`` holds the calls sent to it without a result yet, in the
    order sent: the first is the one running (if its state says so), the others (block
    allocation, tiny calls only) are SENT and wait in the worker's own queue."""

    __slots__ = (
        "chan", "conn", "direct", "env", "eof", "errdir", "exit_status", "held", "host", "id",
        "lingers", "out", "path_version", "persistent", "pid", "pinned", "slot", "spare",
        "stop_for", "stopping", "tasks", "writing",
    )

    def __init__(self, worker_id: int, *, persistent: bool, slot: int | None = None) -> None:
        self.id = worker_id
        self.persistent = persistent
        self.slot = slot
        self.chan: BlockingChannel | None = None
        self.pid: int | None = None
        self.host: str | None = None
        self.tasks: dict[int, _Task] = {}
        self.held: int | None = None  # per-task worker: task id whose resources it holds
        # frames to send (buffered until hello / end of the turn, or until writable)
        self.out: list[bytes | memoryview] = []
        self.eof = False
        self.exit_status: int | None = None
        self.stopping = False  # killed on purpose (cancel, timeout, shutdown)
        self.stop_for: int | None = None  # the task it was killed for, if one
        self.errdir: str | None = None  # MPI workers: where a failing rank reports
        self.spare = False  # a warm per-task worker that has no call yet
        # a spare's CPU slot (pinned there when CPUs are real) and environment, as started
        self.pinned: tuple[int, ...] | None = None
        self.env: dict[str, str] | None = None
        self.direct = False  # a program the launcher runs itself: running from its spawn
        self.conn: _Conn | None = None
        self.writing = False  # output left over: the selector also waits for writability
        self.path_version = 0  # the driver's sys.path this worker has (see _syspath)
        self.lingers = False  # a one-call worker waiting for its shutdown after its reply


@dataclass
class _Conn:
    sock: socket.socket
    reader: FrameReader
    chan: BlockingChannel
    worker: _Worker | None = None
    is_launcher: bool = False

