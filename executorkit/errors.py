"""Exceptions raised by executorkit.

Everything executorkit raises on its own account derives from :class:`ExecutorkitError`.
Subclasses also derive from the builtin exception a user would naturally catch
(``ValueError`` for bad input, ``TimeoutError`` for a run-time limit), so code written
against the standard library keeps working.
"""

from __future__ import annotations

import signal
from concurrent.futures import BrokenExecutor


class ExecutorkitError(Exception):
    """Root of every exception executorkit raises itself."""


class ResourceError(ExecutorkitError, ValueError):
    """A ``resource_dict`` (or an executor parameter) is invalid or cannot be granted.

    ``key`` names the offending key, ``allowed`` describes the values that would work.
    """

    def __init__(self, message: str, *, key: str | None = None, allowed: str | None = None):
        super().__init__(message)
        self.key = key
        self.allowed = allowed


class DependencyError(ExecutorkitError):
    """An input future of a task failed or was cancelled; ``__cause__`` is its exception."""

    def __init__(self, message: str, *, upstream: object = None):
        super().__init__(message)
        self.upstream = upstream


class WorkflowError(ExecutorkitError, ValueError):
    """A workflow cannot be exported, read or run; the message says which node or argument."""


class SerializationError(ExecutorkitError, TypeError):
    """A function, an argument or a result could not be pickled or unpickled."""


class WorkerImportError(SerializationError):
    """A worker cannot import a module the call needs (to unpickle its function, arguments
    or result): the module exists only where the driver runs.

    ``module`` is the module's name, ``worker_path`` the worker's ``sys.path`` at the time.
    """

    def __init__(self, message: str, *, module: str | None = None,
                 worker_path: tuple[str, ...] = ()):
        super().__init__(message)
        self.module = module
        self.worker_path = worker_path

    def __reduce__(self) -> tuple[object, ...]:
        return _rebuild_import_error, (str(self), self.module, self.worker_path)


def _rebuild_import_error(message: str, module: str | None,
                          worker_path: tuple[str, ...]) -> WorkerImportError:
    return WorkerImportError(message, module=module, worker_path=worker_path)


class TaskTimeoutError(ExecutorkitError, TimeoutError):
    """A task ran longer than its ``run_time_max`` and was stopped."""


class WorkerDiedError(ExecutorkitError):
    """The process running a task ended without returning a result.

    ``exitcode`` is the exit status (``None`` if unknown), ``signal`` the number of the
    signal that killed it (``None`` if it exited), ``host`` and ``pid`` say where.
    """

    def __init__(self, message: str, *, exitcode: int | None = None, signum: int | None = None,
                 host: str | None = None, pid: int | None = None):
        super().__init__(message)
        self.exitcode = exitcode
        self.signal = signum
        self.host = host
        self.pid = pid


class ExecutorBrokenError(ExecutorkitError, BrokenExecutor):
    """The executor can no longer run tasks (its launcher died or a thread failed)."""


class RemoteTraceback(Exception):
    """Carries the formatted traceback of an exception raised in a worker.

    Attached as ``__cause__`` of the re-raised exception, so the worker's frames and source
    lines appear in the driver's traceback.
    """

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class RemoteError(ExecutorkitError):
    """Stands in for a worker exception that could not be pickled back to the driver."""

    def __init__(self, type_name: str, message: str):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name


def describe_exit(status: int) -> tuple[str, int | None, int | None]:
    """Turn a ``waitpid``-style status (negative = signal) into words, exit code, signal."""
    if status < 0:
        signum = -status
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        hints: dict[int, str] = {
            signal.SIGKILL: " (killed: out of memory, a time limit, or kill -9)",
            signal.SIGSEGV: " (segmentation fault)",
            signal.SIGABRT: " (aborted)",
            signal.SIGBUS: " (bus error)",
        }
        hint = hints.get(signum, "")
        return f"was killed by {name}{hint}", None, signum
    return f"exited with code {status} before returning a result", status, None
