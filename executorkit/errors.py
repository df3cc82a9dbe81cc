"""Exceptions raised by executorkit.

Everything executorkit raises on its own account derives from :class:`ExecutorkitError`.
Subclasses also derive from the builtin exception a user would naturally catch
(``ValueError`` for bad input, ``TimeoutError`` for a run-time limit), so code written
against the standard library keeps working.
"""

from __future__ import annotations

import signal
import threading
from concurrent.futures import BrokenExecutor, CancelledError
from typing import Any


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


class GpuPoolError(ResourceError, TypeError):
    """A call (or an executor's ``resource_dict``) asks for more GPUs than the executor can
    grant: none unless ``max_gpus`` (or the allocation) declares them. Also a ``TypeError``,
    the type executorlib raises when a SingleNodeExecutor is given ``gpus_per_core``, so
    ``except TypeError:`` written for it still catches this."""


class DependencyError(ExecutorkitError):
    """An input of a call failed or was cancelled, so the call never ran.

    Raised by ``result()`` of the dependent call. Build it with :func:`dependency_error`,
    which makes it catchable *also* as the type of the failure at the root of the chain:
    when ``f`` raised ``RuntimeError``, ``g(f)`` raises an exception that is both a
    ``DependencyError`` and a ``RuntimeError``, so ``except RuntimeError:`` written for
    executorlib still works. Where Python cannot combine the two types (a type that cannot
    be subclassed, exceptions that are not ``Exception`` subclasses, or a
    cancelled input) it is a plain ``DependencyError``.

    Attributes: ``upstream`` (the failed input future, when known; not kept when pickled),
    ``root`` (the original exception at the root of a chain of failures, also the
    ``__cause__``) and ``root_task`` (a label naming the call that raised it). The message
    names the root failure once; however long the chain, it does not grow.
    """

    def __init__(self, message: str, *, upstream: object = None,
                 root: BaseException | None = None, root_task: str | None = None):
        # BaseException.__init__ directly: in a combined class the next __init__ in the MRO
        # would be the root type's, whose signature is unknown (UnicodeDecodeError: 5 args).
        BaseException.__init__(self, message)
        self.upstream = upstream
        self.root = root
        self.root_task = root_task

    def __str__(self) -> str:
        # The root type's __str__ may read attributes this instance never got.
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        # A combined class is made at run time and cannot be pickled by reference: rebuild
        # it from the root type. The upstream future cannot cross processes; drop it.
        state = {k: v for k, v in self.__dict__.items() if k != "upstream"}
        base = _ROOT_OF.get(type(self))
        return (_rebuild_dependency_error, (base, self.args[0] if self.args else "", state))


# combined class -> root type, and root type -> combined class (None: cannot combine)
_ROOT_OF: dict[type, type] = {}
_COMBINED: dict[type, type[DependencyError] | None] = {}
_COMBINED_LOCK = threading.Lock()
# Never mix these into a DependencyError: catching them means something else (stop the
# program, end an iteration, a cancellation) and the interpreter treats them specially.
_NOT_COMBINED = (StopIteration, StopAsyncIteration, CancelledError)
_ROOT_TEXT = 300  # characters of the root failure's message kept in each message


def _combined_class(root_type: type) -> type[DependencyError] | None:
    """``DependencyError`` mixed with ``root_type`` (cached per type), or None if impossible."""
    with _COMBINED_LOCK:
        if root_type in _COMBINED:
            return _COMBINED[root_type]
        cls: type[DependencyError] | None = None
        can = (issubclass(root_type, Exception) and not issubclass(root_type, _NOT_COMBINED)
               and root_type.__flags__ & _BASETYPE)
        if issubclass(root_type, DependencyError):
            cls = root_type
        elif can:
            try:
                cls = type(f"DependencyError[{root_type.__name__}]",
                           (DependencyError, root_type),
                           {"__module__": __name__, "__qualname__":
                            f"DependencyError[{root_type.__qualname__}]"})
            except Exception:  # layout conflict, a metaclass or __init_subclass__ that refuses
                cls = None
        if cls is not None and cls is not root_type:
            _ROOT_OF[cls] = root_type
        _COMBINED[root_type] = cls
        return cls


_BASETYPE = 1 << 10  # Py_TPFLAGS_BASETYPE: the type may be subclassed


def _new_dependency_error(root_type: type | None, message: str) -> DependencyError:
    cls = _combined_class(root_type) if root_type is not None else None
    if cls is not None and cls is not DependencyError:
        try:
            # The root type's __new__ (OSError's builds errno/strerror from the arguments),
            # but DependencyError's __init__.
            err = cls.__new__(cls, message)
            DependencyError.__init__(err, message)
            return err
        except Exception:
            pass  # a __new__ with its own ideas: a plain DependencyError still says it all
    return DependencyError(message)


