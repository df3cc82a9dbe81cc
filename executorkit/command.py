"""Command-line programs as tasks: :class:`Command`, :class:`CommandResult`, :class:`CommandError`.

A :class:`Command` is submitted like a function (``exe.submit(Command(["./sim", "-n", 10]),
resource_dict={"cores": 4})``). ``BaseExecutor.submit`` turns it into a call of
:func:`run_command` on a :class:`CommandCall`, a dataclass holding the command and the
environment and directory it runs in, so that

* futures in ``argv`` or ``stdin`` are found and replaced like any nested argument;
* the cache key covers argv, stdin, env, cwd and the content hashes of the files named in
  ``inputs`` (through ``CommandCall.__executorkit_cache_state__``);
* a cache hit is only a hit while the ``outputs`` files still exist
  (``CommandResult.__executorkit_cache_valid__``).

In the worker the program runs in the worker's own process group (the worker is its
group's leader): a cancel or a ``run_time_max`` kills that whole group with SIGKILL, so the
program dies with its worker even if it ignores SIGTERM. Per-task calls on this machine need
no worker: the fork server starts the program itself, as the leader of its own process group
(executorkit.worker.program). For ``cores > 1`` the executor puts
its MPI launcher prefix (``mpiexec -n 4``, ``srun --ntasks 4 ...``) into the variable
:data:`PREFIX_VARIABLE`; the program itself becomes the MPI job, with no Python ranks.
Launchers that can run a program directly (Flux) read :attr:`Command.argv` and friends.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from executorkit.errors import ExecutorkitError

__all__ = ["PREFIX_VARIABLE", "Command", "CommandCall", "CommandError", "CommandResult",
           "label", "new_output_files", "program_stem", "run_command", "stdin_bytes"]

# JSON list: the launcher prefix the executor chose for this call (empty: run it directly)
PREFIX_VARIABLE = "EXECUTORKIT_PROGRAM_PREFIX"
_TAIL_LINES = 20
_ARG_TYPES = (str, int, float, os.PathLike, Future)


@dataclass(frozen=True)
class Command:
    """A program run: ``Command(argv, *, shell=False, stdin=None, inputs=(), outputs=())``.

    ``argv`` is a list of arguments (str, numbers, paths, or futures whose results become
    arguments; a :class:`CommandResult` contributes its stripped stdout), or one string
    with ``shell=True``. ``stdin`` (str or bytes, or a future of one or of another
    Command's result, whose stdout is piped in) is fed to the program. ``inputs`` name
    files whose *contents* are part of the cache key (a file that does not exist yet
    contributes its name only); ``outputs`` name files the program writes: a cached result
    only counts while they all still exist. Relative paths are relative to the call's ``cwd``.

    Submit it like a function; the future's result is a :class:`CommandResult`, and a
    non-zero exit raises :class:`CommandError`. stdout and stderr are also written to
    ``<program>.<pid>.out`` / ``.err`` in the call's working directory (``<program>.<pid>-<n>``
    when an earlier call left files of that name: they are never overwritten). With
    ``resource_dict={"cores": n}`` (n > 1) the program is started as an MPI job of n ranks by
    the executor's launcher (mpiexec, srun; on FluxJobExecutor the program is itself a Flux
    job of n tasks, and its files are named after the driver's pid). ``threads_per_core``,
    GPUs, ``cwd``, ``env`` and ``run_time_max`` apply as for functions; a cancel or a timeout
    kills the program's whole process group (on Flux: its job).
    """

    argv: tuple[Any, ...] | str
    shell: bool = field(default=False, kw_only=True)
    stdin: Any = field(default=None, kw_only=True)
    inputs: tuple[str, ...] = field(default=(), kw_only=True)
    outputs: tuple[str, ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        if isinstance(self.argv, str):
            if not self.shell:
                raise TypeError(
                    f"Command argv must be a list of arguments, got the str {self.argv!r}; "
                    f"split it (shlex.split) or pass shell=True")
        elif isinstance(self.argv, (list, tuple)):
            if not self.argv:
                raise ValueError("Command argv is empty: name the program to run")
            for i, arg in enumerate(self.argv):
                if isinstance(arg, bool) or not isinstance(arg, _ARG_TYPES):
                    raise TypeError(
                        f"Command argv[{i}] is a {type(arg).__name__} ({arg!r}); allowed: "
                        f"str, int, float, os.PathLike or a Future of one")
            set_(self, "argv", tuple(self.argv))
        else:
            raise TypeError(f"Command argv must be a list of arguments (or a str with "
                            f"shell=True), got {type(self.argv).__name__}")
        if self.stdin is not None and not isinstance(self.stdin, (str, bytes, Future)):
            raise TypeError(f"Command stdin must be str, bytes, a Future or None, got "
                            f"{type(self.stdin).__name__}")
        for name in ("inputs", "outputs"):
            set_(self, name, _paths(name, getattr(self, name)))

    # what launchers that run programs themselves (Flux) need
    def resolved_argv(self) -> list[str]:
        """The argument list as strings (futures must have been replaced by their results)."""
        if isinstance(self.argv, str):
            return ["/bin/sh", "-c", self.argv]
        return [_as_arg(a) for a in self.argv]

    def __call__(self) -> CommandResult:
        """Run the program here, in the current directory and environment."""
        return run_command(CommandCall(self))

    def __str__(self) -> str:
        return self.argv if isinstance(self.argv, str) else shlex.join(self.resolved_argv())


def _as_arg(value: Any) -> str:
    # An upstream program's result becomes its (stripped) output: a pipeline of Commands.
    if isinstance(value, CommandResult):
        return value.stdout.strip()
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def _paths(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, os.PathLike)):
        value = (value,)
    try:
        return tuple(os.fspath(p) for p in value)
    except TypeError:
        raise TypeError(f"Command {name} must be a list of file paths, got {value!r}") from None


@dataclass(frozen=True)
class CommandResult:
    """What a program run produced. ``stdout``/``stderr`` are text; ``runtime`` seconds."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    cwd: str
    runtime: float
    stdout_file: str | None = None
    stderr_file: str | None = None
    outputs: tuple[str, ...] = ()

    def check_returncode(self) -> None:
        if self.returncode != 0:
            raise CommandError(self)

    def __executorkit_cache_valid__(self) -> bool:
        """A cached run counts only while every file it declared as output exists."""
        return all(os.path.exists(p) for p in self.outputs)


