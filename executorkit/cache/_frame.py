"""``get_cache_data``: a cache directory as a pandas DataFrame (pandas imported on use)."""

from __future__ import annotations

import contextlib
import gc
import operator
import os
import pickle
import warnings
from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any

from executorkit.cache._access import stored_exception
from executorkit.cache._catalogue import Row, list_rows
from executorkit.cache._store import CacheCorruptionWarning
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


def get_cache_data(
    cache_directory: str | os.PathLike[str], *, load_outputs: bool = True
) -> pandas.DataFrame:
    """One row per cache entry, oldest first.

    ``function`` is the unpickled task function, ``input_args`` a tuple, ``input_kwargs`` a
    dict, ``output`` the result (None for failed entries, and for all entries when
    ``load_outputs`` is False: outputs are then not unpickled, nor read from their files
    unless an entry is read whole anyway), ``error`` the exception of a
    failed entry, ``started`` and ``finished`` UTC timestamps, ``runtime`` seconds.
    Unreadable files are skipped with a :class:`CacheCorruptionWarning`; a field that cannot
    be unpickled in this process (say, its module is not importable) is None, with a warning.
    A missing or empty directory gives an empty frame with the same columns.

    What the entries hold is kept in a catalogue file per directory
    (``.executorkit-catalogue``; large pickles stay in the entries' files only), so a
    listing reads only the entries that are new or changed since the last one. It is only a
    cache, checked against each entry's file (see docs/cache.md).
    """
    with _collector_paused():
        listing = list_rows(cache_directory, load_outputs=load_outputs)
        problems = [f"skipping unreadable cache file {path}: {exc}"
                    for path, exc in listing.unreadable]
        rows = sorted(listing.rows, key=_OLDEST_FIRST)
        frame = _frame(rows, problems)
    for problem in problems:
        warnings.warn(problem, CacheCorruptionWarning, stacklevel=2)
    return frame


_OLDEST_FIRST = operator.attrgetter("started", "path")


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: a listing allocates several containers per entry
    (none of them in a cycle), and each collection they trigger walks every object alive in
    the process: a large share of the time of a large listing in a busy session."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _frame(rows: list[Row], problems: list[str]) -> pandas.DataFrame:
    """The frame, built column by column: the rows are transposed at once (``zip``), which
    costs far less than a dictionary per row. What cannot be unpickled shows as None and is
    added to ``problems``."""
    import numpy
    import pandas

    load = _Loader(problems)
    cols = Row._make(zip(*rows, strict=True)) if rows else Row._make(() for _ in Row._fields)
    started = numpy.array(cols.started, dtype="f8")
    finished = numpy.array(cols.finished, dtype="f8")
    columns: dict[str, Any] = {
        "cache_key": list(cols.key),
        "function": _objects(_functions(cols.function, cols.path, load)),
        "function_name": list(cols.function_name),
        "input_args": _objects(list(map(load, cols.args, repeat("args"), cols.path))),
        "input_kwargs": _objects(list(map(load, cols.kwargs, repeat("kwargs"), cols.path))),
        "output": _objects(list(map(load, cols.output, repeat("output"), cols.path))),
        "error": _objects([load.error(row) if row.status == "failed" else None for row in rows]),
        "error_text": _objects(cols.error_text),
        "status": list(cols.status),
        "runtime": finished - started,
        "resource_dict": _objects(cols.resource_dict),
        "hostname": list(cols.hostname),
        "pid": numpy.array(cols.pid, dtype="i8"),
        "slot": _objects(cols.slot),
        "started": pandas.to_datetime(started, unit="s", utc=True),
        "finished": pandas.to_datetime(finished, unit="s", utc=True),
        "filename": list(cols.path),
    }
    return pandas.DataFrame(columns, columns=list(COLUMNS))


def _functions(pickles: tuple[bytes, ...], paths: tuple[str, ...], load: _Loader) -> list[Any]:
    # Entries of one task function share its pickle: unpickle it once (a function pickled
    # by value is rebuilt from its code, and a failure is reported once, not per row).
    loaded: dict[bytes, Any] = {}
    for data, path in zip(pickles, paths, strict=True):
        if data not in loaded:
            loaded[data] = load(data, "function", path)
    return [loaded[data] for data in pickles]


def _objects(values: Sequence[Any]) -> Any:
    """An object column holding ``values`` as they are. ``fromiter`` takes each value as one
    element, where ``numpy.array`` would broadcast a list of tuples or arrays; an explicit
    object Series also keeps None as None (error_text of done entries)."""
    import numpy
    import pandas

    column = numpy.fromiter(values, dtype=object, count=len(values))
    return pandas.Series(column, dtype=object, copy=False)


class _Loader:
    """Unpickles fields; one that fails shows as None, and why goes to ``problems``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def __call__(self, data: bytes | None, what: str, path: str) -> Any:
        if data is None:
            return None
        try:
            return pickle.loads(data)
        except MemoryError:
            raise
        except Exception as exc:
            self.problems.append(f"cannot unpickle the {what} stored in {path} "
                                 f"({type(exc).__name__}: {exc}); showing None")
            return None

    def error(self, row: Row) -> BaseException | None:
        try:
            return stored_exception(row, row.path)
        except SerializationError as exc:
            self.problems.append(f"{exc}; showing None")
            return None
