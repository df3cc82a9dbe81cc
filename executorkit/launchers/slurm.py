"""Start worker processes with ``srun``: job steps inside an allocation; outside of one,
each srun makes its own job allocation (the command line is the same).

Every worker is one ``srun`` process: a per-task worker runs one call, a block-allocation
worker serves many. The worker finds the driver through a private boot file (mode 0600) in
a directory on a shared file system, never through its command line. One waiter thread per
step reports the step's end to the engine, which already knows how to turn "exited without
a result" into a clear error.

:func:`srun_command` builds the command line; it is a pure function, tested as strings.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence

from executorkit.errors import ResourceError
from executorkit.launchers.pythonpath import worker_environment
from executorkit.resources import Resources
from executorkit.transport import Exited, Spawn


def srun_command(res: Resources, *, module: str, bootfile: str, pmi_mode: str | None = None,
                 srun: str = "srun", python: str = sys.executable,
                 cpus_per_node: int | None = None, overlap: bool = False) -> list[str]:
    """The ``srun`` command line that runs one worker with the resources of ``res``.

    A call that fits on one node is kept on one node (``--nodes 1``); otherwise srun
    would spread it over every node of the allocation. ``overlap``: the caller is itself
    a step of this job (a nested executor) and shares that step's CPUs.
    """
    prefix = srun_prefix(res, pmi_mode=pmi_mode, srun=srun, cpus_per_node=cpus_per_node,
                         overlap=overlap)
    return [*prefix, python, "-m", module, bootfile]


def srun_prefix(res: Resources, *, pmi_mode: str | None = None, srun: str = "srun",
                cpus_per_node: int | None = None, overlap: bool = False) -> list[str]:
    """``srun`` and its options for one step with the resources of ``res``: the part of
    :func:`srun_command` before what it runs (also the prefix of an MPI program)."""
    cmd = [srun, "--ntasks", str(res.cores), "--cpus-per-task", str(res.threads_per_core),
           "--exact", "--kill-on-bad-exit=1", "--quiet"]
    if overlap:
        cmd.append("--overlap")
    if res.num_nodes is not None:
        cmd += ["--nodes", str(res.num_nodes)]
    elif cpus_per_node is not None and res.cpus <= cpus_per_node:
        cmd += ["--nodes", "1"]
    if res.gpus_per_core:
        cmd += [f"--gpus-per-task={res.gpus_per_core}"]
    if res.exclusive:
        cmd += ["--exclusive"]
    if res.run_time_max is not None:
        # Slurm counts in whole minutes; the engine's own timer stops the call on time.
        cmd += [f"--time={max(1, math.ceil(res.run_time_max / 60))}"]
    if pmi_mode:
        cmd += [f"--mpi={pmi_mode}"]
    if res.cwd:
        cmd += [f"--chdir={res.cwd}"]
    cmd += list(res.slurm_cmd_args)
    return cmd


_CPUS_PER_NODE = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def smallest_node(value: str) -> int:
    """CPUs of the smallest node in ``SLURM_JOB_CPUS_PER_NODE``."""
    sizes = [int(m.group(1)) for part in value.split(",")
             if (m := _CPUS_PER_NODE.match(part.strip())) is not None]
    return min(sizes) if sizes else 1


def allocation_cpus(value: str) -> int:
    """Total CPUs from ``SLURM_JOB_CPUS_PER_NODE`` (e.g. ``"8"`` or ``"4(x2),2"``)."""
    total = 0
    for part in value.split(","):
        match = _CPUS_PER_NODE.match(part.strip())
        if match is None:
            raise ValueError(f"cannot read SLURM_JOB_CPUS_PER_NODE={value!r}")
        total += int(match.group(1)) * int(match.group(2) or 1)
    return total


def allocation(environ: dict[str, str] | os._Environ[str]) -> tuple[int, int, int]:
    """(CPUs, nodes, GPUs) of the allocation this process runs in."""
    if "SLURM_JOB_ID" not in environ:
        raise ResourceError(
            "SlurmJobExecutor runs inside a Slurm allocation (sbatch or salloc), but "
            "SLURM_JOB_ID is not set; use SlurmClusterExecutor to submit jobs from a "
            "login node", key="SLURM_JOB_ID", allowed="run inside sbatch/salloc")
    cpus = allocation_cpus(environ.get("SLURM_JOB_CPUS_PER_NODE")
                           or environ.get("SLURM_CPUS_ON_NODE", "1"))
    nodes = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    gpus_per_node = environ.get("SLURM_GPUS_ON_NODE", "0")
    gpus = int(gpus_per_node) * nodes if gpus_per_node.isdigit() else 0
    return cpus, nodes, gpus


def _shared_directory() -> str:
    """A private directory visible from the compute nodes (home is shared on clusters)."""
    base = os.environ.get("EXECUTORKIT_TMPDIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "executorkit")
    os.makedirs(base, mode=0o700, exist_ok=True)
    return tempfile.mkdtemp(prefix="run-", dir=base)


class SrunLauncher:
    """Runs workers as job steps. ``spawn``/``kill`` are called on the engine thread."""

    name = "srun"
    carries_path = True  # Spawn.path reaches the worker (see Engine._spawn)
    chan = None  # no fork server: there is nothing to attach
    stdout_fd: int | None = None
    stderr_fd: int | None = None
    GRACE = 5.0  # seconds between SIGTERM (srun forwards it to the tasks) and SIGKILL

    def __init__(self, *, pmi_mode: str | None = None, srun: str = "srun",
                 cpus_per_node: int | None = None, overlap: bool = False) -> None:
        self._pmi_mode = pmi_mode
        self._cpus_per_node = cpus_per_node
        self._overlap = overlap
        self._srun = srun
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._dir: str | None = None
        self._boot: dict[str, object] = {}
        self._env: dict[str, str] | None = None
        self.on_exit: Callable[[Exited], None] | None = None

    @property
    def started(self) -> bool:
        return self._dir is not None

    def start(self, address: tuple[str, int], secret: bytes) -> None:
        self._boot = {"address": address, "secret": secret}
        _live.add(self)
        _clean_up_on_sigterm()

    def abandon(self) -> None:
        """The driver is being killed (SIGTERM): end every step and remove the boot files
        now, without waiting (a step's worker also exits by itself once the driver's
        connection closes)."""
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def attach(self, chan: object) -> None:  # pragma: no cover - never called for srun
        raise AssertionError("srun workers have no fork server")

    def spawn(self, spawn: Spawn) -> None:
        if self._dir is None:
            self._dir = _shared_directory()
        res: Resources = spawn.res or Resources()
        errdir = spawn.errdir or os.path.join(self._dir, f"worker-{spawn.worker_id}")
        os.makedirs(errdir, mode=0o700, exist_ok=True)
        bootfile = os.path.join(errdir, "boot.pkl")
        setup = None
        if spawn.cwd:
            from executorkit.transport import TaskSetup

            setup = TaskSetup(cwd=spawn.cwd)
        boot = {**self._boot, "worker_id": spawn.worker_id, "persistent": spawn.persistent,
                "init_payload": spawn.init_payload, "errdir": errdir, "setup": setup,
                "path": spawn.path}
        fd = os.open(bootfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(boot, fh)
        if spawn.program and res.cores > 1:
            # An MPI program is itself the step (its prefix, see program_prefix): the worker
            # that starts it and reports its result runs here, beside the driver.
            cmd = [sys.executable, "-m", "executorkit.worker.loop", bootfile]
        else:
            module = "executorkit.worker.mpi" if res.cores > 1 else "executorkit.worker.loop"
            cmd = srun_command(res, module=module, bootfile=bootfile,
                               pmi_mode=self._pmi_mode, srun=self._srun,
                               cpus_per_node=self._cpus_per_node, overlap=self._overlap)
        if self._env is None:  # once, on first use: it asks a fresh interpreter
            self._env = worker_environment()
        env = {**self._env, **dict(spawn.env)}
        try:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as exc:
            self._report(Exited(spawn.worker_id, 0, 127), f"could not run srun: {exc}")
            return
        with self._lock:
            self._procs[spawn.worker_id] = proc
        threading.Thread(target=self._wait, args=(spawn.worker_id, proc), daemon=True,
                         name=f"executorkit-srun-{spawn.worker_id}").start()

    def program_prefix(self, res: Resources) -> tuple[str, ...]:
        """How a program (executorkit.command) of ``res.cores`` ranks starts: as a step of
        its own, ``srun --ntasks <cores> ...``; a single process runs in its worker's step."""
        if res.cores <= 1:
            return ()
        return tuple(srun_prefix(res, pmi_mode=self._pmi_mode, srun=self._srun,
                                 cpus_per_node=self._cpus_per_node, overlap=self._overlap))

    def _wait(self, worker_id: int, proc: subprocess.Popen[bytes]) -> None:
        try:
            status = proc.wait()
        except Exception:  # pragma: no cover - a broken wait must still report
            status = -1
        with self._lock:
            self._procs.pop(worker_id, None)
        self._report(Exited(worker_id, proc.pid, status))

    def _report(self, exited: Exited, reason: str | None = None) -> None:
        if self.on_exit is not None:
            self.on_exit(exited)

    def kill(self, worker_id: int, signum: int = 9) -> None:
        with self._lock:
            proc = self._procs.get(worker_id)
        if proc is None:
            return
        # The process group: srun (which forwards the signal to the step's tasks), or a
        # local worker together with the srun of the program it started.
        _signal_group(proc, signal.SIGTERM)
        timer = threading.Timer(self.GRACE, self._force, (proc,))
        timer.daemon = True
        timer.start()

    @staticmethod
    def _force(proc: subprocess.Popen[bytes]) -> None:
        # Also after the leader exited: a program's srun may still be alive in its group.
        _signal_group(proc, signal.SIGKILL)

    def stop(self) -> None:
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=self.GRACE)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        _live.discard(self)


_live: weakref.WeakSet[SrunLauncher] = weakref.WeakSet()


def _clean_up_on_sigterm() -> None:
    """Remove the boot files (they hold the secret) when the driver is killed by SIGTERM.

    Only where nobody else handles SIGTERM (the default action, in the main thread): the
    handler cleans up, restores the default and sends the signal again, so the driver
    still dies of SIGTERM as it would have. A normal exit, Ctrl-C and a program's own
    SIGTERM handler that exits through Python clean up through shutdown instead.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: object) -> None:
    for launcher in list(_live):
        with contextlib.suppress(Exception):
            launcher.abandon()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    """Signal the group ``proc`` leads (it was started in a session of its own)."""
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)


def pool_of(max_cores: int | None, allocated: int, what: str = "max_cores") -> int:
    if max_cores is not None and max_cores > allocated:
        raise ResourceError(f"{what}={max_cores} but the allocation has {allocated} CPUs",
                            key=what, allowed=f"<= {allocated}")
    return max_cores or allocated


__all__: Sequence[str] = ["SrunLauncher", "allocation", "allocation_cpus", "srun_command",
                          "srun_prefix"]