class CommandError(ExecutorkitError):
    """A program exited with a non-zero code (or was killed by a signal).

    ``result`` is the :class:`CommandResult`; ``returncode`` is negative for a signal.
    The message ends with the last lines of stderr.
    """

    def __init__(self, result: CommandResult) -> None:
        self.result = result
        self.returncode = result.returncode
        super().__init__(self._message(result))

    @staticmethod
    def _message(result: CommandResult) -> str:
        if result.returncode < 0:
            how = f"was killed by signal {-result.returncode}"
        else:
            how = f"exited with code {result.returncode}"
        tail = "\n".join(result.stderr.rstrip().splitlines()[-_TAIL_LINES:])
        text = f"{shlex.join(result.args)} {how} (in {result.cwd})"
        return f"{text}; stderr ends with:\n{tail}" if tail else text

    def __reduce__(self) -> tuple[Any, ...]:
        return (CommandError, (self.result,))


@dataclass(frozen=True)
class CommandCall:
    """A :class:`Command` with the environment and directory of its call (the cache key's
    view of the call; the worker applies env and cwd from the call's resources)."""

    command: Command
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None

    def __executorkit_cache_state__(self) -> tuple[Any, ...]:
        """What the cache key covers: the call, the files it promises to write, and the
        content of each input file."""
        base = self.cwd or os.getcwd()
        return (self.command.argv, self.command.shell, self.command.stdin, self.env,
                self.cwd, self.command.outputs,
                tuple(_file_digest(os.path.join(base, p)) for p in self.command.inputs))


def label(args: Any, width: int = 60) -> str | None:
    """A short name for a call of :func:`run_command` with ``args``: its program line
    (for status and reports, where every Command would otherwise be "run_command")."""
    call = args[0] if isinstance(args, (tuple, list)) and args else None
    if not isinstance(call, CommandCall):
        return None
    argv = call.command.argv
    text = argv if isinstance(argv, str) else " ".join(
        os.path.basename(_as_arg(a)) if i == 0 and not isinstance(a, Future) else
        ("<future>" if isinstance(a, Future) else _as_arg(a)) for i, a in enumerate(argv))
    return text if len(text) <= width else text[:width - 3] + "..."


