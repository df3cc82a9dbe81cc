"""Start worker processes as Flux jobs in a running Flux instance (``flux.job``).

Every worker is one Flux job: a per-task worker runs one call, a block-allocation worker
serves many. The jobspec carries the call's resources (:func:`jobspec_for`, tested as
data); the worker finds the driver through a private boot file (mode 0600), never through
its command line, and connects back over the authenticated channel like any worker.

Threads::

    engine thread                     flux thread (owns the flux handle and its reactor)
    -------------                     --------------------------------------------------
    spawn() / kill() / stop()  --->   requests deque + wake pipe (an fd watcher)
                                        submit_async -> job id -> event_watch_async
                                        "exception" / "finish" / "clean" events
    engine.post(Exited)        <---   job ended: exit status and, if it failed, Flux's reason

A Flux handle is not thread-safe, so only the flux thread touches it; the engine thread
only appends requests and writes one byte to the pipe. Job ends are learnt from the job's
eventlog as Flux publishes it: nothing polls.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from executorkit.errors import ResourceError, describe_exit

# one way to find the bindings, one error for a missing Flux (shared with FluxClusterExecutor)
from executorkit.launchers.flux_batch import FluxUnavailableError, import_flux
from executorkit.launchers.flux_program import (
    ProgramRun,
    io_options,
    prepare_program,
    program_outcome,
    read_output,
    start_failure,
)
from executorkit.resources import Resources
from executorkit.transport import (
    BlockingChannel,
    Exited,
    Hello,
    Spawn,
    TaskSetup,
    encode,
)

log = logging.getLogger("executorkit")

GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")
# Flux's own time limit is a backstop (a driver that died cannot stop its jobs); the
# engine's timer stops a call at run_time_max and reports the usual TaskTimeoutError.
DURATION_GRACE = 5.0
WARM_IDLE = 2.0  # seconds a warm job without a call keeps its core
STDERR_TAIL = 2000  # characters of a failed job's stderr quoted in its error


def open_handle(uri: str | None) -> Any:
    """A handle on the instance at ``uri`` (default: ``FLUX_URI``), or a clear error."""
    uri = uri or os.environ.get("FLUX_URI")
    if not uri:
        raise FluxUnavailableError(
            "FluxJobExecutor runs inside a Flux instance, but no Flux broker is reachable "
            "(FLUX_URI is not set): start one "
            "(flux start python script.py, flux alloc -N2 ..., flux batch ...), or pass "
            "flux_executor=flux.job.FluxExecutor(...) / use FluxClusterExecutor from outside")
    flux = import_flux()
    try:
        return flux.Flux(uri)
    except OSError as exc:
        raise FluxUnavailableError(f"cannot connect to the Flux instance at {uri}: {exc}") from exc


@dataclass(frozen=True)
class InstancePool:
    """The resources of a Flux instance (``flux resource list``: the ones up)."""

    cores: int
    nodes: int
    gpus: int
    cores_per_node: int  # of the smallest node
    owner: bool  # whether this user owns the instance (may raise urgency above 16)


def instance_pool(handle: Any) -> InstancePool:
    import flux.resource

    up = flux.resource.resource_list(handle).get().up
    per_node = [up.copy_ranks(rank).ncores for rank in up.ranks]
    try:
        owner = int(handle.attr_get("security.owner")) == os.getuid()
    except (OSError, ValueError):
        owner = False
    return InstancePool(up.ncores, up.nnodes, up.ngpus, min(per_node or [0]), owner)


# ------------------------------------------------------------------- jobspecs
def urgency(priority: int, *, owner: bool) -> int:
    """Flux urgency for an executorkit priority: 16 (Flux's default) + priority, within
    1..31 for the instance owner and 1..16 for guests (0 would hold the job)."""
    return max(1, min(31 if owner else 16, 16 + priority))


def jobspec_for(res: Resources, command: list[str], *, cwd: str, env: Mapping[str, str],
                options: Mapping[str, Any], nest: str | None = None,
                cores_per_node: int = 0) -> Any:
    """The jobspec that runs ``command`` with the resources of ``res``.

    ``cores`` -> tasks, ``threads_per_core`` -> cores per task, ``gpus_per_core`` -> GPUs
    per task, ``num_nodes``/``exclusive`` as they are, ``run_time_max`` -> duration.
    ``nest``: the path of ``flux``; the command then runs as the initial program of a nested
    instance of that size (``flux_executor_nesting``), one process.
    ``options``: shell options (``pmi``, ``gpu-affinity``, ``output.*``).
    ``exclusive`` without ``num_nodes`` takes as few whole nodes (of ``cores_per_node``
    cores) as hold the call; Flux itself only knows exclusive with a node count.
    """
    from flux.job import JobspecV1

    gpus = res.gpus_per_core or None
    nodes = res.num_nodes
    if res.exclusive and nodes is None:
        nodes = min(res.cores, -(-res.cpus // max(cores_per_node, 1)))
    if nest is not None:
        spec = JobspecV1.from_command(
            [nest, "broker", *command], num_tasks=res.cores, cores_per_task=res.threads_per_core,
            gpus_per_task=gpus, num_nodes=nodes, exclusive=res.exclusive)
        # as `flux alloc` does: one broker per node, no PMI of the parent's, no exit timeout
        spec.setattr_shell_option("per-resource.type", "node")
        spec.setattr_shell_option("mpi", "none")
        spec.setattr_shell_option("exit-timeout", "none")
    else:
        spec = JobspecV1.from_command(
            command, num_tasks=res.cores, cores_per_task=res.threads_per_core,
            gpus_per_task=gpus, num_nodes=nodes, exclusive=res.exclusive)
    spec.cwd = cwd
    spec.environment = dict(env)
    if res.run_time_max is not None:
        spec.duration = res.run_time_max + DURATION_GRACE
    for key, value in options.items():
        spec.setattr_shell_option(key, value)
    return spec


def job_failure(jobid: str, status: int | None, exception: tuple[str, str] | None,
                stderr: str) -> str:
    """Words for a job that ended without its result: how, Flux's reason, its stderr tail."""
    if exception is not None:
        kind, note = exception
        how = f"was stopped by Flux (job exception type={kind}: {note})"
        if status is not None and status != 0:
            how += f" and {describe_exit(status)[0]}"
    elif status is not None:
        how = describe_exit(status)[0]
    else:
        how = "ended without a finish event"
    text = f"Flux job {jobid} {how}"
    tail = stderr.strip()[-STDERR_TAIL:]
    if tail:
        text += f"; its stderr ends with:\n{tail}"
    return text


def wait_status(status: int) -> int:
    """A ``waitpid`` status (Flux's finish event) as ``subprocess`` reports it.

    The job shell reports a task killed by signal N as exit code 128 + N, as shells do;
    that is read back as the signal, so a segfault says SIGSEGV on Flux too.
    """
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if 128 < code < 128 + signal.NSIG:
            return -(code - 128)
        return code
    return status


# ------------------------------------------------------------------- the launcher
@dataclass
class _Job:
    worker_id: int
    spec: Any
    urgency: int
    files: tuple[str, str]  # stdout, stderr
    keep_files: bool
    jobid: Any = None
    kill: int | None = None  # a signal asked for before the job id was known
    exception: tuple[str, str] | None = None
    status: int | None = None
    submit_future: Any = None  # referenced so the flux future lives until its callback
    watch: Any = None
    ended: bool = False
    started: bool = False  # the "start" event came (the job holds its cores)
    warm: bool = False  # a warm job: started before its call (worker_id < 0 until assigned)
    sock: Any = None  # a warm job's connection while it waits for its call
    due: Spawn | None = None  # the call's identity, sent when the warm job says hello
    timer: Any = None  # a warm job's idle timer
    program: ProgramRun | None = None  # a program run as the job itself (no worker)
    task_id: int = 0  # the program's call
    times: tuple[float, float] = (0.0, 0.0)  # the "start" and "finish" events' timestamps


class FluxLauncher:
    """Runs workers as Flux jobs. ``spawn``/``kill``/``stop`` are called on the engine thread.

    ``log_dir``: keep each job's stdout/stderr there as ``flux-JOBID.out``/``.err``
    (``flux_log_files``); otherwise they go to private files that are copied to the
    driver's stdout/stderr when the job ends and then removed.
    """

    name = "flux"
    chan = None  # no fork server
    runs_programs = True  # a Command's program is the job itself (Spawn.call)
    stdout_fd: int | None = None
    stderr_fd: int | None = None
    GRACE = 10.0  # seconds stop() waits for cancelled jobs to end

    def __init__(self, *, uri: str | None, pool: InstancePool, pmi_mode: str | None = None,
                 nesting: bool = False, log_dir: str | None = None,
                 tmp_dir: str | None = None, warm: int = 0) -> None:
        self._uri = uri or os.environ.get("FLUX_URI")
        self._pool = pool
        self._pmi_mode = pmi_mode
        self._nest = (shutil.which("flux") or "flux") if nesting else None
        self._log_dir = log_dir
        self._tmp_base = tmp_dir
        self._python = sys.executable  # the interpreter jobs run (absolute: see FACTS)
        self._dir: str | None = None
        self._boot: dict[str, object] = {}
        self._thread: _FluxThread | None = None
        self._warm = 0 if nesting else warm
        self._warm_ids = itertools.count(1)
        self.on_exit: Callable[[Exited], None] | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, address: tuple[str, int], secret: bytes) -> None:
        self._boot = {"address": address, "secret": secret}

    def attach(self, chan: object) -> None:  # pragma: no cover - never called for flux
        raise AssertionError("flux workers have no fork server")

    def spawn(self, spawn: Spawn) -> None:
        if self._thread is None:
            base = self._tmp_base or tempfile.gettempdir()
            os.makedirs(base, mode=0o700, exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix="flux-", dir=base)
            self._thread = _FluxThread(self._uri, self._ended, warm=self._warm,
                                       make_warm=self._warm_job, make_job=self._job,
                                       secret=self._boot["secret"],  # type: ignore[arg-type]
                                       near=self._boot["address"])  # type: ignore[arg-type]
            self._thread.start()
        if spawn.call is not None:
            self._submit_built(spawn, self._program_job)
            return
        if self._warm and self._plain_call(spawn):
            self._thread.request(("assign", (spawn, self._worker_spawn(spawn))))
            return
        self._submit_built(spawn, self._job)

    def _submit_built(self, spawn: Spawn, build: Callable[[Spawn], _Job]) -> None:
        assert self._thread is not None
        try:
            job = build(spawn)
        except Exception as exc:  # never let a bad request break the engine thread
            if self.on_exit is not None:
                self.on_exit(Exited(spawn.worker_id, 0, 1,
                                    f"could not build the Flux job: {type(exc).__name__}: {exc}"))
            return
        self._thread.request(("submit", job))

    @staticmethod
    def _plain_call(spawn: Spawn) -> bool:
        """A call a warm job can take: one core, nothing Flux must know about beforehand
        (a priority, a time limit, GPUs, nodes) and no MPI ranks."""
        res: Resources = spawn.res or Resources()
        return (not spawn.persistent and spawn.init_payload is None and spawn.errdir is None
                and res.cpus == 1 and res.gpus == 0 and res.num_nodes is None
                and not res.exclusive and res.run_time_max is None and res.priority == 0)

    def _worker_spawn(self, spawn: Spawn) -> Spawn:
        """What a warm job needs to become the worker: its id, environment and cwd."""
        env = self._environment(spawn)
        changed = tuple((k, v) for k, v in env.items() if os.environ.get(k) != v)
        return Spawn(spawn.worker_id, changed, spawn.cwd, None, persistent=False)

    def _warm_job(self, launcher: tuple[str, int]) -> _Job:
        """A one-core job that starts the worker ahead of its call (on the flux thread)."""
        assert self._dir is not None
        warm_id = -next(self._warm_ids)
        where = os.path.join(self._dir, f"warm{warm_id}")
        os.makedirs(where, mode=0o700, exist_ok=True)
        bootfile = os.path.join(where, "boot.pkl")
        boot = {**self._boot, "launcher": launcher, "warm_id": warm_id}
        fd = os.open(bootfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(boot, fh)
        stem = os.path.join(self._log_dir or where, f"{os.path.basename(self._dir)}-warm{warm_id}")
        files = (f"{stem}.out", f"{stem}.err")
        options = {"output.stdout.type": "file", "output.stderr.type": "file",
                   "output.stdout.path": files[0], "output.stderr.path": files[1]}
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        spec = jobspec_for(Resources(), [self._python, "-m", "executorkit.worker.flux_warm",
                                         bootfile], cwd=os.getcwd(), env=env, options=options)
        return _Job(warm_id, spec, 16, files, keep_files=self._log_dir is not None, warm=True)

    def _job(self, spawn: Spawn) -> _Job:
        assert self._dir is not None
        res: Resources = spawn.res or Resources()
        errdir = spawn.errdir or os.path.join(self._dir, f"worker-{spawn.worker_id}")
        os.makedirs(errdir, mode=0o700, exist_ok=True)
        bootfile = os.path.join(errdir, "boot.pkl")
        boot = {**self._boot, "worker_id": spawn.worker_id, "persistent": spawn.persistent,
                "init_payload": spawn.init_payload, "errdir": errdir,
                "setup": TaskSetup(cwd=spawn.cwd) if spawn.cwd else None}
        fd = os.open(bootfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(boot, fh)
        parallel = res.cores > 1 and self._nest is None
        module = "executorkit.worker.mpi" if parallel else "executorkit.worker.loop"
        command = [self._python, "-m", module, bootfile]
        env = self._environment(spawn)
        options: dict[str, Any] = {}
        if self._pmi_mode:
            options["pmi"] = self._pmi_mode
        if any(k in dict(res.env) for k in GPU_VARIABLES):
            options["gpu-affinity"] = "off"  # the user pinned GPUs explicitly
        where = self._log_dir or errdir
        stem = f"{os.path.basename(self._dir)}-worker-{spawn.worker_id}"  # unique while it runs
        files = (os.path.join(where, f"{stem}.out"), os.path.join(where, f"{stem}.err"))
        options["output.stdout.type"] = options["output.stderr.type"] = "file"
        options["output.stdout.path"], options["output.stderr.path"] = files
        # The job starts in the call's cwd when it exists; else the worker creates it
        cwd = spawn.cwd if spawn.cwd and os.path.isdir(spawn.cwd) else os.getcwd()
        spec = jobspec_for(res, command, cwd=cwd, env=env, options=options, nest=self._nest,
                           cores_per_node=self._pool.cores_per_node)
        return _Job(spawn.worker_id, spec, urgency(res.priority, owner=self._pool.owner),
                    files, keep_files=self._log_dir is not None)

    def _program_job(self, spawn: Spawn) -> _Job:
        """A job whose tasks are the program itself: ``cores`` tasks (MPI ranks through
        the job shell's PMI), ``threads_per_core`` cores each, its files in the call's cwd."""
        assert self._dir is not None
        res: Resources = spawn.res or Resources()
        run = prepare_program(spawn.call, spawn.cwd or os.getcwd(), self._dir)
        options = io_options(run)
        if self._pmi_mode:
            options["pmi"] = self._pmi_mode
        if any(k in dict(res.env) for k in GPU_VARIABLES):
            options["gpu-affinity"] = "off"  # the user pinned GPUs explicitly
        spec = jobspec_for(res, run.argv, cwd=run.cwd, env=self._environment(spawn),
                           options=options, cores_per_node=self._pool.cores_per_node)
        return _Job(spawn.worker_id, spec, urgency(res.priority, owner=self._pool.owner),
                    run.files, keep_files=True, program=run, task_id=spawn.task_id)

    def _environment(self, spawn: Spawn) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        res: Resources = spawn.res or Resources()
        own = dict(res.env)
        for key, value in spawn.env:
            # Flux pins the GPUs it grants (the engine's GPU ids are slots of its own
            # count, not devices on the node the job lands on), unless the user set them.
            if key in GPU_VARIABLES and key not in own:
                continue
            env[key] = value
        return env

    def _ended(self, job: _Job) -> None:
        """On the flux thread: the job is over; tell the engine how it ended."""
        if job.program is not None:
            self._program_ended(job, job.program)
            return
        stdout, stderr = read_output(job.files[0]), read_output(job.files[1])
        _forward(stdout, sys.stdout)
        _forward(stderr, sys.stderr)
        for path in job.files:
            with contextlib.suppress(OSError):
                if not job.keep_files:
                    os.unlink(path)
                elif job.jobid is not None:  # kept under the job's id: unique, and findable
                    ext = os.path.splitext(path)[1]
                    os.replace(path, os.path.join(os.path.dirname(path),
                                                  f"flux-{_plain(job.jobid)}{ext}"))
        status = wait_status(job.status) if job.status is not None else None
        reason = None
        if job.exception is not None or status != 0:
            jobid = _plain(job.jobid) if job.jobid is not None else "(not submitted)"
            reason = job_failure(jobid, status, job.exception, stderr)
        exit_status = status if status is not None else -signal.SIGKILL
        if self.on_exit is not None:
            self.on_exit(Exited(job.worker_id, 0, exit_status, reason))

    def _program_ended(self, job: _Job, run: ProgramRun) -> None:
        """A program's job is over: its outcome if it ran to its end, else (cancelled,
        timed out, never started) how the job ended, as for a worker."""
        if run.stdin is not None:
            with contextlib.suppress(OSError):
                os.unlink(run.stdin)
        status = wait_status(job.status) if job.status is not None else None
        stopped = job.kill is not None or (job.exception is not None
                                          and job.exception[0] in ("cancel", "timeout"))
        if status is None or stopped:
            jobid = _plain(job.jobid) if job.jobid is not None else "(not submitted)"
            reason = job_failure(jobid, status, job.exception, read_output(run.files[1]))
            exited = Exited(job.worker_id, 0, -signal.SIGKILL if status is None else status,
                            reason)
        elif job.exception is not None and job.exception[0] == "exec":  # never started
            done = start_failure(run, job.task_id, job.exception[1], job.times[1])
            exited = Exited(job.worker_id, 0, status, None, done)
        else:
            started, finished = job.times
            done = program_outcome(run, job.task_id, status, started or finished, finished)
            exited = Exited(job.worker_id, 0, status, None, done)
        if self.on_exit is not None:
            self.on_exit(exited)

    def kill(self, worker_id: int, signum: int = 9) -> None:
        if self._thread is not None:
            self._thread.request(("cancel", worker_id))

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.request(("stop", None))
            thread.join(self.GRACE + 5)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def _plain(jobid: Any) -> str:
    """A job id as Flux prints it, in ASCII (``f2aBc...``, not ``ƒ2aBc...``)."""
    try:
        return str(jobid.f58plain)
    except AttributeError:
        return str(jobid)


def _forward(text: str, stream: Any) -> None:
    if text:
        with contextlib.suppress(Exception):  # a closed driver stream must not matter
            stream.write(text)
            stream.flush()


class _FluxThread(threading.Thread):
    """Owns a Flux handle: submits jobs, follows their eventlogs, cancels them."""

    def __init__(self, uri: str | None, ended: Callable[[_Job], None], *, warm: int = 0,
                 make_warm: Callable[[tuple[str, int]], _Job] | None = None,
                 make_job: Callable[[Spawn], _Job] | None = None, secret: bytes = b"",
                 near: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        super().__init__(name="executorkit-flux", daemon=True)
        self._uri = uri
        self._ended = ended
        # Warm jobs: up to ``warm`` one-core jobs submitted ahead of their calls.
        self._warm_target = warm
        self._make_warm = make_warm
        self._secret = secret
        self._near = near  # the driver's address: warm jobs reach the launcher the same way
        self._idle: list[_Job] = []  # warm jobs without a call, oldest first
        self._warm_jobs: dict[int, _Job] = {}  # warm id -> warm job not yet connected
        self._make_job: Callable[[Spawn], _Job] = make_job  # type: ignore[assignment]
        self._warm_failures = 0
        self._listener: socket.socket | None = None
        self._watchers: list[Any] = []
        self._requests: deque[tuple[str, Any]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._jobs: dict[int, _Job] = {}  # worker id -> job not yet ended
        self._stopping = False
        self._handle: Any = None
        self._grace_timer: Any = None
        self._lock = threading.Lock()
        self._dead: BaseException | None = None  # why the thread ended (no more requests)

    def request(self, item: tuple[str, Any]) -> None:
        with self._lock:
            if self._dead is None:
                self._requests.append(item)
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"\0")
                return
        if item[0] == "submit":  # the thread is gone: the job can only fail, with the reason
            item[1].exception = ("executorkit", f"the Flux thread failed: {self._dead}")
            self._end(item[1])

    def run(self) -> None:
        try:
            self._serve()
            failure: BaseException = RuntimeError("the Flux reactor stopped")
        except BaseException as exc:  # the guard: every job still known ends, with the reason
            log.exception("executorkit's Flux thread failed")
            failure = exc
        with self._lock:
            self._dead = failure
            left = [arg for what, arg in self._requests if what == "submit"]
            self._requests.clear()
        for job in [*self._jobs.values(), *left]:
            job.exception = job.exception or ("executorkit", f"the Flux thread failed: {failure}")
            self._end(job)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _serve(self) -> None:
        flux = import_flux()
        from flux.constants import FLUX_POLLIN

        self._handle = flux.Flux(self._uri) if self._uri else flux.Flux()
        watcher = self._handle.fd_watcher_create(self._wake_r, self._wake, events=FLUX_POLLIN)
        watcher.start()
        self._watchers.append(watcher)
        if self._warm_target:
            host = self._near[0]
            self._listener = socket.create_server(
                ("127.0.0.1" if host == "127.0.0.1" else "0.0.0.0", 0), backlog=128)
            self._listener.setblocking(False)
            accept = self._handle.fd_watcher_create(self._listener.fileno(), self._accept,
                                                    events=FLUX_POLLIN)
            accept.start()
            self._watchers.append(accept)
        try:
            self._handle.reactor_run()
        finally:
            for w in self._watchers:
                with contextlib.suppress(Exception):
                    w.stop()
            if self._listener is not None:
                self._listener.close()
            for job in self._idle:
                if job.sock is not None:
                    job.sock.close()

    # -- reactor callbacks (flux thread) ------------------------------------------
    def _wake(self, *_: Any) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 4096):
                pass
        while self._requests:
            what, arg = self._requests.popleft()
            if what == "submit":
                self._retire_idle()  # their cores may be what this call waits for
                self._submit(arg)
            elif what == "assign":
                self._assign(*arg)
            elif what == "cancel":
                self._cancel(arg)
            else:
                self._stop()

    # -- warm jobs ------------------------------------------------------------------
    def _assign(self, spawn: Spawn, identity: Spawn) -> None:
        """Give a plain call to a warm job (connected ones first), else to a job of its own;
        then submit a warm job to replace the one taken."""
        ready = sorted(self._idle, key=lambda j: (j.sock is None, not j.started))
        if ready and not self._stopping:
            job = ready[0]
            self._idle.remove(job)
            self._jobs.pop(job.worker_id, None)
            job.worker_id = spawn.worker_id
            self._jobs[job.worker_id] = job
            if job.sock is not None:
                self._send_identity(job, identity)
            else:
                job.due = identity
        else:
            self._submit(self._make_job(spawn))
        self._replenish()

    def _replenish(self) -> None:
        while (self._warm_target and not self._stopping and self._listener is not None
               and len(self._idle) < self._warm_target and self._make_warm is not None):
            job = self._make_warm(self._listener.getsockname()[:2] if self._near[0] ==
                                  "127.0.0.1" else (self._near[0],
                                                    self._listener.getsockname()[1]))
            self._idle.append(job)
            self._warm_jobs[job.worker_id] = job
            self._submit(job)

    def _retire_idle(self) -> None:
        """Cancel the warm jobs without a call: a call Flux must place itself is coming."""
        idle, self._idle = self._idle, []
        for job in idle:
            job.kill = signal.SIGKILL
            if job.sock is not None:
                job.sock.close()
                job.sock = None
            if job.jobid is not None:
                self._cancel_job(job)

    def _accept(self, *_: Any) -> None:
        """A warm job says hello (it is imported and ready)."""
        assert self._listener is not None
        while True:
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                sock.settimeout(10.0)  # the hello follows the connect at once
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                hello = BlockingChannel(sock, self._secret).recv()
            except Exception:  # a stranger, or garbage: drop it
                sock.close()
                continue
            job = (self._warm_jobs.pop(hello.worker_id, None) if isinstance(hello, Hello)
                   else None)
            if job is None or job.ended or job.kill is not None:  # cancelled, or not ours
                sock.close()
                continue
            job.sock = sock
            # `due` was set when the call was assigned before the job connected
            if job.due is not None:
                self._send_identity(job, job.due)
            else:
                self._idle_timer(job)

    def _idle_timer(self, job: _Job) -> None:
        """A warm job without a call gives its core back after WARM_IDLE seconds: another
        executor in the instance (or a call Flux must place) may be waiting for it."""

        def retire(*_: Any) -> None:
            job.timer = None
            if job in self._idle and job.sock is not None:
                self._idle.remove(job)
                job.kill = 0  # ended on purpose: closing its connection makes it exit
                job.sock.close()
                job.sock = None

        job.timer = self._handle.timer_watcher_create(WARM_IDLE, retire)
        job.timer.start()

    def _send_identity(self, job: _Job, identity: Spawn) -> None:
        if job.timer is not None:
            job.timer.stop()
            job.timer = None
        sock, job.sock, job.due = job.sock, None, None
        try:
            header, body = encode(identity, self._secret)
            sock.sendall(header + body)
        except OSError:
            pass  # the job is gone: its end is reported through its eventlog
        finally:
            sock.close()

    def _submit(self, job: _Job) -> None:
        from flux.job import submit_async

        if self._stopping:
            job.exception = ("executorkit", "the executor shut down before the job started")
            self._end(job)
            return
        self._jobs[job.worker_id] = job
        try:
            job.submit_future = submit_async(self._handle, job.spec, urgency=job.urgency)
            job.submit_future.then(self._submitted, job)
        except OSError as exc:
            job.exception = ("submit", str(exc))
            self._end(job)

    def _submitted(self, future: Any, job: _Job) -> None:
        from flux.job import event_watch_async

        try:
            job.jobid = future.get_id()
        except OSError as exc:  # refused by the instance (validation, unsatisfiable...)
            job.exception = ("submit", exc.strerror or str(exc))
            self._end(job)
            return
        finally:
            job.submit_future = None
        job.watch = event_watch_async(self._handle, job.jobid)
        job.watch.then(self._event, job)
        if job.kill is not None or self._stopping:
            self._cancel_job(job)

    def _event(self, future: Any, job: _Job) -> None:
        try:
            event = future.get_event()
        except OSError as exc:
            job.exception = job.exception or ("eventlog", str(exc))
            event = None
        if event is None:
            self._end(job)
            return
        if event.name == "exception" and event.context.get("severity", 0) == 0:
            job.exception = job.exception or (str(event.context.get("type")),
                                              str(event.context.get("note", "")))
        elif event.name == "start":
            job.started = True
            job.times = (event.timestamp, job.times[1])
        elif event.name == "finish":
            job.status = int(event.context.get("status", 0))
            job.times = (job.times[0], event.timestamp)
        elif event.name == "clean":
            self._end(job)

    def _end(self, job: _Job) -> None:
        if job.ended:
            return
        job.ended = True
        self._jobs.pop(job.worker_id, None)
        if job.watch is not None:
            with contextlib.suppress(Exception):
                job.watch.cancel()
        if job.warm:
            self._warm_jobs = {k: v for k, v in self._warm_jobs.items() if v is not job}
        if job.warm and job.worker_id < 0:
            self._warm_ended(job)
            return
        try:
            self._ended(job)
        except Exception:  # reporting one job must not stop the reactor for the others
            log.exception("reporting the end of Flux job %s failed", job.jobid)
        if self._stopping and not self._jobs and self._handle is not None:
            with contextlib.suppress(Exception):
                self._handle.reactor_stop()

    def _warm_ended(self, job: _Job) -> None:
        """A warm job ended before it had a call (cancelled, or it could not start)."""
        if job in self._idle:
            self._idle.remove(job)
        if job.sock is not None:
            job.sock.close()
        for path in job.files:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if job.timer is not None:
            job.timer.stop()
            job.timer = None
        if job.kill is None:  # not ended by us: it failed; stop trying after a few
            self._warm_failures += 1
            if self._warm_failures >= 3:
                log.warning("warm Flux jobs keep failing (%s); calls get jobs of their own",
                            job.exception or job.status)
                self._warm_target = 0
        if self._stopping and not self._jobs and self._handle is not None:
            with contextlib.suppress(Exception):
                self._handle.reactor_stop()

    def _cancel(self, worker_id: int) -> None:
        job = self._jobs.get(worker_id)
        if job is None:
            return
        job.kill = signal.SIGKILL
        if job.jobid is not None:
            self._cancel_job(job)

    def _cancel_job(self, job: _Job) -> None:
        from flux.job import cancel_async

        with contextlib.suppress(OSError):
            cancel_async(self._handle, job.jobid, "cancelled by executorkit")

    def _stop(self) -> None:
        """Cancel what is left; the reactor stops once every job has ended (or after a
        grace period, should the instance itself be going away)."""
        self._stopping = True
        if not self._jobs:
            self._handle.reactor_stop()
            return
        for job in list(self._jobs.values()):
            if job.jobid is not None:
                self._cancel_job(job)
        self._grace_timer = self._handle.timer_watcher_create(
            FluxLauncher.GRACE, lambda *_: self._handle.reactor_stop())
        self._grace_timer.start()


def uri_of(flux_executor: Any) -> str | None:
    """The URI of the instance behind ``flux_executor``: a URI, a ``flux.Flux`` handle or a
    ``flux.job.FluxExecutor`` (executorlib's parameter); None when not given."""
    if flux_executor is None or isinstance(flux_executor, str):
        return flux_executor
    handle = flux_executor
    if not hasattr(handle, "attr_get"):
        # A FluxExecutor keeps its handles in its threads; it offers no public accessor.
        threads = getattr(flux_executor, "_executor_threads", None) or ()
        handle = getattr(next(iter(threads), None), "_FluxExecutorThread__flux_handle", None)
    try:
        return str(handle.attr_get("local-uri"))
    except Exception as exc:
        raise ResourceError(
            f"flux_executor={flux_executor!r} does not say which Flux instance to use ({exc})",
            key="flux_executor",
            allowed="a flux.job.FluxExecutor, a flux.Flux handle, a URI string, or None "
                    "(FLUX_URI)") from exc
