"""Start and stop worker processes on this machine through a warm fork server.

The launcher starts one fork server per executor (a fresh interpreter, once) and afterwards
only sends it small :class:`~executorkit.transport.Spawn` / ``Kill`` requests over the
authenticated channel the fork server opens back to the engine. A Command's program is
started by the fork server itself (:class:`~executorkit.transport.RunProgram`), and its
outcome read back here (:func:`program_outcome`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from executorkit.command import CommandCall, program_stem, stdin_bytes
from executorkit.launchers.flux_program import ProgramRun
from executorkit.launchers.flux_program import program_outcome as _outcome
from executorkit.launchers.pythonpath import worker_environment
from executorkit.resources import Resources
from executorkit.transport import (
    Address,
    BlockingChannel,
    Exited,
    Kill,
    Preload,
    ProgramEnd,
    RunProgram,
    Spawn,
    Stop,
    TaskDone,
)


@functools.cache
def mpi_flavor(mpiexec: str) -> str:
    """"openmpi", "mpich" or "unknown", from ``mpiexec --version``."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if "Open MPI" in out or "OpenRTE" in out:
        return "openmpi"
    if "HYDRA" in out or "MPICH" in out:
        return "mpich"
    return "unknown"


def find_mpiexec() -> str | None:
    """The ``mpiexec`` next to this interpreter (a venv with the mpich wheel), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpiexec")


def mpiexec_command(ranks: int, *, mpiexec: str, flavor: str,
                    oversubscribe: bool = False) -> tuple[str, ...]:
    """The launcher prefix that starts ``ranks`` MPI workers (the boot file goes last)."""
    cmd = [mpiexec, "-n", str(ranks)]
    if oversubscribe and flavor == "openmpi":
        cmd.append("--oversubscribe")  # MPICH allows oversubscription without a flag
    if flavor == "mpich":
        cmd += MPICH_LOOPBACK
    return (*cmd, sys.executable, "-m", "executorkit.worker.mpi")


# All ranks of a local call are on this machine: keep what they listen on to loopback.
# Without these the MPICH wheel's ranks listen on the machine's external address (UCX's
# TCP transport; libfabric's tcp/sockets providers in OFI builds). Hydra's own control port
# still binds every interface: hydra has no setting for it (docs/guide.md, "MPI").
MPICH_LOOPBACK = ("-iface", "lo",
                   "-genv", "UCX_NET_DEVICES", "lo",
                   "-genv", "FI_TCP_IFACE", "lo",
                   "-genv", "FI_SOCKETS_IFACE", "lo")


def program_prefix(ranks: int, mpiexec: tuple[str, ...]) -> tuple[str, ...]:
    """``mpiexec -n <ranks>`` for an MPI program; nothing for a single process."""
    if ranks <= 1:
        return ()
    if not mpiexec:
        from executorkit.errors import ResourceError

        raise ResourceError(f"cores={ranks} starts the program with mpiexec, which was not "
                            "found (pip install mpich, or put mpiexec on PATH)", key="cores",
                            allowed="cores=1 without mpiexec")
    return (mpiexec[0], "-n", str(ranks), *mpiexec[1:])


class LocalLauncher:
    """Owns the fork server process; requests made before it connects are queued."""

    name = "local"
    carries_path = True  # Spawn.path reaches the worker (see Engine._spawn)
    runs_programs = True  # the fork server starts a Command's program itself (Spawn.call)

    def __init__(self, *, forward_output: bool, preload: tuple[str, ...] = (),
                 mpiexec: tuple[str, ...] = ()) -> None:
        self.forward_output = forward_output
        self.mpiexec = mpiexec  # e.g. ("mpiexec",) or ("mpiexec", "--oversubscribe")
        self.preload = preload
        self.process: subprocess.Popen[bytes] | None = None
        self.chan: BlockingChannel | None = None
        self._queued: deque[object] = deque()
        self._boot: dict[str, object] = {}
        self.on_dead: Callable[[int], None] | None = None
        self.on_exit: Callable[[Exited], None] | None = None  # (a program that cannot start)
        self._path: tuple[str, ...] | None = None  # the driver's sys.path, as last sent
        self.stdout_fd: int | None = None
        self.stderr_fd: int | None = None

    def start(self, address: Address, secret: bytes) -> None:
        """Remember where workers connect; the fork server itself starts on first use, so an
        executor whose calls are all answered from the cache starts no process at all."""
        self._boot = {"address": address, "secret": secret, "preload": self.preload}

    @property
    def started(self) -> bool:
        return self.process is not None

    def _start_process(self) -> None:
        out = err = None
        if self.forward_output:
            # A notebook's sys.stdout is not file descriptor 1: read the workers' output
            # through pipes and let the engine print it where the user looks.
            self.stdout_fd, out = os.pipe()
            self.stderr_fd, err = os.pipe()
        env = worker_environment()
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Bind every symbol of the fork server's libraries at its start (extension modules
        # are, by Python's dlopen flags), so that its forked workers never do; the fork
        # server removes the variable again, for its workers and programs.
        bind_now = "LD_BIND_NOW" not in env
        if bind_now:
            env["LD_BIND_NOW"] = "1"
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "executorkit.worker.forkserver"],
                stdin=subprocess.PIPE, stdout=out, stderr=err, env=env,
                start_new_session=True,  # terminal signals go to the driver only
            )
        finally:
            for fd in (out, err):
                if fd is not None:
                    os.close(fd)
        assert self.process.stdin is not None
        # The driver's multiprocessing authkey, so that proxies of a multiprocessing
        # Manager the user created (Queue, Event, dict...) work as call arguments, as they
        # do with ProcessPoolExecutor. It travels on the pipe, never in the environment.
        import multiprocessing.process  # (12 ms: only when a fork server starts)

        authkey = bytes(multiprocessing.process.current_process().authkey)
        boot = {**self._boot, "authkey": authkey, "bind_now": bind_now}
        self.process.stdin.write(pickle.dumps(boot))
        self.process.stdin.close()
        # Nothing else would notice a fork server that dies before it connects (or later
        # without its connection closing first): watch the process itself.
        threading.Thread(target=self._watch, args=(self.process,), daemon=True,
                         name="executorkit-forkserver-watch").start()

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        if self.on_dead is not None:
            self.on_dead(code)

    def attach(self, chan: BlockingChannel) -> None:
        """The fork server said hello: send what was queued."""
        self.chan = chan
        while self._queued:
            chan.send(self._queued.popleft())

    def _send(self, msg: object) -> None:
        if self.process is None:
            self._start_process()
        if self.chan is None:
            self._queued.append(msg)
        else:
            self.chan.send(msg)

    def spawn(self, spawn: Spawn) -> None:
        if spawn.call is None:
            self._send(self._plain(spawn))
            return
        try:
            request = self._program(spawn)
        except Exception as exc:  # (no mpiexec for cores > 1): the call fails, not the engine
            from executorkit.worker._call import error_info

            now = time.time()
            end = ProgramEnd(spawn.task_id, (), spawn.cwd or "", ("", ""), (), now, now,
                             error_info(exc))
            if self.on_exit is not None:
                self.on_exit(Exited(spawn.worker_id, 0, 0, program=end))
            return
        self._send(request)

    def _plain(self, spawn: Spawn) -> Spawn:
        """``spawn`` without what the fork server has or needs not: the driver's sys.path
        as last sent (the fork server keeps it), the call's Resources."""
        path = spawn.path
        if path is not None and path == self._path:
            path = None
        elif path is not None:
            self._path = path
        if path is spawn.path and spawn.res is None:
            return spawn
        return dataclasses.replace(spawn, path=path, res=None)

    def _program(self, spawn: Spawn) -> RunProgram:
        """The fork server's request for the program of ``spawn.call`` (plain data only: the
        Command's argv may hold objects the fork server could not unpickle)."""
        call: CommandCall = spawn.call
        cmd = call.command
        res: Resources = spawn.res or Resources()
        argv = (*self.program_prefix(res), *cmd.resolved_argv())
        return RunProgram(spawn.worker_id, spawn.task_id, argv, spawn.env, spawn.cwd,
                          spawn.cpus, program_stem(cmd), stdin_bytes(cmd), cmd.outputs)

    def program_prefix(self, res: Resources) -> tuple[str, ...]:
        """How a program (executorkit.command) of ``res.cores`` ranks is started."""
        return program_prefix(res.cores, self.mpiexec)

    def import_modules(self, request: Preload) -> None:
        """Have the fork server import modules before it forks the next workers."""
        self._send(request)

    def kill(self, worker_id: int, signum: int = 9) -> None:
        if self.process is not None:
            self._send(Kill(worker_id, signum))

    def stop(self) -> None:
        """Ask the fork server to exit (it kills any worker still alive) and reap it."""
        if self.chan is not None:
            with contextlib.suppress(OSError):
                self.chan.send(Stop())
        elif self.process is not None:
            # It never connected, so it has no workers: no need to wait for it.
            self.process.kill()
        if self.process is not None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def program_outcome(end: ProgramEnd, status: int) -> TaskDone:
    """The outcome of a program the fork server ran (:class:`RunProgram`), as a worker
    would have sent it: its CommandResult, its CommandError, or why it could not start."""
    if end.error is not None:
        return TaskDone(end.task_id, False, pickle.dumps(end.error, protocol=5), end.started,
                        end.finished)
    run = ProgramRun(list(end.argv), end.cwd, end.files, end.outputs, None)
    return _outcome(run, end.task_id, status, end.started, end.finished)