def _file_digest(path: str) -> tuple[str, str]:
    """(path, sha256 of its content); a file that does not exist (yet) gives its name only."""
    import hashlib  # (driver side only: the fork server and its workers never load OpenSSL)

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        return path, "missing"
    return path, digest.hexdigest()


def run_command(call: CommandCall) -> CommandResult:
    """Worker side: run the program, keep its output, raise :class:`CommandError` on failure."""
    cmd = call.command
    cwd = os.getcwd()
    argv = _launch_prefix() + cmd.resolved_argv()
    data = stdin_bytes(cmd)
    out, out_path = _new_output_file(os.path.join(cwd, f"{program_stem(cmd)}.{os.getpid()}"))
    err_path = out_path[:-len(".out")] + ".err"
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        err = os.open(err_path, flags, 0o644)
        try:
            started = time.perf_counter()
            returncode = _run(argv, out, err, data)
            runtime = time.perf_counter() - started
            stdout, stderr = _read(out), _read(err)
        finally:
            os.close(err)
    finally:
        os.close(out)
    result = CommandResult(
        args=argv, returncode=returncode, stdout=stdout, stderr=stderr, cwd=cwd,
        runtime=runtime, stdout_file=out_path, stderr_file=err_path,
        outputs=tuple(os.path.join(cwd, p) for p in cmd.outputs))
    result.check_returncode()
    return result


def program_stem(cmd: Command) -> str:
    """The name of a program's output files: its base name (``sim`` for ``./bin/sim``)."""
    words = cmd.resolved_argv()[-1].split() if cmd.shell else cmd.resolved_argv()[:1]
    return os.path.basename(words[0]) if words else "cmd"


def stdin_bytes(cmd: Command) -> bytes | None:
    """What is fed to the program (an upstream Command's result pipes in its stdout)."""
    data = cmd.stdin.stdout if isinstance(cmd.stdin, CommandResult) else cmd.stdin
    return data.encode() if isinstance(data, str) else data


def new_output_files(base: str) -> tuple[str, str]:
    """Create ``<base>.out`` (or ``<base>-<n>.out``, never an existing file) and its
    ``.err`` sibling, empty: for launchers whose program writes them itself (Flux)."""
    out, out_path = _new_output_file(base)
    os.close(out)
    err_path = out_path[:-len(".out")] + ".err"
    os.close(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644))
    return out_path, err_path


def _new_output_file(base: str) -> tuple[int, str]:
    """``<base>.out`` opened new, or ``<base>-2.out``, ... when it exists: one worker runs
    several programs (block allocation, retries) and pids are reused, and an earlier call's
    files must not be overwritten (its cached result names them)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for n in itertools.count(1):
        path = f"{base}.out" if n == 1 else f"{base}-{n}.out"
        try:
            return os.open(path, flags, 0o644), path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def _run(argv: list[str], out: int, err: int, data: bytes | None) -> int:
    """Run ``argv`` with stdout and stderr on the open files; its return code.

    No new session: the program stays in this worker's process group, which a cancel or a
    timeout kills as a whole. Without input, ``posix_spawnp`` starts it (no Popen object,
    pipes or threads: a third of the cost of ``subprocess.run`` per call here).
    """
    if data is not None:
        return subprocess.run(argv, input=data, stdout=out, stderr=err, check=False).returncode
    pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=[
        (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, err, 2),
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)])
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


run_command.__executorkit_program__ = True  # type: ignore[attr-defined]  # see the engine


def _launch_prefix() -> list[str]:
    text = os.environ.get(PREFIX_VARIABLE)
    if not text:
        return []
    prefix = json.loads(text)
    assert isinstance(prefix, list) and all(isinstance(p, str) for p in prefix)
    return prefix


def _read(fd: int) -> str:
    """Everything written to the open file ``fd`` (the program wrote at its own offset)."""
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode(errors="replace")
