"""Block allocation: one persistent worker per slot, each call placed on the least loaded,
several tiny calls queued per worker while every active call is known to be tiny (the
estimator decides), dead workers replaced up to restart_limit, and the number of workers
changed while running (``max_workers = n``): new workers start at once, retired ones get no
new calls and stop once the calls already sent to them are done.

A call queued in a worker (SENT) is not running until the worker reports its start; until
then a cancel drops it there, and a worker whose running call outlives its tiny estimate
gives the queued calls back, to be placed again.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Hashable
from concurrent.futures import CancelledError
from dataclasses import replace
from typing import Any

import cloudpickle

from executorkit.engine._config import EngineConfig
from executorkit.engine._failures import _error_from_info
from executorkit.engine._records import QUEUED, RUNNING, SENT, WAITING, _Task, _Worker
from executorkit.errors import ExecutorBrokenError
from executorkit.estimator import DEPTH, RuntimeEstimator
from executorkit.scheduler import Start
from executorkit.transport import (
    Cancel,
    Dropped,
    ErrorInfo,
    GaveBack,
    Spawn,
    Stop,
    TaskDone,
    TaskSetup,
)

OVERRUN = 0.01  # seconds: a call expected tiny that runs longer gives back its followers
QUEUE_BYTES = 16 << 20  # pickled calls one worker's queue may hold (roughly)

__all__ = ["DEPTH", "_BlockPool"]


def runtime_key(fn: Any) -> Hashable:
    """What names ``fn`` in the runtime table without keeping it alive: its code object
    (a bound method's instance, a partial's arguments or a closure's cells are not kept),
    else the names of its module and type."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)  # a bound method: the function, not the instance
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):
        return code
    return (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None),
            type(fn).__module__, type(fn).__qualname__)


