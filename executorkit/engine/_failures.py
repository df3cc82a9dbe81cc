"""Failures as the caller sees them: a worker's error rebuilt in the driver (with the remote
traceback and the source lines only the driver has), the name of what cannot be pickled,
and the ``error_log_file`` record.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pickle
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

import cloudpickle

from executorkit._sources import fill_source_lines
from executorkit.errors import (
    RemoteError,
    RemoteTraceback,
    SerializationError,
    WorkerImportError,
    task_exception,
)
from executorkit.transport import ErrorInfo

if TYPE_CHECKING:
    from executorkit.engine._records import _Task

log = logging.getLogger("executorkit")


def _describe_unpicklable(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                          exc: Exception) -> str:
    """Name the first part of the call that cannot be pickled."""
    name = getattr(fn, "__qualname__", repr(fn))
    parts: list[tuple[str, Any]] = [("the function", fn)]
    parts += [(f"argument {i}", a) for i, a in enumerate(args)]
    parts += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for label, obj in parts:
        try:
            cloudpickle.dumps(obj)
        except Exception as inner:
            return (f"cannot submit {name}: {label} ({type(obj).__qualname__}) cannot be "
                    f"pickled: {type(inner).__name__}: {inner}")
    return f"cannot submit {name}: the call cannot be pickled: {type(exc).__name__}: {exc}"


def _error_from_info(info: ErrorInfo, name: str, fn: Any = None) -> BaseException:
    exc: BaseException | None = None
    if info.exc is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(info.exc)
    if isinstance(exc, WorkerImportError):
        err: BaseException = WorkerImportError(
            f"{name}: {exc}{_found_in_driver(exc.module)}", module=exc.module,
            worker_path=exc.worker_path)
    elif info.kind == "serialization":
        err = SerializationError(f"{name}: {info.type_name}: {info.message}")
        if exc is not None:
            err.__context__ = exc
    elif exc is None:
        err = RemoteError(info.type_name, info.message)
    else:
        err = task_exception(exc, name)
    err.__cause__ = RemoteTraceback(fill_source_lines(info.traceback, fn))
    return err



def _found_in_driver(module: str | None) -> str:
    found = getattr(sys.modules.get(module or ""), "__file__", None)
    return f" (the driver imported it from {found})" if found else ""


def _rebuild_error(payload: bytes, task: _Task) -> BaseException:
    info: ErrorInfo = pickle.loads(payload)
    return _error_from_info(info, task.name(), task.fn)


def _log_failure(task: _Task, exc: BaseException) -> None:
    """Append one failure record; flock makes concurrent writers (tasks, executors) safe."""
    path = task.res.error_log_file
    assert path is not None
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc.__cause__, RemoteTraceback):
        tb = exc.__cause__.tb + tb
    record = (
        f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} task {task.id} function {task.name()}\n"
        f"args: {_short(task.args)}\nkwargs: {_short(task.kwargs)}\n{tb}\n"
    )
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, record.encode())
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno != errno.ENOENT:
            log.warning("could not write error_log_file %s: %s", path, err)


def _short(obj: Any, limit: int = 500) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "...<truncated>"

