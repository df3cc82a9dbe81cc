"""Block allocation: one persistent worker per slot, each call placed on the least loaded,
several tiny calls queued per worker while every active call is known to be tiny (the
per-function runtime estimate decides), and dead workers replaced up to restart_limit.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Hashable
from concurrent.futures import CancelledError
from typing import Any

import cloudpickle

from executorkit.engine._config import EngineConfig
from executorkit.engine._failures import _error_from_info
from executorkit.engine._records import RUNNING, WAITING, _Task, _Worker
from executorkit.errors import ExecutorBrokenError
from executorkit.scheduler import Start
from executorkit.transport import ErrorInfo, Spawn, TaskSetup

DEPTH = 16  # most calls queued in one block-allocation worker (tiny calls only)
TINY = 0.002  # seconds: calls shorter than this on average may be queued in workers


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
        self._fn_runtime: dict[Hashable, float] = {}  # runtime_key(fn) -> seconds (average)
        self._block_started = False  # workers start with the first call that needs one

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
        env = self._task_env(self.cfg.worker_res, len(cpus), gpus, slot)
        init = None
        if self.cfg.init_function is not None:
            init = cloudpickle.dumps(self.cfg.init_function)
        spawn = Spawn(w.id, env, self.cfg.worker_res.cwd, self._pin(cpus), persistent=True,
                      init_payload=init, res=self.cfg.worker_res)
        self._mpi(w, spawn, self.cfg.worker_res.cores)
        self._spawn(spawn, w)


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
        self._send(w, self._run_message(w, task, setup))


    def _known_tiny(self, fn: Any) -> bool:
        return self._fn_runtime.get(runtime_key(fn), 1.0) < TINY


    def _learn_runtime(self, task: _Task, runtime: float) -> None:
        key = runtime_key(task.fn)
        old = self._fn_runtime.get(key)
        self._fn_runtime[key] = runtime if old is None else old + 0.2 * (runtime - old)
        if len(self._fn_runtime) > 256:
            del self._fn_runtime[next(iter(self._fn_runtime))]


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
        err = _error_from_info(info, "init_function", self.cfg.init_function)
        broken = ExecutorBrokenError(f"init_function failed in a worker: {err}")
        broken.__cause__ = err
        self._break(broken)

