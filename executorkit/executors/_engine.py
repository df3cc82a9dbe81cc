"""The engine behind every executor: tasks, dependencies, the scheduler and the workers.

Threads and data flow::

    caller threads                       engine thread (owns every piece of state below)
    --------------                       -----------------------------------------------
    submit(): validate, Future,    --->  inbox (deque of callables) -> _dep_done / _ready
      find input futures,                   |
      add_done_callback on inputs           v
    Future.cancel()                --->  Scheduler (pure) -> Start decisions
    shutdown()                     --->     |
                                            v
                                         launcher.spawn / RunTask ---> worker processes
    input futures of other            selector: listener, worker channels, wake pipe,
    executors complete  ----------->    fork server output pipes, run_time_max timers
                                            |
    Future.result() <--------------------  TaskDone / Exited -> set_result / set_exception

Callers never touch the scheduler or the workers: they append a callable to ``inbox`` and
wake the engine thread, which runs it. Done-callbacks of input futures do the same, so a
chain of 10,000 failing tasks propagates iteratively, never by recursion, and an exception
in one handler can not kill the machinery: the guarded loop marks the executor broken and
fails every unfinished future instead of leaving them hanging.

Futures are completed outside of any lock the engine holds; the engine thread is the only
one that completes task futures.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import itertools
import linecache
import logging
import os
import pickle
import re
import secrets
import selectors
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, cast

import cloudpickle

from executorkit import graph
from executorkit._pickling import FunctionPickles, dumps_args
from executorkit.cache._hook import CacheHook
from executorkit.errors import (
    DependencyError,
    ExecutorBrokenError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    TaskTimeoutError,
    WorkerDiedError,
    describe_exit,
)
from executorkit.resources import Resources
from executorkit.scheduler import Demand, Scheduler, Start
from executorkit.transport import (
    MAX_FRAME,
    BlockingChannel,
    CacheSpec,
    ErrorInfo,
    Exited,
    FrameReader,
    Hello,
    InitFailed,
    RunTask,
    Spawn,
    SpawnFailed,
    Stop,
    TaskDone,
    TaskSetup,
    encode,
)

log = logging.getLogger("executorkit")

THREAD_VARIABLES = (
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS", "BLIS_NUM_THREADS",
)

# Task states
WAITING, QUEUED, RUNNING, FINISHED = range(4)

DEPTH = 16  # most calls queued in one block-allocation worker (tiny calls only)
TINY = 0.002  # seconds: calls shorter than this on average may be queued in workers
UNAUTHENTICATED_FRAME = 1 << 16  # bytes a peer may send before its hello
REPLENISH_DELAY = 0.005  # seconds between a spare taking a call and forking its successor


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
            task.engine.post(task.engine.cancelled, task)
        return True

    def running(self) -> bool:
        task = self._task
        return task is not None and task.state == RUNNING and not self.done()


class _Task:
    __slots__ = (
        "args", "cache_spec", "deadline", "deps", "deps_left", "engine", "fn", "future", "id",
        "key", "kwargs", "payload", "res", "slow", "state", "timed_out", "worker",
    )

    def __init__(self, engine: Engine, task_id: int, fn: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any], res: Resources) -> None:
        self.engine = engine
        self.id = task_id
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.res = res
        self.future = TaskFuture()
        self.future._task = self
        self.state = WAITING
        self.deps: list[Future] | None = None
        self.deps_left = 0
        self.payload: tuple[bytes, bytes] | None = None
        self.worker: _Worker | None = None
        self.key: str | None = None
        self.cache_spec: CacheSpec | None = None
        self.deadline: float | None = None
        self.timed_out = False
        self.slow = False  # block allocation: counted in Engine._slow_active

    def input_done(self, fut: Future) -> None:
        """Done-callback on each input future; runs in whichever thread completed it."""
        self.engine.post(self.engine.dep_done, self, fut)

    def name(self) -> str:
        return getattr(self.fn, "__qualname__", None) or repr(self.fn)

    def release(self) -> None:
        """Drop references to arguments once finished (the user may keep the future)."""
        self.args = self.kwargs = self.payload = self.deps = None  # type: ignore[assignment]


class _Worker:
    """A worker process. ``tasks`` holds the calls sent to it without a result yet, in the
    order sent: the first is the one running, the others (block allocation, tiny calls
    only) wait in the worker's own queue."""

    __slots__ = (
        "chan", "conn", "eof", "errdir", "exit_status", "held", "host", "id", "out",
        "persistent", "pid", "slot", "spare", "stopping", "tasks", "writing",
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
        self.errdir: str | None = None  # MPI workers: where a failing rank reports
        self.spare = False  # a warm per-task worker that has no call yet
        self.conn: _Conn | None = None
        self.writing = False  # output left over: the selector also waits for writability


@dataclass
class EngineConfig:
    """Everything the engine needs, built once by the public executor."""

    launcher: Any
    cpus: tuple[int, ...]  # CPU slot ids of the pool
    gpus: tuple[int, ...]
    real_cpus: bool  # slot ids are CPUs this process may run on (so pin to them)
    gpu_variable: str = "CUDA_VISIBLE_DEVICES"
    max_running: int | None = None
    block_workers: int = 0  # > 0: block allocation with that many persistent workers
    worker_res: Resources = field(default_factory=Resources)
    init_function: Callable[[], Mapping[str, Any]] | None = None
    restart_limit: int = 10
    disable_dependencies: bool = False
    # cores -> launcher prefix for an MPI call; None: this executor cannot run cores > 1
    mpi_command: Callable[[int], tuple[str, ...]] | None = None
    progress: Any = None  # executorkit._progress.Progress, or None
    bind_host: str = "127.0.0.1"  # where workers connect (loopback for local work)
    advertise_host: str | None = None  # the host workers connect to (default: bind_host)
    tmp_dir: str | None = None  # parent of private worker directories (shared for Slurm)
    log_obj_size: bool = False  # log pickled sizes of calls and results (INFO)


@dataclass
class _Conn:
    sock: socket.socket
    reader: FrameReader
    chan: BlockingChannel
    worker: _Worker | None = None
    is_launcher: bool = False


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.cfg = config
        self.launcher = config.launcher
        self.secret = secrets.token_bytes(32)
        self.inbox: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self.tasks: dict[int, _Task] = {}
        self.workers: dict[int, _Worker] = {}
        self.slot_workers: dict[int, _Worker] = {}
        self.restarts: dict[int, int] = {}
        self._ids = itertools.count(1)
        self._worker_ids = itertools.count(1)
        self._timers: list[tuple[float, int, _Task]] = []
        self._closing = False
        self._stopped = threading.Event()
        self._late_lock = threading.Lock()
        self.broken: BaseException | None = None
        self._wake_pending = False
        self._counts = {"done": 0, "failed": 0, "cancelled": 0}
        self._submitted = 0
        self._running = 0
        self.progress = config.progress
        self._dirty: set[_Worker] = set()
        # Per-task mode keeps warm spares: forked, connected, waiting for their one call.
        self._spares: deque[_Worker] = deque()
        self._spares_coming = 0
        self._spare_target = 0 if config.block_workers else min(2, len(config.cpus))
        self._replenish_due: float | None = None
        self._deferred: list[tuple[float, int, Callable[[], None]]] = []
        # block allocation: calls whose function is not known to be tiny, queued or running
        self._slow_active = 0
        self._fn_runtime: dict[Any, float] = {}
        # what a spare sets while idle: the environment of a default one-CPU call
        self._spare_env = dict(self._task_env(config.worker_res, 1, ()))
        self._pickles = FunctionPickles()
        self.cache = CacheHook(config.init_function)

        if config.block_workers:
            # DEPTH slots per worker: slot s belongs to worker s % workers. While calls are
            # tiny, several may wait in a worker's own queue (fewer round trips); otherwise
            # max_running keeps one call per worker so long calls backfill perfectly.
            self.sched = Scheduler(range(config.block_workers * DEPTH),
                                   max_running=config.block_workers)
        else:
            self.sched = Scheduler(config.cpus, config.gpus, max_running=config.max_running)

        self.listener = socket.create_server((config.bind_host, 0), backlog=1024)
        self.listener.setblocking(False)
        port = self.listener.getsockname()[1]
        self.address = (config.advertise_host or config.bind_host, port)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)

        self.launcher.start(self.address, self.secret)
        if hasattr(self.launcher, "on_exit"):  # launchers that watch their own processes
            self.launcher.on_exit = lambda exited: self.post(self._exited, exited)
        if hasattr(self.launcher, "on_dead"):
            self.launcher.on_dead = lambda code: self.post(self._launcher_died, code)
        self._output_registered = False
        self._tmp: str | None = None  # private directory for MPI workers, made on demand
        self._block_started = False
        self.thread = threading.Thread(target=self._run, name="executorkit-engine", daemon=True)
        self.thread.start()
        self._ident = self.thread.ident

    def _spawn(self, spawn: Spawn) -> None:
        self.launcher.spawn(spawn)
        if not self._output_registered and self.launcher.started:
            self._output_registered = True
            for fd, stream in ((self.launcher.stdout_fd, "stdout"),
                               (self.launcher.stderr_fd, "stderr")):
                if fd is not None:
                    os.set_blocking(fd, False)
                    self.selector.register(fd, selectors.EVENT_READ, (self._forward, stream))

    # ================================================================ caller side
    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the engine thread (thread-safe, never blocks)."""
        self.inbox.append((fn, args))
        if self._stopped.is_set():
            # The engine thread is gone (shutdown or crash): run late events here, where
            # they can only fail their task with the reason the engine stopped.
            with self._late_lock:
                while self.inbox:
                    late_fn, late_args = self.inbox.popleft()
                    late_fn(*late_args)
            return
        if threading.get_ident() != self._ident and not self._wake_pending:
            self._wake_pending = True
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # the pipe is full (a wake-up is pending anyway) or closed

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
               res: Resources) -> TaskFuture:
        if self.broken is not None:
            raise ExecutorBrokenError(f"the executor is broken: {self.broken}") from self.broken
        self._submitted += 1
        task = _Task(self, next(self._ids), fn, args, kwargs, res)
        deps = graph.find_futures(args, kwargs)
        if deps and self.cfg.disable_dependencies:
            raise ValueError(
                "a Future was passed as an argument but the executor was created with "
                "disable_dependencies=True; pass the result instead, or enable dependencies"
            )
        try:
            if not self.cache.prepare(task, deps):
                return task.future  # answered from the cache: no process at all
        except SerializationError as exc:
            task.state = FINISHED
            task.future.set_exception(exc)
            return task.future
        self.tasks[task.id] = task
        if deps:
            task.deps = deps
            task.deps_left = len(deps)
            for dep in deps:
                dep.add_done_callback(task.input_done)
        else:
            try:
                task.payload = self._dumps_call(fn, args, kwargs)
            except SerializationError as exc:
                self.tasks.pop(task.id, None)
                task.state = FINISHED
                task.future.set_exception(exc)
                return task.future
            self.post(self._enqueue, task)
        return task.future

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        if cancel_futures:
            for task in list(self.tasks.values()):
                if task.state in (WAITING, QUEUED):
                    task.future.cancel()
        self.post(self._begin_close)
        if wait:
            self._stopped.wait()
            self.thread.join()

    def _dumps_call(self, fn: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> tuple[bytes, bytes]:
        try:
            blobs = self._pickles.dumps(fn), dumps_args(args, kwargs)
        except Exception as exc:
            raise SerializationError(_describe_unpicklable(fn, args, kwargs, exc)) from exc
        if self.cfg.log_obj_size:
            log.info("%s: function %d bytes, arguments %d bytes pickled",
                     getattr(fn, "__qualname__", fn), len(blobs[0]), len(blobs[1]))
        return blobs

    def counts(self) -> dict[str, int]:
        """Progress figures: submitted, done, failed, cancelled, running, waiting."""
        running = self._running
        return {**self._counts, "submitted": self._submitted, "running": running,
                "waiting": max(0, len(self.tasks) - running)}

    # ================================================================ engine thread
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the guard: never die silently
            log.exception("executorkit engine failed")
            self._break(exc)
        finally:
            self._teardown()
            with self._late_lock:
                self._stopped.set()
                while self.inbox:  # posted after the loop's last look
                    fn, args = self.inbox.popleft()
                    with contextlib.suppress(Exception):
                        fn(*args)

    def _loop(self) -> None:
        select = self.selector.select
        inbox = self.inbox
        while True:
            while inbox:
                fn, args = inbox.popleft()
                fn(*args)
            if self._closing and not self.tasks and self._close_ready():
                self._flush()
                return
            if self._dirty:
                self._flush()
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            if self._replenish_due is not None:
                due = max(0.0, self._replenish_due - time.monotonic())
                timeout = due if timeout is None else min(timeout, due)
            if self._deferred:
                due = max(0.0, self._deferred[0][0] - time.monotonic())
                timeout = due if timeout is None else min(timeout, due)
            if inbox:
                timeout = 0
            for key, events in select(timeout):
                data = key.data
                if isinstance(data, _Conn):
                    if events & selectors.EVENT_WRITE and data.worker is not None:
                        self._write(data.worker)
                    if events & selectors.EVENT_READ:
                        self._readable(data)
                elif isinstance(data, tuple):
                    data[0](key.fd, data[1])
                else:
                    data(key.fileobj)
            if self._timers:
                self._fire_timers()
            if self._replenish_due is not None and time.monotonic() >= self._replenish_due:
                self._replenish_due = None
                self._replenish()
            while self._deferred and self._deferred[0][0] <= time.monotonic():
                heapq.heappop(self._deferred)[2]()

    def _drain_wake(self, sock: socket.socket) -> None:
        # Order matters (see post()): empty the pipe, *then* clear the flag, then the loop
        # drains the inbox. Clearing first could swallow a poster's byte while the flag
        # stays set, and every later post would skip the wake-up: a lost-wakeup hang.
        with contextlib.suppress(BlockingIOError):
            while sock.recv(4096):
                pass
        self._wake_pending = False

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors, say: pause, never die
                log.warning("cannot accept a worker connection: %s", exc)
                self.selector.unregister(listener)
                self._later(1.0, self._resume_accept)
                return
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Until the peer has proven it knows the secret, frames stay small.
            conn = _Conn(sock, FrameReader(self.secret, limit=UNAUTHENTICATED_FRAME),
                         BlockingChannel(sock, self.secret))
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _resume_accept(self) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.register(self.listener, selectors.EVENT_READ, self._accept)

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._deferred, (time.monotonic() + delay, next(self._ids), fn))

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 20)
        except OSError:
            data = b""
        if data:
            try:
                messages = conn.reader.feed(data)
            except Exception as exc:  # authentication failure or garbage: drop the peer
                log.warning("dropping a connection: %s", exc)
                self._drop(conn)
                return
            for msg in messages:
                self._dispatch(conn, msg)
            return
        self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()
        if conn.is_launcher:
            if not self._closing or self.tasks or self.workers:
                self._break(ExecutorBrokenError("the fork server exited unexpectedly"))
            return
        w = conn.worker
        if w is not None:
            w.eof = True
            self._maybe_finalize(w)

    # ---------------------------------------------------------------- messages
    def _dispatch(self, conn: _Conn, msg: object) -> None:
        if isinstance(msg, TaskDone):
            self._task_done(conn.worker, msg)
        elif isinstance(msg, Exited):
            self._exited(msg)
        elif isinstance(msg, Hello):
            self._hello(conn, msg)
        elif isinstance(msg, InitFailed):
            self._init_failed(conn.worker, msg.info)
        elif isinstance(msg, SpawnFailed):
            self._spawn_failed(msg)
        else:
            log.warning("unexpected message %s", type(msg).__name__)

    def _hello(self, conn: _Conn, msg: Hello) -> None:
        if msg.worker_id == 0 and not conn.is_launcher and self.launcher.chan is None:
            conn.is_launcher = True
            conn.reader.limit = MAX_FRAME
            self.launcher.attach(conn.chan)
            return
        w = self.workers.get(msg.worker_id)
        if w is None or w.chan is not None:
            self._drop(conn)  # a worker we no longer expect (already finalized)
            return
        conn.worker = w
        conn.reader.limit = MAX_FRAME
        conn.sock.setblocking(False)  # the engine thread never waits on a worker's socket
        w.chan = conn.chan
        w.conn = conn
        w.pid, w.host = msg.pid, msg.host
        if w.spare:
            self._spares_coming -= 1
            self._spares.append(w)
        if w.out:
            self._dirty.add(w)

    def _send(self, w: _Worker, msg: object) -> None:
        """Queue a frame; :meth:`_flush` sends each worker's frames in one system call."""
        header, body = encode(msg, self.secret)
        w.out.append(header)
        w.out.append(body)
        if w.chan is not None:
            self._dirty.add(w)

    def _flush(self) -> None:
        for w in self._dirty:
            if w.chan is not None and w.out:
                self._write(w)
        self._dirty.clear()

    def _write(self, w: _Worker) -> None:
        """Send what the socket takes now; the rest waits for writability (a worker busy
        with a call does not read, and large arguments must never block the engine)."""
        assert w.chan is not None
        data = w.out[0] if len(w.out) == 1 else b"".join(w.out)
        try:
            sent = w.chan.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            w.out = []  # the worker is dying; EOF and Exited will follow and finalize it
            return
        w.out = [memoryview(data)[sent:]] if sent < len(data) else []
        want_write = bool(w.out)
        if want_write != w.writing and w.conn is not None:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.modify(w.chan.sock, events, w.conn)
            w.writing = want_write

    # ---------------------------------------------------------------- task flow
    def dep_done(self, task: _Task, fut: Future) -> None:
        if task.state != WAITING or task.future.done():
            return  # already failed, or cancelled by the user meanwhile
        if fut.cancelled():
            self._fail_dependency(task, fut, CancelledError("input future was cancelled"))
            return
        exc = fut.exception()
        if exc is not None:
            self._fail_dependency(task, fut, exc)
            return
        task.deps_left -= 1
        if task.deps_left:
            return
        results = {id(d): d.result() for d in task.deps or ()}
        args, kwargs = graph.substitute_call(task.args, task.kwargs,
                                             lambda f: results[id(f)])
        task.args, task.kwargs = args, kwargs
        try:
            answered = not self.cache.ready(task)
        except SerializationError as exc3:
            self._finish(task, exc=exc3)
            return
        if answered:
            self.tasks.pop(task.id, None)
            task.state = FINISHED
            return
        try:
            task.payload = self._dumps_call(task.fn, args, kwargs)
        except SerializationError as exc2:
            self._finish(task, exc=exc2)
            return
        self._enqueue(task)

    def _fail_dependency(self, task: _Task, fut: Future, cause: BaseException) -> None:
        upstream = getattr(fut, "_task", None)
        what = f"task {upstream.id} ({upstream.name()})" if upstream else "an input future"
        verb = "was cancelled" if isinstance(cause, CancelledError) else (
            f"failed with {type(cause).__name__}: {cause}")
        err = DependencyError(f"{task.name()}: input {what} {verb}", upstream=fut)
        err.__cause__ = cause
        self._finish(task, exc=err)

    def _enqueue(self, task: _Task) -> None:
        if task.state != WAITING:
            return  # cancelled meanwhile
        if self.broken is not None:
            self._finish(task, exc=ExecutorBrokenError(f"the executor is broken: {self.broken}"))
            return
        task.state = QUEUED
        if self.cfg.block_workers:
            if not self._block_started:  # workers start with the first call that needs one
                self._block_started = True
                self._start_block_workers()
            if not self._known_tiny(task.fn):
                task.slow = True
                self._slow_active += 1
                self._set_depth()
            demand = Demand(1)
        else:
            demand = Demand(task.res.cpus, task.res.gpus, task.res.exclusive)
        self._starts(self.sched.submit(task.id, demand, task.res.priority))

    def _starts(self, starts: list[Start]) -> None:
        for start in starts:
            task = self.tasks.get(cast(int, start.task))
            if task is None:
                continue
            task.state = RUNNING
            self._running += 1
            if task.res.run_time_max is not None:
                task.deadline = time.monotonic() + task.res.run_time_max
                heapq.heappush(self._timers, (task.deadline, task.id, task))
            if self.cfg.block_workers:
                self._run_on_block_worker(task, start.cpus[0])
            else:
                self._spawn_task(task, start)

    def _spawn_task(self, task: _Task, start: Start) -> None:
        env = self._task_env(task.res, len(start.cpus), start.gpus)
        cpus = self._pin(start.cpus)
        if task.res.cores == 1 and self._spares:
            # A warm spare takes the call: no fork on the critical path.
            w = self._spares.popleft()
            w.spare = False
            # The spare already has the default environment: send only what differs.
            base = self._spare_env
            changed = tuple((k, v) for k, v in env if base.get(k) != v)
            names = {k for k, _ in env}
            unset = tuple(k for k in base if k not in names)
            setup = TaskSetup(task.res.cwd, changed, unset, cpus)
            self._assign(w, task, self._run_message(task, setup))
            # The call goes out first; forking its replacement would compete with its start
            # for the CPUs, so that waits a moment while another spare is still ready.
            self._flush()
            if self._spares:
                if self._replenish_due is None:
                    self._replenish_due = time.monotonic() + REPLENISH_DELAY
            else:
                self._replenish()
            return
        w = _Worker(next(self._worker_ids), persistent=False)
        self.workers[w.id] = w
        self._assign(w, task, self._run_message(task, None))
        spawn = Spawn(w.id, env, task.res.cwd, cpus, persistent=False, res=task.res)
        self._mpi(w, spawn, task.res.cores)
        self._spawn(spawn)
        self._replenish()

    @staticmethod
    def _run_message(task: _Task, setup: TaskSetup | None) -> RunTask:
        assert task.payload is not None, "a task is serialized before it starts"
        fn_blob, args_blob = task.payload
        return RunTask(task.id, fn_blob, args_blob, setup, task.cache_spec)

    def _assign(self, w: _Worker, task: _Task, run: RunTask) -> None:
        w.tasks[task.id] = task
        w.held = task.id
        task.worker = w
        self._send(w, run)

    def _replenish(self) -> None:
        """Keep ``_spare_target`` warm per-task workers forked and connected."""
        if not isinstance(self.launcher, _LOCAL_TYPES):
            return  # only a fork server makes spares cheap
        while (not self._closing and
               len(self._spares) + self._spares_coming < self._spare_target):
            w = _Worker(next(self._worker_ids), persistent=False)
            w.spare = True
            self.workers[w.id] = w
            self._spares_coming += 1
            self._spawn(Spawn(w.id, tuple(self._spare_env.items()), None, None,
                              persistent=False, spare=True))

    def _mpi(self, w: _Worker, spawn: Spawn, cores: int) -> None:
        """Make ``spawn`` start ``cores`` MPI ranks (when cores > 1)."""
        if cores <= 1:
            return
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="executorkit-", dir=self.cfg.tmp_dir)
        w.errdir = os.path.join(self._tmp, f"worker-{w.id}")
        os.mkdir(w.errdir, 0o700)
        spawn.errdir = w.errdir
        if self.cfg.mpi_command is not None:  # else the launcher starts the ranks (srun)
            spawn.mpi_command = self.cfg.mpi_command(cores)

    def _task_env(self, res: Resources, ncpus: int, gpus: tuple[int, ...]) -> tuple:
        threads = str(res.threads_per_core)
        env = dict.fromkeys(THREAD_VARIABLES, threads)
        if gpus or self.cfg.gpus:
            env[self.cfg.gpu_variable] = ",".join(map(str, gpus))
        env["EXECUTORKIT_CPUS"] = str(ncpus)
        env["EXECUTORKIT_GPUS"] = ",".join(map(str, gpus))
        env.update(res.env)  # the user's explicit variables win
        return tuple(env.items())

    def _pin(self, slots: tuple[int, ...]) -> tuple[int, ...] | None:
        return slots if self.cfg.real_cpus else None

    def _task_done(self, w: _Worker | None, msg: TaskDone) -> None:
        task = w.tasks.pop(msg.task_id, None) if w is not None else None
        if task is None:
            return
        if self.cfg.log_obj_size:
            log.info("task %d (%s): result %d bytes pickled", task.id, task.name(),
                     len(msg.payload))
        # Start what the freed resources allow, and send it, before completing the future:
        # completing it wakes the caller's thread, which would delay the next call.
        if w is not None and not w.persistent and w.held == task.id:
            # A one-shot worker calls _exit right after its reply (and its process group
            # is killed when it is reaped), so its CPUs are free now, not at the exit report.
            w.held = None
            self._starts(self.sched.finish(task.id))
        elif w is not None and w.persistent:
            self._learn_runtime(task, msg.finished - msg.started)
            self._starts(self.sched.finish(task.id))
        tiny = self._slow_active == 0
        if self._dirty and not (w is not None and w.persistent and tiny):
            self._flush()  # (tiny calls: keep batching, the turn's end flushes once)
        if msg.ok:
            self._finish(task, payload=msg.payload)
        else:
            self._finish(task, exc=_rebuild_error(msg.payload, task))

    def _finish(self, task: _Task, *, payload: bytes | None = None,
                exc: BaseException | None = None) -> None:
        """Complete a task's future (exactly once) and forget the task."""
        if task.state == FINISHED:
            return
        was_queued = task.state == QUEUED
        if task.state == RUNNING:
            self._running -= 1
        if task.slow:
            task.slow = False
            self._slow_active -= 1
            if self._slow_active == 0:
                self._set_depth()
                self.post(self._start_more)
        task.state = FINISHED
        self.tasks.pop(task.id, None)
        if was_queued:
            self.sched.withdraw(task.id)
        fut = task.future
        if exc is None:
            try:
                value = pickle.loads(payload)  # type: ignore[arg-type]
            except BaseException as err:
                exc = SerializationError(
                    f"the result of {task.name()} could not be unpickled in the driver: "
                    f"{type(err).__name__}: {err}")
                exc.__cause__ = err
            else:
                with contextlib.suppress(InvalidStateError):
                    fut.set_result(value)
                    self._counts["done"] += 1
        if exc is not None:
            if task.res.error_log_file and not fut.cancelled():
                _log_failure(task, exc)
            with contextlib.suppress(InvalidStateError):
                fut.set_exception(exc)
                self._counts["failed"] += 1
        task.release()
        if self.progress is not None:
            self.progress.update(self.counts())

    def cancelled(self, task: _Task) -> None:
        """The user cancelled the task's future (it is already CANCELLED)."""
        self._counts["cancelled"] += 1
        state = task.state
        if state in (WAITING, QUEUED):
            self._finish(task, exc=CancelledError())
        elif state == RUNNING and task.worker is not None:
            w = task.worker
            if next(iter(w.tasks), None) == task.id:
                self._stop_worker(w)
            # else: still queued inside a worker; its result will simply be dropped

    def _stop_worker(self, w: _Worker) -> None:
        w.stopping = True
        self.launcher.kill(w.id)

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            deadline, _, task = heapq.heappop(self._timers)
            w = task.worker
            if task.state != RUNNING or w is None or task.deadline != deadline:
                continue  # finished, or an old entry of a call that was queued again
            if w.chan is None or next(iter(w.tasks), None) != task.id:
                # not started yet (worker still starting, or earlier calls ahead of it)
                task.deadline = now + (task.res.run_time_max or 0.0)
                heapq.heappush(self._timers, (task.deadline, task.id, task))
                continue
            task.timed_out = True
            self._stop_worker(w)

    # ---------------------------------------------------------------- process exits
    def _exited(self, msg: Exited) -> None:
        w = self.workers.get(msg.worker_id)
        if w is None:
            return
        w.exit_status = msg.status
        w.pid = w.pid or msg.pid
        self._maybe_finalize(w, reason=msg.reason)

    def _spawn_failed(self, msg: SpawnFailed) -> None:
        w = self.workers.get(msg.worker_id)
        if w is not None:
            w.exit_status = -1
            w.eof = True
            self._maybe_finalize(w, reason=msg.reason)

    def _maybe_finalize(self, w: _Worker, reason: str | None = None) -> None:
        """A worker is gone once its process was reaped and its connection closed."""
        if w.exit_status is None or not (w.eof or w.chan is None):
            return
        if self.workers.pop(w.id, None) is None:
            return
        self._dirty.discard(w)
        if w.spare:  # died (or was stopped) before it had a call
            if w in self._spares:
                self._spares.remove(w)
            else:
                self._spares_coming -= 1
            return
        tasks, w.tasks = list(w.tasks.values()), {}
        if tasks and w.persistent and w.chan is None:
            tasks.insert(0, None)  # type: ignore[arg-type]  # it never ran any of them
        elif tasks:  # the first was running: it fails; the others never started
            if w.errdir and _rank_error(w.errdir, tasks[0].id) is not None:
                w.stopping = True  # an MPI rank raised: the call failed, not the worker
            self._finish(tasks[0], exc=self._death_error(w, tasks[0], reason))
        if w.persistent:
            self._replace_block_worker(w, tasks)
        elif w.held is not None:
            tid, w.held = w.held, None
            self._starts(self.sched.finish(tid))

    def _death_error(self, w: _Worker, task: _Task, reason: str | None) -> BaseException:
        if task.timed_out:
            return TaskTimeoutError(
                f"{task.name()} exceeded run_time_max={task.res.run_time_max:g} s and was "
                f"stopped")
        reported = _rank_error(w.errdir, task.id) if w.errdir else None
        if reported is not None:
            return _error_from_info(reported, task.name())
        status = w.exit_status if w.exit_status is not None else -1
        how, code, signum = describe_exit(status)
        where = f"pid {w.pid} on {w.host}" if w.pid else "its process"
        text = reason or f"the process running {task.name()} ({where}) {how}"
        return WorkerDiedError(text, exitcode=code, signum=signum, host=w.host, pid=w.pid)

    # ---------------------------------------------------------------- block allocation
    def _start_block_workers(self) -> None:
        for slot in range(self.cfg.block_workers):
            self._spawn_block_worker(slot)

    def _worker_slots(self, slot: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        n = self.cfg.worker_res.cpus
        g = self.cfg.worker_res.gpus
        return (self.cfg.cpus[slot * n:(slot + 1) * n], self.cfg.gpus[slot * g:(slot + 1) * g])

    def _spawn_block_worker(self, slot: int) -> None:
        w = _Worker(next(self._worker_ids), persistent=True, slot=slot)
        self.workers[w.id] = w
        self.slot_workers[slot] = w
        cpus, gpus = self._worker_slots(slot)
        env = self._task_env(self.cfg.worker_res, len(cpus), gpus)
        init = None
        if self.cfg.init_function is not None:
            init = cloudpickle.dumps(self.cfg.init_function)
        spawn = Spawn(w.id, env, self.cfg.worker_res.cwd, self._pin(cpus), persistent=True,
                      init_payload=init, res=self.cfg.worker_res)
        self._mpi(w, spawn, self.cfg.worker_res.cores)
        self._spawn(spawn)

    def _run_on_block_worker(self, task: _Task, slot: int) -> None:
        # The least loaded worker: a second call is queued in a worker only when every
        # worker already has one (and only while calls are known to be tiny).
        w = min(self.slot_workers.values(), key=lambda v: (len(v.tasks), v.slot))
        w.tasks[task.id] = task
        task.worker = w
        setup = None
        base = self.cfg.worker_res
        if task.res.cwd != base.cwd or task.res.env != base.env:
            # resource_dict keys override the defaults as a whole: a per-call env replaces
            # the executor-level env, as it does for a per-task process
            names = {k for k, _ in task.res.env}
            unset = tuple(k for k, _ in base.env if k not in names)
            setup = TaskSetup(task.res.cwd, task.res.env, unset)
        self._send(w, self._run_message(task, setup))

    def _known_tiny(self, fn: Any) -> bool:
        try:
            return self._fn_runtime.get(fn, 1.0) < TINY
        except TypeError:  # an unhashable callable
            return False

    def _learn_runtime(self, task: _Task, runtime: float) -> None:
        try:
            old = self._fn_runtime.get(task.fn)
            self._fn_runtime[task.fn] = runtime if old is None else old + 0.2 * (runtime - old)
            if len(self._fn_runtime) > 256:
                del self._fn_runtime[next(iter(self._fn_runtime))]
        except TypeError:
            pass

    def _set_depth(self) -> None:
        """Several calls per worker only while every active call is known to be tiny."""
        depth = DEPTH if self._slow_active == 0 else 1
        self.sched.max_running = self.cfg.block_workers * depth

    def _replace_block_worker(self, w: _Worker, tasks: list[_Task]) -> None:
        slot = w.slot
        assert slot is not None
        if self._closing and not self.tasks:
            return
        if not w.stopping:
            self.restarts[slot] = self.restarts.get(slot, 0) + 1
        if self.restarts.get(slot, 0) > self.cfg.restart_limit:
            self._break(ExecutorBrokenError(
                f"block-allocation worker {slot} died {self.restarts[slot]} times "
                f"(restart_limit={self.cfg.restart_limit})"))
            return
        self._spawn_block_worker(slot)
        starts: list[Start] = []
        for task in tasks:
            if task is not None:
                starts += self.sched.finish(task.id)
        self._starts(starts)
        for task in tasks[1:]:  # queued behind the one that died: run them again
            if task.state == RUNNING and not task.future.cancelled():
                task.state = WAITING
                self._running -= 1
                task.worker = None
                task.deadline = None
                self._enqueue(task)
            elif task.state == RUNNING:
                self._finish(task, exc=CancelledError())
        self._starts(self.sched.finish_none())

    def _init_failed(self, w: _Worker | None, info: ErrorInfo) -> None:
        err = _error_from_info(info, "init_function")
        broken = ExecutorBrokenError(f"init_function failed in a worker: {err}")
        broken.__cause__ = err
        self._break(broken)

    # ---------------------------------------------------------------- output, shutdown
    def _forward(self, fd: int, stream: str) -> None:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self.selector.unregister(fd)
            os.close(fd)
            return
        out = sys.stdout if stream == "stdout" else sys.stderr
        try:
            out.write(data.decode(errors="replace"))
            out.flush()
        except Exception:
            pass  # a closed driver stream must not break the engine

    def _start_more(self) -> None:
        self._starts(self.sched.finish_none())

    def _launcher_died(self, code: int) -> None:
        if self._closing and not self.tasks and not self.workers:
            return  # the normal end
        how, _, _ = describe_exit(code)
        self._break(ExecutorBrokenError(f"the fork server {how}"))

    def _begin_close(self) -> None:
        self._closing = True

    def _close_ready(self) -> bool:
        """Stop persistent workers; the loop exits once none is left."""
        alive = [w for w in self.workers.values() if w.persistent or w.spare]
        for w in alive:
            if not w.stopping:
                w.stopping = True
                if w.chan is not None:
                    self._send(w, Stop())
                else:
                    self.launcher.kill(w.id)
        return not self.workers

    def _break(self, exc: BaseException) -> None:
        """Fail every unfinished future and refuse new work."""
        if self.broken is None:
            self.broken = exc
        for task in list(self.tasks.values()):
            err = ExecutorBrokenError(f"the executor is broken: {exc}")
            err.__cause__ = exc
            self._finish(task, exc=err)
        self._closing = True
        for w in list(self.workers.values()):
            w.stopping = True
            w.tasks.clear()
        self.workers.clear()

    def _teardown(self) -> None:
        if self.progress is not None:
            with contextlib.suppress(Exception):
                self.progress.close(self.counts())
        if self.broken is None:
            self.broken = ExecutorBrokenError("the executor has shut down")
        for task in list(self.tasks.values()):  # only after a crash of the loop itself
            with contextlib.suppress(Exception):
                self._finish(task, exc=ExecutorBrokenError("the executor stopped"))
        with contextlib.suppress(Exception):
            self.launcher.stop()
        for key in list(self.selector.get_map().values()):
            if isinstance(key.data, tuple):  # forwarded output: print what is left
                with contextlib.suppress(Exception):
                    while key.fd in self.selector.get_map():
                        self._forward(key.fd, key.data[1])
                        if not _readable_now(key.fd):
                            break
            with contextlib.suppress(Exception):
                self.selector.unregister(key.fileobj)
            with contextlib.suppress(Exception):
                if isinstance(key.fileobj, int):
                    os.close(key.fileobj)
                else:
                    cast(Any, key.fileobj).close()
        self.selector.close()
        with contextlib.suppress(OSError):
            self._wake_w.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _local_types() -> tuple[type, ...]:
    from executorkit.launchers.local import LocalLauncher

    return (LocalLauncher,)


_LOCAL_TYPES = _local_types()


def _rank_error(errdir: str, task_id: int) -> ErrorInfo | None:
    """The error report of the lowest MPI rank that failed ``task_id``, if any."""
    prefix = f"task-{task_id}-rank-"
    try:
        names = [n for n in os.listdir(errdir) if n.startswith(prefix) and n.endswith(".pkl")]
    except OSError:
        return None
    if not names:
        return None
    first = min(names, key=lambda n: int(n[len(prefix):-4]))
    try:
        with open(os.path.join(errdir, first), "rb") as fh:
            return pickle.load(fh)
    except Exception:
        return None


def _readable_now(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


# ==================================================================== helpers


def _describe_unpicklable(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                          exc: Exception) -> str:
    """Name the first part of the call that cannot be pickled."""
    name = getattr(fn, "__qualname__", repr(fn))
    parts: list[tuple[str, Any]] = [("the function", fn)]
    parts += [(f"argument {i}", a) for i, a in enumerate(args)]
    parts += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for label, obj in parts:
        try:
            cloudpickle.dumps(obj)
        except Exception as inner:
            return (f"cannot submit {name}: {label} ({type(obj).__qualname__}) cannot be "
                    f"pickled: {type(inner).__name__}: {inner}")
    return f"cannot submit {name}: the call cannot be pickled: {type(exc).__name__}: {exc}"


def _error_from_info(info: ErrorInfo, name: str) -> BaseException:
    exc: BaseException | None = None
    if info.exc is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(info.exc)
    if info.kind == "serialization":
        err: BaseException = SerializationError(f"{name}: {info.type_name}: {info.message}")
        if exc is not None:
            err.__context__ = exc
    elif exc is None:
        err = RemoteError(info.type_name, info.message)
    else:
        err = exc
    err.__cause__ = RemoteTraceback(fill_source_lines(info.traceback))
    return err


_FRAME = re.compile(r'^  File "(?P<file>.+)", line (?P<line>\d+), in ')


def fill_source_lines(text: str) -> str:
    """Add the source lines a worker could not show, from the driver's line cache.

    Functions defined in a notebook cell (or typed at a prompt) live only in the driver's
    ``linecache``; the worker prints their frames without source. The driver has it.
    """
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        match = _FRAME.match(line)
        if match is None:
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if following.startswith("    "):
            continue  # the worker already showed the source
        source = linecache.getline(match["file"], int(match["line"])).strip()
        if source:
            out.append(f"    {source}\n")
    return "".join(out)


def _rebuild_error(payload: bytes, task: _Task) -> BaseException:
    info: ErrorInfo = pickle.loads(payload)
    return _error_from_info(info, task.name())


def _log_failure(task: _Task, exc: BaseException) -> None:
    """Append one failure record; flock makes concurrent writers (tasks, executors) safe."""
    path = task.res.error_log_file
    assert path is not None
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc.__cause__, RemoteTraceback):
        tb = exc.__cause__.tb + tb
    record = (
        f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} task {task.id} function {task.name()}\n"
        f"args: {_short(task.args)}\nkwargs: {_short(task.kwargs)}\n{tb}\n"
    )
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, record.encode())
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno != errno.ENOENT:
            log.warning("could not write error_log_file %s: %s", path, err)


def _short(obj: Any, limit: int = 500) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "...<truncated>"

