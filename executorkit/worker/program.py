"""Start a Command's program straight from the fork server: no Python worker in between.

A per-task Command used to cost a forked Python worker (a copy of the fork server's page
tables, its copy-on-write faults, its connection and its exit) that then started the
program. Here the fork server starts the program itself with ``vfork`` + ``exec``
(``subprocess`` does that when no ``preexec_fn`` is given), which copies nothing, and reaps
it like a worker; the driver reads the outcome from the files (:class:`ProgramEnd`)::

    RunProgram --> start(): cwd, output files, stdin, CPUs --> vfork + exec (new session)
    ... the program runs; Kill signals its process group ...
    waitpid --> Exited(status, program=ProgramEnd) --> driver: CommandResult / CommandError

The program's stdout and stderr go to new files ``<stem>.<pid>.out``/``.err`` named after
its own pid, as a worker names them after its pid. The pid is only known once it runs, so
the files are opened under a private name first and linked to that name right after the
start (on a file system without hard links they keep the private name).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import time
from dataclasses import dataclass

from executorkit.transport import ErrorInfo, ProgramEnd, RunProgram

_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


@dataclass
class Running:
    """A started program, until it is reaped."""

    proc: subprocess.Popen[bytes]  # kept so subprocess never reaps it behind our back
    end: ProgramEnd
    killed: bool = False  # stopped on request (cancel, timeout): no outcome of its own


def start(msg: RunProgram, own_cpus: tuple[int, ...] | None,
          env: dict[str, str] | None = None) -> Running:
    """Start ``msg``'s program; raises ``OSError`` (with the files removed) if it cannot.

    ``own_cpus``: the fork server's CPUs, restored after a start that pins the program.
    ``env``: its whole environment (default: this process's with ``msg.env`` over it).
    """
    cwd = os.path.realpath(msg.cwd or os.getcwd())
    os.makedirs(cwd, exist_ok=True)
    # (random: no earlier file can have this name, whatever pids were reused; os.urandom,
    # as importing secrets or random here would reseed them in every forked worker)
    private = os.path.join(cwd, f".{msg.stem}.{os.getpid()}-{os.urandom(6).hex()}")
    out = os.open(f"{private}.out", _FLAGS, 0o644)
    try:
        err = os.open(f"{private}.err", _FLAGS, 0o644)
    except BaseException:
        os.close(out)
        _remove(f"{private}.out")
        raise
    started = time.time()
    try:
        proc = _spawn(msg, cwd, out, err, own_cpus, env)
    except BaseException:
        _remove(f"{private}.out", f"{private}.err")
        raise
    finally:
        os.close(out)
        os.close(err)
    files = _publish(private, os.path.join(cwd, f"{msg.stem}.{proc.pid}"))
    outputs = tuple(os.path.join(cwd, p) for p in msg.outputs)
    return Running(proc, ProgramEnd(msg.task_id, msg.argv, cwd, files, outputs, started, 0.0))


def failed(msg: RunProgram, error: ErrorInfo) -> ProgramEnd:
    """The report of a program that could not be started."""
    now = time.time()
    cwd = msg.cwd or os.getcwd()
    return ProgramEnd(msg.task_id, msg.argv, cwd, ("", ""), (), now, now, error)


def _spawn(msg: RunProgram, cwd: str, out: int, err: int, own_cpus: tuple[int, ...] | None,
           env: dict[str, str] | None) -> subprocess.Popen[bytes]:
    if env is None:
        env = {**os.environ, **dict(msg.env)}
    stdin = _stdin(msg.stdin)
    pinned = msg.cpus is not None and own_cpus is not None
    try:
        if pinned:  # the program inherits this thread's CPUs (a vfork child cannot set its own)
            os.sched_setaffinity(0, msg.cpus)  # type: ignore[arg-type]
        # A new session: the program leads its own process group, which Kill signals (and
        # the group dies when the fork server goes away). subprocess looks the program up
        # on the PATH of ``env``, as the worker's posix_spawnp did on its own.
        return subprocess.Popen(list(msg.argv), cwd=cwd, env=env, stdin=stdin, stdout=out,
                                stderr=err, start_new_session=True)
    finally:
        if pinned:
            os.sched_setaffinity(0, own_cpus)  # type: ignore[arg-type]
        if stdin != subprocess.DEVNULL:
            os.close(stdin)


def _stdin(data: bytes | None) -> int:
    """An anonymous file holding ``data`` (a pipe would need someone to write it)."""
    if data is None:
        return subprocess.DEVNULL
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
    else:
        import tempfile

        with tempfile.TemporaryFile() as fh:  # unlinked; the duplicate keeps it open
            fd = os.dup(fh.fileno())
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _publish(private: str, base: str) -> tuple[str, str]:
    """Link the private files to ``<base>.out``/``.err`` (``<base>-<n>.*`` if an earlier
    program left files of that name: pids are reused, files are never overwritten)."""
    for n in itertools.count(1):
        name = base if n == 1 else f"{base}-{n}"
        try:
            os.link(f"{private}.out", f"{name}.out")
        except FileExistsError:
            continue
        except OSError:  # no hard links here: the private names are unique too
            return f"{private}.out", f"{private}.err"
        try:
            os.link(f"{private}.err", f"{name}.err")
        except OSError as exc:
            os.unlink(f"{name}.out")
            if isinstance(exc, FileExistsError):
                continue  # an .err of that name alone: the next name
            return f"{private}.out", f"{private}.err"
        _remove(f"{private}.out", f"{private}.err")
        return f"{name}.out", f"{name}.err"
    raise AssertionError("unreachable")


def _remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)