def _rebuild_dependency_error(root_type: type | None, message: str,
                              state: dict[str, Any]) -> DependencyError:
    err = _new_dependency_error(root_type, message)
    err.__dict__.update(state)
    return err


def failure_text(exc: BaseException) -> str:
    """What became of a call, for a message: ``"was cancelled (CancelledError)"`` or
    ``"failed with Type: text"`` (the text cut at ``_ROOT_TEXT`` characters; an exception
    whose ``__str__`` itself raises is named by its type alone)."""
    if isinstance(exc, CancelledError):
        return "was cancelled (CancelledError)"
    try:
        text = str(exc)
    except Exception:
        text = ""
    if len(text) > _ROOT_TEXT:
        text = text[:_ROOT_TEXT] + "..."
    return f"failed with {type(exc).__name__}: {text}" if text else \
        f"failed with {type(exc).__name__}"


def dependency_error(dependent: str, upstream: str, cause: BaseException, *,
                     future: object = None) -> DependencyError:
    """The exception of call ``dependent`` whose input ``upstream`` raised ``cause``.

    ``dependent`` and ``upstream`` are labels (say ``"g"`` and ``"task 3 (f)"``). When
    ``cause`` is itself a DependencyError, the new error names the root failure of the chain
    instead of nesting the messages, so each message is short and a long failed chain costs
    memory linear in its length. ``__cause__`` is the root exception.
    """
    if isinstance(cause, DependencyError) and cause.root is not None:
        root, root_task = cause.root, cause.root_task or upstream
    else:
        root, root_task = cause, upstream
    what = failure_text(root)
    if root_task == upstream:
        message = f"{dependent}: input {upstream} {what}"
    else:
        message = f"{dependent}: input {upstream} failed because {root_task} {what}"
    root_type = None if isinstance(root, (CancelledError, DependencyError)) else type(root)
    if isinstance(root, TaskExitError):
        root_type = WorkerDiedError  # only the call that exited is reported as a SystemExit
    err = _new_dependency_error(root_type, message)
    err.upstream = future
    err.root = root
    err.root_task = root_task
    err.__cause__ = root
    return err


class CacheMissError(ExecutorkitError, FileNotFoundError, KeyError):
    """A cache directory holds no entry for the requested key.

    A ``FileNotFoundError`` (what executorlib raises) and a ``KeyError`` (a lookup by key).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


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


class WorkerDiedError(ExecutorkitError, RuntimeError):
    """The process running a task ended without returning a result (or the task called
    ``sys.exit()``, which would have ended it).

    A ``RuntimeError``, like the stdlib's ``BrokenProcessPool`` and executorlib's
    ``ExecutorlibSocketError``, so ``except RuntimeError:`` catches it on every library.
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


class TaskExitError(WorkerDiedError, SystemExit):
    """A task called ``sys.exit()``: its process ended without a result.

    Both a :class:`WorkerDiedError` (a ``RuntimeError``, what executorlib users catch) and a
    ``SystemExit`` (what ``ProcessPoolExecutor.result()`` re-raises), so code written for
    either library keeps working. Left uncaught in the driver it ends the script like
    ``sys.exit(message)`` does: the message is printed and the exit status is 1, never a
    silent exit.
    """

    def __init__(self, message: str, **context: Any):
        super().__init__(message, **context)
        self.code = message  # what the interpreter prints if this ends the driver


def task_exception(exc: BaseException, name: str) -> BaseException:
    """What ``result()`` raises for an exception a task raised.

    An ``Exception`` is itself. ``SystemExit`` (the task called ``sys.exit()``),
    ``KeyboardInterrupt`` and other ``BaseException``s would end or interrupt the *driver*
    when re-raised there, silently for ``SystemExit``: they become a
    :class:`WorkerDiedError` naming what happened (:class:`TaskExitError` for
    ``sys.exit()``), the original as its ``__context__``.
    """
    if isinstance(exc, Exception):
        return exc
    if isinstance(exc, SystemExit):
        code = exc.code
        exitcode = code if isinstance(code, int) else (0 if code is None else 1)
        err: WorkerDiedError = TaskExitError(
            f"{name} called sys.exit({'' if code is None else repr(code)}), which ends its "
            f"process: no result", exitcode=exitcode)
    else:
        err = WorkerDiedError(f"{name} raised {type(exc).__name__}, which would stop the "
                              f"driver if raised there: no result")
    err.__context__ = exc
    err.__cause__ = exc.__cause__
    return err


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
