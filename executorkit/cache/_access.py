"""Public helpers that read or prune a cache directory without an executor."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import time
import warnings
from concurrent.futures import Future
from typing import Any

from executorkit.cache._catalogue import Row, forget, list_rows, remove_catalogues
from executorkit.cache._store import (
    CORRUPT_SUFFIX,
    STATUSES,
    TMP_SUFFIX,
    CacheCorruptionWarning,
    CacheRecord,
    CorruptEntryError,
    entry_files,
    entry_path,
    read_record,
)
from executorkit.errors import (
    RemoteError,
    RemoteTraceback,
    ResourceError,
    SerializationError,
    task_exception,
)

__all__ = ["clear_cache", "get_future_from_cache", "remove_stale_temporaries", "stored_exception"]

# A temporary file is left over from a killed writer when nothing has touched it for a while
# and its writer is gone.  The writer's pid is only meaningful on this host, so files whose
# writer could be elsewhere are kept for an hour before they count as stale.
_TMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)\.[0-9a-f]+" + re.escape(TMP_SUFFIX) + "$")
_TMP_IDLE_DEAD_WRITER = 60.0
_TMP_IDLE_ANY_WRITER = 3600.0


def get_future_from_cache(cache_directory: str | os.PathLike[str], cache_key: str) -> Future[Any]:
    """A finished future holding the stored result of ``cache_key``.

    Raises :class:`~executorkit.errors.CacheMissError` (a ``FileNotFoundError`` and a
    ``KeyError``) if the directory has no such entry, the recorded exception itself if the
    entry is of a failed call (as executorlib does; its worker traceback is the
    ``__cause__``), and SerializationError if the entry cannot be read or unpickled.
    """
    path = entry_path(cache_directory, cache_key)
    try:
        record = read_record(path, load_inputs=False, missing=cache_key)
    except CorruptEntryError as exc:
        raise SerializationError(f"cache entry {cache_key!r} in {path} is unreadable: {exc}") \
            from exc
    if record.status != "done":
        raise stored_exception(record, path)
    future: Future[Any] = Future()
    future.set_result(_unpickle(record.output, "output", path))
    return future


def stored_exception(record: CacheRecord | Row, path: str) -> BaseException:
    """The exception of a failed record, with the worker's traceback attached as its cause.

    An exception that could not be pickled by the worker is replaced by a RemoteError named
    after the last line of the traceback.
    """
    text = record.error_text
    if record.error is not None:
        error = _unpickle(record.error, "exception", path)
        if isinstance(error, BaseException):
            error = task_exception(error, record.function_name or "the call")
            if text and error.__cause__ is None:
                error.__cause__ = RemoteTraceback(text)
            return error
    type_name, message = _last_line(text)
    error = RemoteError(type_name, message)
    if text:
        error.__cause__ = RemoteTraceback(text)
    return error


def clear_cache(
    cache_directory: str | os.PathLike[str],
    *,
    status: str | None = None,
    function: str | None = None,
    before: float | None = None,
) -> int:
    """Delete cache entries; return how many entries (``<key>.h5`` files) were removed.

    Filters combine: ``status`` ("done" or "failed"), ``function`` (the stored function name,
    either fully qualified like ``"mymod.f"`` or its last part ``"f"``), ``before`` (entries
    that finished before this epoch time).  Without any filter every entry goes, together with
    ``.corrupt`` files and the catalogues (see get_cache_data); filtered removals are dropped
    from the catalogues.  Temporary files left behind by killed writers go in either case
    (not counted), once stale: untouched for a minute with their writer's pid gone from this
    host, or for an hour (their writer may be on another node).
    Unreadable entries never match a filter; they are reported with a warning.
    """
    if status is not None and status not in STATUSES:
        raise ResourceError(
            f"clear_cache(status={status!r}) is invalid: use 'done', 'failed' or None",
            key="status",
            allowed="'done', 'failed' or None",
        )
    unfiltered = status is None and function is None and before is None
    removed = _remove_all(cache_directory) if unfiltered else \
        _remove_matching(cache_directory, status, function, before)
    _remove_debris(os.fspath(cache_directory), corrupt=unfiltered)
    return removed


def _remove_all(directory: str | os.PathLike[str]) -> int:
    removed = 0
    for path in entry_files(directory):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed += 1
    remove_catalogues(directory)
    return removed


def _remove_matching(directory: str | os.PathLike[str], status: str | None,
                     function: str | None, before: float | None) -> int:
    """Remove the entries the filters match, found through the catalogue (metadata only),
    and drop them from it."""
    listing = list_rows(directory, load_outputs=False, load_inputs=False)
    for path, exc in listing.unreadable:
        warnings.warn(f"skipping unreadable cache file {path}: {exc}", CacheCorruptionWarning,
                      stacklevel=3)
    gone: dict[str, list[str]] = {}
    for row in listing.rows:
        if _matches(row, status, function, before):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(row.path)
                folder, name = os.path.split(row.path)
                gone.setdefault(folder, []).append(name)
    for folder, names in gone.items():
        forget(folder, names)
    return sum(map(len, gone.values()))


def _matches(row: Row, status: str | None, function: str | None, before: float | None) -> bool:
    name = row.function_name
    return (
        (status is None or row.status == status)
        and (function is None or name == function or name.endswith("." + function))
        and (before is None or row.finished < before)
    )


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> None:
    """Delete the temporary files of writers that were killed mid-write (never read: they
    are not entries). Run when an executor opens a cache directory and by clear_cache."""
    _remove_debris(os.fspath(directory), corrupt=False)


def _remove_debris(directory: str, *, corrupt: bool) -> None:
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    now = time.time()
    for name in names:
        path = os.path.join(directory, name)
        if (corrupt and name.endswith(CORRUPT_SUFFIX)) or _is_stale_tmp(name, path, now):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _is_stale_tmp(name: str, path: str, now: float) -> bool:
    match = _TMP_NAME.match(name)
    if match is None:
        return False
    try:
        idle = now - os.stat(path).st_mtime
    except FileNotFoundError:
        return False
    if idle > _TMP_IDLE_ANY_WRITER:
        return True
    return idle > _TMP_IDLE_DEAD_WRITER and not _pid_alive(int(match["pid"]))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OverflowError:
        return False
    return True


def _unpickle(data: bytes | None, what: str, path: str) -> Any:
    try:
        return pickle.loads(data)  # type: ignore[arg-type]
    except MemoryError:
        raise
    except Exception as exc:
        raise SerializationError(f"cannot unpickle the {what} stored in {path}: "
                                 f"{type(exc).__name__}: {exc}") from exc


def _last_line(text: str | None) -> tuple[str, str]:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return "Exception", "the task failed; its exception could not be stored"
    type_name, _, message = lines[-1].partition(": ")
    return type_name.strip(), message
