"""``get_cache_data``: a cache directory as a pandas DataFrame (pandas imported on use)."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

from executorkit.cache._access import stored_exception
from executorkit.cache._store import (
    CacheCorruptionWarning,
    CacheRecord,
    CorruptEntryError,
    entry_files,
    read_record,
)
from executorkit.errors import SerializationError

if TYPE_CHECKING:
    import pandas

__all__ = ["COLUMNS", "get_cache_data"]

COLUMNS = (
    "cache_key",
    "function",
    "function_name",
    "input_args",
    "input_kwargs",
    "output",
    "error",
    "error_text",
    "status",
    "runtime",
    "resource_dict",
    "hostname",
    "pid",
    "slot",
    "started",
    "finished",
    "filename",
)
_FLOAT_COLUMNS = ("runtime", "started", "finished")
_TEXT_COLUMNS = ("cache_key", "function_name", "status", "hostname", "filename")


def get_cache_data(
    cache_directory: str | os.PathLike[str], *, load_outputs: bool = True
) -> pandas.DataFrame:
    """One row per cache entry, oldest first.

    ``function`` is the unpickled task function, ``input_args`` a tuple, ``input_kwargs`` a
    dict, ``output`` the result (None for failed entries, and for all entries when
    ``load_outputs`` is False: outputs are then not even read), ``error`` the exception of a
    failed entry, ``started`` and ``finished`` UTC timestamps, ``runtime`` seconds.
    Unreadable files are skipped with a :class:`CacheCorruptionWarning`; a field that cannot
    be unpickled in this process (say, its module is not importable) is None, with a warning.
    A missing or empty directory gives an empty frame with the same columns.
    """
    rows = []
    # Entries of one task function share its pickle: unpickle it once (a function pickled
    # by value is rebuilt from its code, and a failure is reported once, not per row).
    functions: dict[bytes, Any] = {}
    for path in entry_files(cache_directory):
        row = _row(path, load_outputs, functions)
        if row is not None:
            rows.append(row)
    rows.sort(key=lambda row: (row["started"], row["filename"]))
    return _frame(rows)


def _row(path: str, load_outputs: bool, functions: dict[bytes, Any]) -> dict[str, Any] | None:
    try:
        record = read_record(path, load_output=load_outputs)
    except KeyError:
        return None  # removed since the directory was listed
    except CorruptEntryError as exc:
        warnings.warn(f"skipping unreadable cache file {path}: {exc}", CacheCorruptionWarning,
                      stacklevel=3)
        return None
    failed = record.status == "failed"
    if record.function not in functions:
        functions[record.function] = _load(record.function, "function", path)
    return {
        "cache_key": record.key,
        "function": functions[record.function],
        "function_name": record.function_name,
        "input_args": _load(record.args, "args", path),
        "input_kwargs": _load(record.kwargs, "kwargs", path),
        "output": _load(record.output, "output", path) if not failed else None,
        "error": _error(record, path) if failed else None,
        "error_text": record.error_text,
        "status": record.status,
        "runtime": record.runtime,
        "resource_dict": record.resource_dict,
        "hostname": record.hostname,
        "pid": record.pid,
        "slot": record.slot,
        "started": record.started,
        "finished": record.finished,
        "filename": path,
    }


def _load(data: bytes | None, what: str, path: str) -> Any:
    if data is None:
        return None
    import pickle

    try:
        return pickle.loads(data)
    except MemoryError:
        raise
    except Exception as exc:
        warnings.warn(f"cannot unpickle the {what} stored in {path} "
                      f"({type(exc).__name__}: {exc}); showing None", CacheCorruptionWarning,
                      stacklevel=4)
        return None


def _error(record: CacheRecord, path: str) -> BaseException | None:
    try:
        return stored_exception(record, path)
    except SerializationError as exc:
        warnings.warn(f"{exc}; showing None", CacheCorruptionWarning, stacklevel=4)
        return None


def _frame(rows: list[dict[str, Any]]) -> pandas.DataFrame:
    import numpy
    import pandas

    columns: dict[str, Any] = {}
    for name in COLUMNS:
        if name in _FLOAT_COLUMNS:
            columns[name] = numpy.array([row[name] for row in rows], dtype="f8")
        elif name == "pid":
            columns[name] = numpy.array([row[name] for row in rows], dtype="i8")
        elif name in _TEXT_COLUMNS:
            columns[name] = [row[name] for row in rows]
        else:
            # Filled one by one: handing numpy a list of tuples or arrays would broadcast them.
            # An explicit object Series also keeps None as None (error_text of done entries).
            values = numpy.empty(len(rows), dtype=object)
            for index, row in enumerate(rows):
                values[index] = row[name]
            columns[name] = pandas.Series(values, dtype=object)
    for name in ("started", "finished"):
        columns[name] = pandas.to_datetime(columns[name], unit="s", utc=True)
    return pandas.DataFrame(columns, columns=list(COLUMNS))
