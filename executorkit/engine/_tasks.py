"""The task life cycle in the driver: submit, dependencies and cache look-ups, the queue of
the scheduler, start, finish (exactly once), cancel, and run_time_max deadlines.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import pickle
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any, cast

from executorkit import graph, retry
from executorkit._pickling import FunctionPickles, dumps_args
from executorkit._syspath import PathTracker
from executorkit.cache._hook import CacheHook
from executorkit.engine._config import EngineConfig
from executorkit.engine._failures import _describe_unpicklable, _log_failure, _rebuild_error
from executorkit.engine._records import (
    FINISHED,
    QUEUED,
    RUNNING,
    SENT,
    WAITING,
    TaskFuture,
    _Task,
    _Worker,
)
from executorkit.errors import ExecutorBrokenError, SerializationError, dependency_error
from executorkit.resources import Capabilities, Resources
from executorkit.scheduler import Demand, Start
from executorkit.transport import TaskDone

log = logging.getLogger("executorkit")


class _TaskFlow:
    """Mixin of :class:`~executorkit.engine._engine.Engine`: every task from submit to its
    completed future. ``submit``, ``shutdown`` and ``counts`` run in caller threads; the
    rest on the engine thread."""

    def _init_tasks(self, config: EngineConfig) -> None:
        self.tasks: dict[int, _Task] = {}
        self._ids = itertools.count(1)
        self._timers: list[tuple[float, int, _Task]] = []  # run_time_max deadlines (heap)
        self._counts = {"done": 0, "failed": 0, "cancelled": 0}
        self._submitted = 0
        self._running = 0
        self._pickle_ahead = False  # the turn's end pickles the next call (_pickle_next)
        self.progress = config.progress
        self._pickles = FunctionPickles()
        self._paths = PathTracker()
        self.cache = CacheHook(config.init_function)
        # retries: the resources each retried task was first submitted with, and the most
        # one attempt can be granted (escalation is capped there)
        self._first_res: dict[int, Resources] = {}
        worker = config.worker_res
        self._retry_caps = Capabilities(
            "engine", len(config.cpus), len(config.gpus),
            per_task_cpus=worker.cpus if config.block_workers else None,
            per_task_gpus=worker.gpus if config.block_workers else None)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
               res: Resources) -> TaskFuture:
        if self.broken is not None:
            raise ExecutorBrokenError(f"the executor is broken: {self.broken}") from self.broken
        self._submitted += 1
        task = _Task(self, next(self._ids), fn, args, kwargs, res)
        task.path_version = self._paths.current()
        deps = graph.find_futures(args, kwargs)
        if deps and self.cfg.disable_dependencies:
            raise ValueError(
                "a Future was passed as an argument but the executor was created with "
                "disable_dependencies=True; pass the result instead, or enable dependencies"
            )
        future = task.future
        assert future is not None
        try:
            if not self.cache.prepare(task, deps):
                task.state = FINISHED  # answered from the cache: no process at all
                task.release()
                return future
        except SerializationError as exc:
            future.set_exception(exc)
            task.state = FINISHED
            task.release()
            return future
        self.tasks[task.id] = task
        if deps:
            task.deps = deps
            task.deps_left = len(deps)
            for dep in deps:
                dep.add_done_callback(task.input_done)
        else:
            # Pickled when it starts, not now: a waiting call holds its arguments (often
            # one object shared by many calls), never bytes of its own.
            self.post(self._enqueue, task)
        return future


    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        if wait and self.on_engine_thread():
            raise RuntimeError(
                "shutdown(wait=True) was called on the executor's engine thread (from a "
                "future's done-callback?) and would wait for itself: use "
                "shutdown(wait=False) there, or shut down from another thread")
        if cancel_futures:
            # On the engine thread, after the submits already in the inbox: a call submitted
            # while a slot was free starts (as with the stdlib pools), the rest is cancelled.
            self.post(self._cancel_not_running)
        self.post(self._begin_close)
        if wait:
            try:
                self._stopped.wait()
            except KeyboardInterrupt:  # Ctrl-C while waiting for running calls: stop them
                self.terminate()
                raise
            self.thread.join()

    def terminate(self, timeout: float = 30.0) -> None:
        """Stop now (Ctrl-C): cancel every call, kill the running ones and every worker,
        and wait up to ``timeout`` seconds for the engine to be done with them."""
        self.post(self._terminate)
        if self.on_engine_thread():
            return
        try:
            self._stopped.wait(timeout)
        except KeyboardInterrupt:
            pass  # pressed again: the processes are being killed anyway, return at once

    def _terminate(self) -> None:
        self._closing = True
        for task in list(self.tasks.values()):
            if task.future is not None:
                task.future.cancel()
            self._finish(task, exc=CancelledError())
        for w in list(self.workers.values()):
            if not w.stopping:
                self._stop_worker(w)


    def _cancel_not_running(self) -> None:
        for task in list(self.tasks.values()):
            if task.state in (WAITING, QUEUED, SENT) and task.future is not None:
                task.future.cancel()


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


    def dep_done(self, task: _Task, fut: Future) -> None:
        if task.state != WAITING or task.future is None or task.future.done():
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
            task.release()
            return
        self._enqueue(task)


    def _fail_dependency(self, task: _Task, fut: Future, cause: BaseException) -> None:
        upstream = getattr(fut, "_task", None)
        what = f"task {upstream.id} ({upstream.name()})" if upstream else "future"
        # Catchable as the root failure's type too; names the root once (short messages
        # however long a failed chain is).
        self._finish(task, exc=dependency_error(task.name(), what, cause, future=fut))


    def _enqueue(self, task: _Task) -> None:
        if task.state != WAITING:
            return  # cancelled meanwhile
        if self.broken is not None:
            self._finish(task, exc=ExecutorBrokenError(f"the executor is broken: {self.broken}"))
            return
        task.state = QUEUED
        if self.status is not None:
            self.status.changed(task)
        if self.cfg.block_workers:
            if not self._block_started:  # workers start with the first call that needs one
                self._block_started = True
                self._learn_imports(task.fn)  # imported before the workers are forked
                self._start_block_workers()
            if not task.slow and not self._known_tiny(task.fn):
                self._mark_slow(task)
            demand = Demand(1)
        else:
            demand = Demand(task.res.cpus, task.res.gpus, task.res.exclusive)
        self._starts(self.sched.submit(task.id, demand, task.res.priority))
        self._pickle_ahead = True


    def _starts(self, starts: list[Start]) -> None:
        starts = list(starts)
        if starts:
            self._pickle_ahead = True  # (the next call to start may be another now)
        while starts:
            start = starts.pop(0)
            task = self.tasks.get(cast(int, start.task))
            if task is None:
                continue
            if task.payload is None and not self._pickle(task):
                starts += self.sched.finish(task.id)  # it never started: its slot goes on
                continue
            if task.cache_spec is not None and start.cpus:  # where it ran, for reports
                slot = start.cpus[0]  # (block allocation: slot s is worker s % workers)
                workers = self.cfg.block_workers
                task.cache_spec.slot = slot % workers if workers else slot
            if task.res.run_time_max is not None:
                task.deadline = time.monotonic() + task.res.run_time_max
                heapq.heappush(self._timers, (task.deadline, task.id, task))
            if self.cfg.block_workers:
                self._run_on_block_worker(task)  # RUNNING, or SENT behind other calls
            else:
                self._now_running(task)
                self._spawn_task(task, start)


    def _pickle(self, task: _Task) -> bool:
        """Pickle the call of ``task``; False if it cannot be (its future has failed)."""
        try:
            task.payload = self._dumps_call(task.fn, task.args, task.kwargs)
        except SerializationError as exc:
            self._finish(task, exc=exc)
            return False
        if self.cfg.block_workers:
            self._sized(task.payload)
        return True

    def _pickle_next(self) -> None:
        """At the end of a turn, pickle the call that is to start next, so the hand-over of a
        freed CPU slot does not wait for that (a tenth of a per-task hand-over, measured).
        One call at a time: the bytes held for waiting calls stay bounded."""
        self._pickle_ahead = False
        task = self.tasks.get(cast(int, self.sched.peek()))
        if task is not None and task.payload is None and task.state == QUEUED:
            self._pickle(task)


    def _now_running(self, task: _Task) -> None:
        task.state = RUNNING
        task.started = time.time()
        self._running += 1
        if self.status is not None:
            self.status.changed(task)


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
            own = msg.elapsed if msg.elapsed >= 0 else msg.finished - msg.started
            self._call_pace += 0.25 * (own - self._call_pace)
            self._starts(self.sched.finish(task.id))
        elif w is not None and w.persistent:
            self._observe_runtime(task, msg)
            if msg.next_task:
                self._queued_started(w, msg.next_task)
            self._starts(self.sched.finish(task.id))
            if self._retired:
                self._stop_if_retired(w)
        tiny = self._slow_active == 0
        if self._dirty and not (w is not None and w.persistent and tiny):
            self._flush()  # (tiny calls: keep batching, the turn's end flushes once)
        if w is not None and w.lingers:
            # It waits for its shutdown to exit; that comes at the turn's end (see
            # _release_lingering), after this future is complete.
            self._lingering.append(w)
        if msg.ok:
            self._finish(task, payload=msg.payload)
        else:
            self._finish(task, exc=_rebuild_error(msg.payload, task))


    def _finish(self, task: _Task, *, payload: bytes | None = None,
                exc: BaseException | None = None) -> None:
        """Complete a task's future (exactly once) and forget the task."""
        if task.state == FINISHED:
            return
        if exc is not None and task.state == RUNNING and self._retry(task, exc):
            return
        was_queued = task.state == QUEUED
        if task.state == RUNNING:
            self._running -= 1
        if self._no_longer_slow(task):
            self.post(self._start_more)
        task.state = FINISHED
        self.tasks.pop(task.id, None)
        if was_queued:
            self.sched.withdraw(task.id)
        fut = task.future
        outcome = None  # (what the future says, unless it was cancelled meanwhile)
        if exc is None:
            try:
                value = pickle.loads(payload)  # type: ignore[arg-type]
            except BaseException as err:
                exc = SerializationError(
                    f"the result of {task.name()} could not be unpickled in the driver: "
                    f"{type(err).__name__}: {err}")
                exc.__cause__ = err
            else:
                if _settle(fut.set_result, value, task):
                    self._counts["done"] += 1
                    outcome = ("done", None)
        if exc is not None:
            if task.res.error_log_file and not fut.cancelled():
                _log_failure(task, exc)
            if _settle(fut.set_exception, exc, task):
                self._counts["failed"] += 1
        task.release(outcome)
        if self.status is not None:
            self.status.changed(task)
        if self.progress is not None:
            self.progress.update(self.counts())


    def _no_longer_slow(self, task: _Task) -> bool:
        """Stop counting ``task`` among the block-mode calls not known to be tiny; True
        when that was the last one (workers may queue calls again)."""
        if not task.slow:
            return False
        task.slow = False
        self._slow_active -= 1
        if self._slow_active:
            return False
        self._set_depth()
        return True

    def _retry(self, task: _Task, exc: BaseException) -> bool:
        """A running attempt failed: queue it again with escalated resources (True), or
        let it fail with every attempt's reason (False). See executorkit.retry."""
        if task.future.cancelled():
            self.cache.attempt_ended(task, exc, final=True)
            return False
        failures = task.failures = [*(task.failures or ()), exc]
        first = task.res if len(failures) == 1 else self._first_res[task.id]
        decision = retry.next_attempt(first, failures, self._retry_caps)
        self.cache.attempt_ended(task, exc, final=decision.res is None)
        if decision.res is None:
            self._first_res.pop(task.id, None)
            retry.exhausted_error(failures)  # adds every attempt's reason to exc
            return False
        self._first_res.setdefault(task.id, first)
        log.info("task %d (%s): %s", task.id, task.name(), decision.reason)
        self._running -= 1
        self._no_longer_slow(task)
        task.state, task.res, task.worker = WAITING, decision.res, None
        if task.cache_spec is not None:  # the record says what the attempt ran with
            task.cache_spec = dataclasses.replace(task.cache_spec,
                                                  resource_dict=decision.res.as_dict())
        task.deadline, task.timed_out = None, False
        if self.status is not None:
            self.status.changed(task)
        # Posted: the caller frees the failed attempt's resources after this returns.
        self.post(self._enqueue, task)
        return True

    def cancelled(self, task: _Task, future: Future) -> None:
        """The user cancelled the task's future (it is already CANCELLED)."""
        if task.cancel_seen:
            return  # cancel() called again: nothing more to do
        task.cancel_seen = True
        # Only this moves CANCELLED to CANCELLED_AND_NOTIFIED and wakes the stdlib's
        # wait() and as_completed(), which otherwise never count the future as done.
        future.set_running_or_notify_cancel()
        self._counts["cancelled"] += 1
        state = task.state
        if state in (WAITING, QUEUED):
            self._finish(task, exc=CancelledError())
        elif state == SENT:
            self._cancel_queued(task)  # the worker drops it before it starts
        elif state == RUNNING and task.worker is not None:
            self._stop_worker(task.worker, task)


    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            deadline, _, task = heapq.heappop(self._timers)
            w = task.worker
            if task.state not in (RUNNING, SENT) or w is None or task.deadline != deadline:
                continue  # finished, or an old entry of a call that was queued again
            if task.state == SENT or (w.chan is None and not w.direct) \
                    or next(iter(w.tasks), None) != task.id:
                # not started yet (worker still starting, or earlier calls ahead of it)
                task.deadline = now + (task.res.run_time_max or 0.0)
                heapq.heappush(self._timers, (task.deadline, task.id, task))
                continue
            task.timed_out = True
            self._stop_worker(w, task)


    def _start_more(self) -> None:
        self._starts(self.sched.finish_none())


def _settle(complete: Callable[[Any], None], outcome: Any, task: _Task) -> bool:
    """Complete a task's future; False if it was done already (cancelled by the user)."""
    try:
        complete(outcome)
    except InvalidStateError:
        return False
    except BaseException:
        # The stdlib logs an Exception raised by a done-callback but lets a BaseException
        # (sys.exit() in a callback) through: here it would break the whole executor.
        log.exception("a done-callback of task %d (%s) raised", task.id, task.name())
    return True
