"""Block allocation: one persistent worker per slot, each call placed on the least loaded,
several tiny calls queued per worker while every active call is known to be tiny (the
estimator decides), and dead workers replaced up to restart_limit.

A call queued in a worker (SENT) is not running until the worker reports its start; until
then a cancel drops it there, and a worker whose running call outlives its tiny estimate
gives the queued calls back, to be placed again.
"""

from __future__ import annotations

import time
from concurrent.futures import CancelledError

import cloudpickle

from executorkit.engine._config import EngineConfig
from executorkit.engine._failures import _error_from_info
from executorkit.engine._records import RUNNING, SENT, WAITING, _Task, _Worker
from executorkit.errors import ExecutorBrokenError
from executorkit.estimator import DEPTH, RuntimeEstimator
from executorkit.scheduler import Start
from executorkit.transport import Cancel, Dropped, ErrorInfo, GaveBack, Spawn, TaskSetup

OVERRUN = 0.01  # seconds: a call expected tiny that runs longer gives back its followers

__all__ = ["DEPTH", "_BlockPool"]


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
        self._spawn(spawn)


    def _run_on_block_worker(self, task: _Task) -> None:
        # The least loaded worker: a second call is queued in a worker only when every
        # worker already has one (and only while calls are known to be tiny).
        w = min(self.slot_workers.values(), key=lambda v: (len(v.tasks), v.slot))
        queued = bool(w.tasks)
        if queued:
            task.state = SENT
        else:
            task.state = RUNNING
            task.started = time.time()
            self._running += 1
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
        run = self._run_message(task, setup)
        run.queued = queued
        # Calls may be queued behind a call expected tiny: if it is not, they come back.
        run.overrun_after = 0.0 if task.slow or self.estimator.max_depth == 1 else OVERRUN
        self._send(w, run)


    def _known_tiny(self, fn: object) -> bool:
        return self.estimator.is_tiny(fn)


    def _set_depth(self) -> None:
        """Several calls per worker only while every active call is known to be tiny."""
        self.sched.max_running = self.cfg.block_workers * self.estimator.depth(self._slow_active)


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
        task.state = RUNNING
        task.started = time.time()
        self._running += 1
        if task.future.cancelled():  # cancelled while its Cancel was on the way
            self._stop_worker(w)


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
        self._starts(starts)


    def _gave_back(self, w: _Worker | None, msg: GaveBack) -> None:
        """The running call overran its tiny estimate: learn that, and place the calls that
        waited behind it again (on workers that are free)."""
        if w is None:
            return
        running = w.tasks.get(msg.running)
        if running is not None:
            self.estimator.observe(running.fn, msg.elapsed)
            self._mark_slow(running)
        back = [t for t in (w.tasks.pop(i, None) for i in msg.task_ids) if t is not None]
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


    def _init_failed(self, w: _Worker | None, info: ErrorInfo) -> None:
        err = _error_from_info(info, "init_function", self.cfg.init_function)
        broken = ExecutorBrokenError(f"init_function failed in a worker: {err}")
        broken.__cause__ = err
        self._break(broken)

