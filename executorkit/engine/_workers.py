"""The life of a per-task worker process: spawn it (or hand the call to a warm spare), its
environment, CPU pinning and MPI ranks, then its exit and the error its call fails with.

Block-allocation workers are started in ``_block.py``; their exits are finalized here too.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import tempfile
import time
from collections import deque

from executorkit._pickling import _by_reference, imports_of
from executorkit.command import PREFIX_VARIABLE, CommandCall
from executorkit.engine._config import EngineConfig
from executorkit.engine._failures import _error_from_info
from executorkit.engine._records import RUNNING, _Task, _Worker
from executorkit.errors import (
    ExecutorBrokenError,
    TaskTimeoutError,
    WorkerDiedError,
    describe_exit,
)
from executorkit.launchers.local import LocalLauncher, program_outcome
from executorkit.resources import Resources
from executorkit.scheduler import Start
from executorkit.transport import (
    ErrorInfo,
    Exited,
    Preload,
    RunTask,
    Spawn,
    SpawnFailed,
    Stop,
    TaskSetup,
)
from executorkit.worker._shm import discard_worker_dir

THREAD_VARIABLES = (
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS", "BLIS_NUM_THREADS",
)
REPLENISH_DELAY = 0.005  # seconds between a spare taking a call and forking its successor
# Per-task calls shorter than this (smoothed), with calls waiting: a new spare gets its call
# about as soon as it is up, so it skips the probe call (see forkserver._probe_call).
PROBE_WORTH = 0.005
FUNCTIONS_KEPT = 256  # distinct function pickles an executor has the fork server unpickle
FUNCTION_BYTES = 1 << 20  # and the largest (a function holding big data is rebuilt per call)


class _WorkerLife:
    """Mixin of :class:`~executorkit.engine._engine.Engine`: worker processes, on the engine
    thread."""

    _slot_index: dict[int, int] | None = None  # CPU slot id -> its position in the pool

    def _init_workers(self, config: EngineConfig) -> None:
        self.workers: dict[int, _Worker] = {}
        self._worker_ids = itertools.count(1)
        # Per-task mode keeps warm spares: forked, connected, waiting for their one call.
        self._spares: deque[_Worker] = deque()
        self._spares_coming = 0
        self._spare_target = 0 if config.block_workers else min(2, len(config.cpus))
        self._replenish_due: float | None = None
        self._call_pace = PROBE_WORTH  # smoothed duration of recent per-task calls, seconds
        # what a spare sets while idle: the environment of a default one-CPU call
        self._spare_env = dict(self._task_env(config.worker_res, 1, (), 0))
        self._tmp: str | None = None  # private directory for MPI workers, made on demand
        # Modules the fork server imports before forking (preload= and learned ones)
        self._forks_warm = isinstance(config.launcher, LocalLauncher)
        self._preload_queue: list[str] = list(config.preload) if self._forks_warm else []
        self._preloaded: set[str] = set(config.preload)
        self._imports_seen: set[object] = set()  # code objects whose imports were learned
        self._functions_seen: set[bytes] = set()  # function pickles looked at (_learn_function)
        self._thread_env_fixed = False  # a Preload fixed the fork server's thread variables

    def _spawn(self, spawn: Spawn, w: _Worker) -> None:
        """Start ``w``. A launcher that hands ``spawn.path`` to its workers says so
        (``carries_path``): its workers start with the driver's sys.path as it is now;
        with any other, ``w`` gets the path with its first call."""
        version, spawn.path = self._paths.state
        if getattr(self.launcher, "carries_path", False):
            w.path_version = version
        if self._preload_queue:
            self._send_preload(keep=spawn.worker_id)
        self.launcher.spawn(spawn)
        if not self._output_registered:
            self._watch_output()

    def _learn_imports(self, fn: object) -> None:
        """Have the fork server import what ``fn`` needs, so the next workers start with it
        (a call of a numpy-using function then costs what a tiny call costs)."""
        if not self._forks_warm:
            return
        code = getattr(getattr(fn, "__func__", fn), "__code__", None)
        if code is None or code in self._imports_seen:
            return
        if len(self._imports_seen) < 4096:
            self._imports_seen.add(code)
        new = [m for m in imports_of(fn) if m not in self._preloaded]
        if new:
            self._preloaded.update(new)
            self._preload_queue += new
            if self.launcher.started:
                self._send_preload(keep=None)

    def _learn_function(self, task: _Task) -> None:
        """Have the fork server unpickle a function sent by value (a script's, a notebook's)
        once, into its workers' function cache: each worker forked after it finds the
        function there instead of rebuilding it on the hand-over (a third of a millisecond
        here). Functions sent by name are left alone: importing is the preload's business."""
        if not self._forks_warm or task.payload is None or not self.launcher.started:
            return
        blob = task.payload[0]
        if blob in self._functions_seen or len(self._functions_seen) >= FUNCTIONS_KEPT:
            return
        self._functions_seen.add(blob)
        fn = getattr(task.fn, "__func__", task.fn)
        if len(blob) <= FUNCTION_BYTES and not _by_reference(fn):
            self.launcher.import_modules(Preload((), (), (blob,)))

    def _send_preload(self, keep: int | None) -> None:
        """Send the queued Preload; spares forked before it (but ``keep``) are replaced."""
        modules, self._preload_queue = tuple(self._preload_queue), []
        threads = tuple((k, v) for k, v in self._spare_env.items() if k in THREAD_VARIABLES)
        self.launcher.import_modules(Preload(modules, threads))
        self._thread_env_fixed = True
        stale = [w for w in self.workers.values() if w.spare and w.id != keep]
        for w in stale:
            w.spare = False  # no longer handed a call; its exit is a plain one
            if w in self._spares:
                self._spares.remove(w)
            else:
                self._spares_coming -= 1
            self._stop_worker(w)
        if stale:
            self._replenish()

    def _spare_fits(self, ranks: int, env: tuple) -> bool:
        """A warm spare can take a one-rank call, unless preloaded libraries were sized for
        other thread variables than the call's (then a new worker starts fresh)."""
        if ranks != 1 or not self._spares:
            return False
        if not self._thread_env_fixed:
            return True
        base = self._spare_env
        return all(base.get(k) == v for k, v in env if k in THREAD_VARIABLES)

    def _spawn_task(self, task: _Task, start: Start) -> None:
        self._learn_imports(task.fn)
        self._learn_function(task)
        env = self._task_env(task.res, len(start.cpus), start.gpus, self._slot_of(start.cpus))
        cpus = self._pin(start.cpus)
        # A program (executorkit.command) runs in one worker holding all its CPUs and is
        # itself started as the MPI job, through the launcher's prefix: no Python ranks.
        program = getattr(task.fn, "__executorkit_program__", False)
        if (program and getattr(self.launcher, "runs_programs", False)
                and isinstance(task.args[0], CommandCall)):
            self._spawn_program(task, env, cpus)
            return
        ranks = 1 if program else task.res.cores
        if program:
            prefix_of = getattr(self.launcher, "program_prefix", None)
            prefix = prefix_of(task.res) if prefix_of is not None else ()
            env = (*env, (PREFIX_VARIABLE, json.dumps(list(prefix))))
        if self._spare_fits(ranks, env):
            # A warm spare takes the call: no fork on the critical path. One started for
            # this CPU slot is already pinned there with the slot's worker id.
            w = self._take_spare(start.cpus)
            w.spare = False
            # The spare already has its environment: send only what differs.
            base = w.env if w.env is not None else self._spare_env
            changed = tuple((k, v) for k, v in env if base.get(k) != v)
            names = {k for k, _ in env}
            unset = tuple(k for k in base if k not in names)
            pin = None if cpus == self._pin(w.pinned or ()) else cpus
            setup = TaskSetup(task.res.cwd, changed, unset, pin)
            self._assign(w, task, self._run_message(w, task, setup))
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
        spawn = Spawn(w.id, env, task.res.cwd, cpus, persistent=False, res=task.res,
                      program=program)
        self._mpi(w, spawn, ranks)
        self._spawn(spawn, w)  # (before the call: the worker starts with the current path)
        self._assign(w, task, self._run_message(w, task, None))
        self._replenish()


    def _spawn_program(self, task: _Task, env: tuple, cpus: tuple[int, ...] | None) -> None:
        """The launcher runs the program itself (Flux: a job of the program, its ranks
        its tasks): no Python worker, no connection; its outcome comes with its exit."""
        w = _Worker(next(self._worker_ids), persistent=False)
        w.direct = True
        self.workers[w.id] = w
        w.tasks[task.id] = task
        w.held = task.id
        task.worker = w
        self._spawn(Spawn(w.id, env, task.res.cwd, cpus, persistent=False, res=task.res,
                          program=True, call=task.args[0], task_id=task.id), w)

    def _run_message(self, w: _Worker, task: _Task, setup: TaskSetup | None) -> RunTask:
        """The call for worker ``w``, with the driver's sys.path if ``w``'s is older. The
        task lets go of its bytes: the frame holds them until sent (a call queued again
        after its worker died is pickled again)."""
        assert task.payload is not None, "a task is serialized before it starts"
        fn_blob, args_blob = task.payload
        task.payload = None
        path = None
        if w.path_version < task.path_version:
            w.path_version, path = self._paths.state
        return RunTask(task.id, fn_blob, args_blob, setup, task.cache_spec, path)


    def _assign(self, w: _Worker, task: _Task, run: RunTask) -> None:
        w.tasks[task.id] = task
        w.held = task.id
        task.worker = w
        self._send(w, run)


    def _replenish(self) -> None:
        """Keep ``_spare_target`` warm per-task workers forked and connected, each for a CPU
        slot that has none yet (in pool order), pinned there and with that slot's worker
        id: a call that starts on the slot then changes neither (pinning a running worker
        to another CPU costs it a migration, a third of a millisecond here)."""
        if not isinstance(self.launcher, LocalLauncher):
            return  # only a fork server makes spares cheap
        while (not self._closing and
               len(self._spares) + self._spares_coming < self._spare_target):
            w = _Worker(next(self._worker_ids), persistent=False)
            w.spare = True
            slot = self._spare_slot()
            env = self._spare_env
            if slot is not None:
                env = {**env, "EXECUTORKIT_WORKER_ID": str(self._slot_of(slot))}
            w.pinned, w.env = slot, env
            self.workers[w.id] = w
            self._spares_coming += 1
            # A spare idle until its call faults in that call's pages meanwhile (a probe
            # call). With tiny calls waiting, its call comes at once: the probe would only
            # cost CPU that the calls need (5 % of tiny calls per second, measured).
            probe = not (self.sched.waiting and self._call_pace < PROBE_WORTH)
            self._spawn(Spawn(w.id, tuple(env.items()), None, self._pin(slot or ()) or None,
                              persistent=False, spare=True, probe=probe), w)

    def _spare_slot(self) -> tuple[int, ...] | None:
        """The first one-CPU slot of the pool no spare is kept for (None: all have one)."""
        covered = {w.pinned for w in self.workers.values() if w.spare}
        for cpu in self.cfg.cpus:
            if (cpu,) not in covered:
                return (cpu,)
        return None

    def _take_spare(self, cpus: tuple[int, ...]) -> _Worker:
        """The spare kept for ``cpus`` if there is one, else the longest waiting."""
        for w in self._spares:
            if w.pinned == cpus:
                self._spares.remove(w)
                return w
        return self._spares.popleft()


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


    def _slot_of(self, cpus: tuple[int, ...]) -> int:
        """Per-task worker id (``executorlib_worker_id``): the call's lowest pool slot."""
        index = self._slot_index
        if index is None:
            index = self._slot_index = {cpu: i for i, cpu in enumerate(self.cfg.cpus)}
        return min((index.get(c, 0) for c in cpus), default=0)

    def _task_env(self, res: Resources, ncpus: int, gpus: tuple[int, ...],
                  worker_id: int) -> tuple:
        threads = str(res.threads_per_core)
        env = dict.fromkeys(THREAD_VARIABLES, threads)
        if gpus or self.cfg.gpus:
            env[self.cfg.gpu_variable] = ",".join(map(str, gpus))
        env["EXECUTORKIT_CPUS"] = str(ncpus)
        env["EXECUTORKIT_GPUS"] = ",".join(map(str, gpus))
        env["EXECUTORKIT_WORKER_ID"] = str(worker_id)
        env.update(res.env)  # the user's explicit variables win
        return tuple(env.items())


    def _pin(self, slots: tuple[int, ...]) -> tuple[int, ...] | None:
        return slots if self.cfg.real_cpus else None


    def _stop_worker(self, w: _Worker, task: _Task | None = None) -> None:
        """Kill ``w`` (for ``task``: a cancelled or timed-out call it runs, or is about to)."""
        w.stopping = True
        if task is not None:
            w.stop_for = task.id
        self.launcher.kill(w.id)


    def _exited(self, msg: Exited) -> None:
        w = self.workers.get(msg.worker_id)
        if w is None:
            return
        w.exit_status = msg.status
        w.pid = w.pid or msg.pid
        if msg.program is not None:  # a program the fork server ran: read its outcome here
            msg.done = program_outcome(msg.program, msg.status)
        if msg.done is not None and msg.done.task_id in w.tasks:  # a program run directly
            task = w.tasks[msg.done.task_id]
            if task.cache_spec is not None and task.payload is not None:
                # recorded here, as its worker would have (the call was never sent: its
                # bytes are still the task's)
                run = RunTask(task.id, *task.payload, None, task.cache_spec)
                self.cache.record_outcome(task.cache_spec, run, msg.done)
            self._task_done(w, msg.done)
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
        if tasks and w.persistent and (w.chan is None or tasks[0].state != RUNNING
                                       or w.stop_for not in (None, tasks[0].id)):
            # It never ran any of them; or it was killed for a call that was done before
            # the kill took effect, and the call running then is no more to blame than
            # those queued behind it: all of them run again.
            tasks.insert(0, None)  # type: ignore[arg-type]
        elif tasks:  # the first was running: it fails; the others never started
            if w.errdir and _rank_error(w.errdir, tasks[0].id) is not None:
                w.stopping = True  # an MPI rank raised: the call failed, not the worker
            self._finish(tasks[0], exc=self._death_error(w, tasks[0], reason))
        if w.errdir is not None:  # an MPI job: what a killed one leaves behind goes too
            discard_worker_dir(w.errdir)
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
            return _error_from_info(reported, task.name(), task.fn)
        status = w.exit_status if w.exit_status is not None else -1
        how, code, signum = describe_exit(status)
        where = f"pid {w.pid} on {w.host}" if w.pid else "its process"
        text = reason or f"the process running {task.name()} ({where}) {how}"
        return WorkerDiedError(text, exitcode=code, signum=signum, host=w.host, pid=w.pid)


    def _launcher_died(self, code: int) -> None:
        if self._closing and not self.tasks and not self.workers:
            return  # the normal end
        how, _, _ = describe_exit(code)
        self._break(ExecutorBrokenError(f"the fork server {how}"))


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