class _BlockPool:
    """Mixin of :class:`~executorkit.engine._engine.Engine`: persistent workers, on the
    engine thread."""

    def _init_block(self, config: EngineConfig) -> None:
        self.slot_workers: dict[int, _Worker] = {}
        self.restarts: dict[int, int] = {}
        # calls whose function is not known to be tiny, queued or running
        self._slow_active = 0
        # MPI workers serve one call at a time (rank 0 reads no queue): never prefetch there
        self.estimator = RuntimeEstimator(depth=DEPTH if config.worker_res.cores == 1 else 1)
        self._block_started = False  # workers start with the first call that needs one
        self.block_count = config.block_workers  # workers wanted now (max_workers)
        self._retired: set[int] = set()  # ids of workers a resize took out of the pool
        self._call_bytes = 0.0  # smoothed size of a pickled call (bounds the queue depth)

    def _start_block_workers(self) -> None:
        for slot in range(self.block_count):
            self._spawn_block_worker(slot)


    def _resize_block(self, count: int, cpus: tuple[int, ...], real: bool) -> None:
        """Grow or shrink the pool to ``count`` workers on the CPU slots ``cpus``."""
        old, self.block_count = self.block_count, count
        self.cfg = replace(self.cfg, cpus=cpus, real_cpus=real)
        if self._block_started and not self._closing:
            for slot in range(old, count):
                self._spawn_block_worker(slot)
            for slot in range(count, old):
                self._retire(self.slot_workers.pop(slot))
        self._set_depth()
        self._starts(self.sched.resize(range(count * DEPTH)))


    def _retire(self, w: _Worker) -> None:
        """No new calls for ``w`` (it left slot_workers); it stops once its calls are done."""
        self._retired.add(w.id)
        self._stop_if_retired(w)


    def _stop_if_retired(self, w: _Worker) -> None:
        if not w.tasks and not w.stopping and w.id in self._retired:
            w.stopping = True  # its exit is no crash: not counted against restart_limit
            self._send(w, Stop())


    def _worker_slots(self, slot: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        n = self.cfg.worker_res.cpus
        g = self.cfg.worker_res.gpus
        return (self.cfg.cpus[slot * n:(slot + 1) * n], self.cfg.gpus[slot * g:(slot + 1) * g])


    def _spawn_block_worker(self, slot: int) -> None:
        w = _Worker(next(self._worker_ids), persistent=True, slot=slot)
        self.workers[w.id] = w
        self.slot_workers[slot] = w
        cpus, gpus = self._worker_slots(slot)
        env = self._task_env(self.cfg.worker_res, len(cpus), gpus, slot)
        init = None
        if self.cfg.init_function is not None:
            init = cloudpickle.dumps(self.cfg.init_function)
        spawn = Spawn(w.id, env, self.cfg.worker_res.cwd, self._pin(cpus), persistent=True,
                      init_payload=init, res=self.cfg.worker_res)
        self._mpi(w, spawn, self.cfg.worker_res.cores)
        self._spawn(spawn, w)


    def _run_on_block_worker(self, task: _Task) -> None:
        # The least loaded worker: a second call is queued in a worker only when every
        # worker already has one (and only while calls are known to be tiny).
        w = min(self.slot_workers.values(), key=lambda v: (len(v.tasks), v.slot))
        queued = bool(w.tasks)
        if queued:
            task.state = SENT
            if self.status is not None:
                self.status.changed(task)
        else:
            self._now_running(task)
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
        run = self._run_message(w, task, setup)
        run.queued = queued
        # Calls may be queued behind a call expected tiny: if it is not, they come back.
        run.overrun_after = 0.0 if task.slow or self.estimator.max_depth == 1 else OVERRUN
        self._send(w, run)


    def _known_tiny(self, fn: Any) -> bool:
        return self.estimator.is_tiny(runtime_key(fn))


    def _observe_runtime(self, task: _Task, done: TaskDone) -> None:
        """Learn the call's own duration (the worker's, else the whole run's)."""
        own = done.elapsed if done.elapsed >= 0 else done.finished - done.started
        key = runtime_key(task.fn)
        was_tiny = self.estimator.is_tiny(key)
        self.estimator.observe(key, own)
        if not was_tiny and self._slow_active and self.estimator.is_tiny(key):
            self._now_tiny(key)
        if not self._slow_active:
            self._set_depth()  # the depth follows the pace of the tiny calls

    def _now_tiny(self, key: Hashable) -> None:
        """``key``'s calls proved tiny: those still waiting in the engine's queue (counted
        as not known tiny when they were submitted) no longer hold every worker to one
        call, or a first round of thousands would run one call per round trip."""
        for task in list(self.tasks.values()):  # (submit() adds tasks from other threads)
            if task.slow and task.state == QUEUED and runtime_key(task.fn) == key:
                task.slow = False
                self._slow_active -= 1
        self._set_depth()


    def _set_depth(self) -> None:
        """Several calls per worker only while every active call is known to be tiny, and
        no more than about QUEUE_BYTES of them (one at a time when calls are that large)."""
        depth = self.estimator.depth(self._slow_active)
        if depth > 1 and self._call_bytes * depth > QUEUE_BYTES:
            depth = max(1, int(QUEUE_BYTES / self._call_bytes))
        self.sched.max_running = self.block_count * depth

    def _sized(self, payload: tuple[bytes, bytes]) -> None:
        """A call was pickled: follow the size of calls (large arguments, shallow queues).
        A large call counts at once; the size decays slowly after it."""
        size = len(payload[0]) + len(payload[1])
        grew = size > self._call_bytes
        self._call_bytes = max(float(size), self._call_bytes + 0.1 * (size - self._call_bytes))
        if grew and not self._slow_active:
            self._set_depth()


    def _mark_slow(self, task: _Task) -> None:
        if not task.slow:
            task.slow = True
            self._slow_active += 1
            self._set_depth()


    def _queued_started(self, w: _Worker, task_id: int) -> None:
        """The worker starts a call it had queued: now it runs."""
        task = w.tasks.get(task_id)
        if task is None or task.state != SENT:
            return
        self._now_running(task)
        if task.future.cancelled():  # cancelled while its Cancel was on the way
            self._stop_worker(w, task)


    def _started(self, w: _Worker | None, task_id: int) -> None:
        if w is not None:
            self._queued_started(w, task_id)


    def _dropped(self, w: _Worker | None, msg: Dropped) -> None:
        """Queued calls the worker dropped on our Cancel."""
        if w is None:
            return
        starts: list[Start] = []
        for task_id in msg.task_ids:
            task = w.tasks.pop(task_id, None)
            if task is not None:
                starts += self.sched.finish(task_id)
                self._finish(task, exc=CancelledError())
        if self._retired:
            self._stop_if_retired(w)
        self._starts(starts)


    def _gave_back(self, w: _Worker | None, msg: GaveBack) -> None:
        """The running call overran its tiny estimate: learn that, and place the calls that
        waited behind it again (on workers that are free)."""
        if w is None:
            return
        running = w.tasks.get(msg.running)
        if running is not None:
            self.estimator.observe(runtime_key(running.fn), msg.elapsed)
            self._mark_slow(running)
        back = [t for t in (w.tasks.pop(i, None) for i in msg.task_ids) if t is not None]
        if self._retired:
            self._stop_if_retired(w)
        starts: list[Start] = []
        for task in back:
            starts += self.sched.finish(task.id)
        for task in back:
            task.worker = None
            task.deadline = None
            if task.future.cancelled():
                self._finish(task, exc=CancelledError())
            else:
                task.state = WAITING
                self._enqueue(task)
        self._starts(starts)


    def _cancel_queued(self, task: _Task) -> None:
        """A SENT call was cancelled: ask its worker to drop it (it answers Dropped, or
        reports the start and is then stopped like any cancelled running call)."""
        assert task.worker is not None
        self._send(task.worker, Cancel((task.id,)))


    def _replace_block_worker(self, w: _Worker, tasks: list[_Task]) -> None:
        slot = w.slot
        assert slot is not None
        if self._closing and not self.tasks:
            return
        if w.id in self._retired:  # taken out by a resize: not replaced
            self._retired.discard(w.id)
        elif not self._respawn(slot, counts=not w.stopping):
            return
        starts: list[Start] = []
        for task in tasks:
            if task is not None:
                starts += self.sched.finish(task.id)
        self._starts(starts)
        for task in tasks[1:]:  # queued behind the one that died: run them again
            if task.state not in (RUNNING, SENT):
                continue
            if task.future.cancelled():
                self._finish(task, exc=CancelledError())
                continue
            if task.state == RUNNING:
                self._running -= 1
            task.state = WAITING
            task.worker = None
            task.deadline = None
            self._enqueue(task)
        self._starts(self.sched.finish_none())


    def _respawn(self, slot: int, *, counts: bool) -> bool:
        """Start a successor in ``slot``; False (and the executor broken) past restart_limit."""
        if counts:
            self.restarts[slot] = self.restarts.get(slot, 0) + 1
        if self.restarts.get(slot, 0) > self.cfg.restart_limit:
            self._break(ExecutorBrokenError(
                f"block-allocation worker {slot} died {self.restarts[slot]} times "
                f"(restart_limit={self.cfg.restart_limit})"))
            return False
        self._spawn_block_worker(slot)
        return True


    def _init_failed(self, w: _Worker | None, info: ErrorInfo) -> None:
        err = _error_from_info(info, "init_function", self.cfg.init_function)
        broken = ExecutorBrokenError(f"init_function failed in a worker: {err}")
        broken.__cause__ = err
        self._break(broken)

