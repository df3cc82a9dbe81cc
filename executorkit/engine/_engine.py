"""The engine put together: its four parts on one object, how it starts, how it breaks
and how it tears down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
import threading

from executorkit.engine._block import DEPTH, _BlockPool
from executorkit.engine._config import EngineConfig
from executorkit.engine._loop import _Loop
from executorkit.engine._status import StatusWriter
from executorkit.engine._tasks import _TaskFlow
from executorkit.engine._workers import _WorkerLife
from executorkit.errors import ExecutorBrokenError
from executorkit.scheduler import Scheduler


class Engine(_Loop, _TaskFlow, _WorkerLife, _BlockPool):
    """One per executor. The parts are mixins rather than separate objects so that the
    per-message path (read, finish, start, send) stays plain method calls on ``self``."""

    def __init__(self, config: EngineConfig) -> None:
        self.cfg = config
        self.launcher = config.launcher
        self.broken: BaseException | None = None
        self._closing = False
        self._init_tasks(config)
        self._init_workers(config)
        self._init_block(config)
        if config.block_workers:
            # DEPTH slots per worker: slot s belongs to worker s % workers. While calls are
            # tiny, several may wait in a worker's own queue (fewer round trips); otherwise
            # max_running keeps one call per worker so long calls backfill perfectly.
            self.sched = Scheduler(range(config.block_workers * DEPTH),
                                   max_running=config.block_workers)
        else:
            self.sched = Scheduler(config.cpus, config.gpus, max_running=config.max_running)
        self._init_loop(config)
        self.status = None if config.status_file is None else StatusWriter(
            config.status_file, self, executor=config.backend, cpus=len(config.cpus),
            gpus=len(config.gpus))

        self.launcher.start(self.address, self.secret)
        if hasattr(self.launcher, "on_exit"):  # launchers that watch their own processes
            self.launcher.on_exit = lambda exited: self.post(self._exited, exited)
        if hasattr(self.launcher, "on_dead"):
            self.launcher.on_dead = lambda code: self.post(self._launcher_died, code)
        self._start_thread()

    def resize(self, workers: int, *, cpus: tuple[int, ...] | None = None,
               real: bool = False) -> None:
        """``max_workers = workers``, applied on the engine thread before this returns (so
        calls that finish afterwards already see the new size). Block allocation: that many
        persistent workers on the CPU slots ``cpus``. Per-task processes: the pool becomes
        ``cpus`` if given, else at most ``workers`` calls run at once in the same pool.
        Raises ValueError, changing nothing, if a waiting call would not fit any more."""
        if self.broken is not None:
            raise ExecutorBrokenError(f"the executor is broken: {self.broken}")
        if self.cfg.block_workers:
            apply = functools.partial(self._resize_block, workers, cpus or self.cfg.cpus, real)
        else:
            apply = functools.partial(self._resize_tasks, workers, cpus, real)
        if threading.get_ident() == self._ident:  # from a done-callback: we are the engine
            apply()
            return
        applied = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                apply()
            except ValueError as exc:  # refused by the scheduler: the caller's error
                failed.append(exc)
            finally:
                applied.set()

        self.post(run)
        applied.wait()  # never hangs: a stopped engine runs late posts itself (see post)
        if failed:
            raise failed[0]

    def _resize_tasks(self, calls: int, cpus: tuple[int, ...] | None, real: bool) -> None:
        if cpus is None:
            self.sched.max_running = calls
            self._starts(self.sched.finish_none())
            return
        starts = self.sched.resize(cpus)  # first: it may refuse
        self.cfg = dataclasses.replace(self.cfg, cpus=cpus, real_cpus=real)
        self._slot_index = None
        self.sched.max_running = None
        self._starts(starts)

    def _begin_close(self) -> None:
        self._closing = True

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
        if self.status is not None:
            with contextlib.suppress(Exception):
                self.status.close()
        with contextlib.suppress(Exception):
            self.launcher.stop()
        self._close_io()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
