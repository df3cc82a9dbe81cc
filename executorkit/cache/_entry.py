"""A catalogued entry: what a listing needs of one cache file without opening it.

The catalogue keeps one per entry it read; the entry's writer journals one per entry it
wrote (:mod:`executorkit.cache._journal`). Both store it as a tuple of plain data, loaded by
:class:`PlainUnpickler`, which refuses every global, so neither file can run code.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
from typing import Any, NamedTuple, Protocol

__all__ = ["INLINE_MAX", "Entry", "Place", "PlainUnpickler", "build", "digest", "entry_table"]

# Pickles of a few kilobytes are the rule; a large one (an array argument or result) stays in
# its file only, so neither the catalogue nor the journal grows into a second copy of the
# campaign's data.
INLINE_MAX = 8192
DIGEST_SIZE = 32

Place = tuple[int, int, bytes]  # (offset, length, blake2b-256) of a field in the entry's file


class Entry(NamedTuple):
    """One entry's metadata, its pickled function, args, kwargs (a :data:`Place` when larger
    than :data:`INLINE_MAX`) and error, where its output lies, and the identity
    (``file_identity``) of the file it describes."""

    key: str
    function_name: str
    status: str
    started: float
    finished: float
    hostname: str
    pid: int
    resource_dict: dict[str, Any]
    error_text: str | None
    slot: int | None
    error: bytes | None
    function: bytes | Place
    args: bytes | Place
    kwargs: bytes | Place
    output: Place | None  # None: a failed call, or a file only HDF5 can read
    identity: tuple[int, ...]


class Fields(Protocol):
    """The fields of a cache record an entry is built from (a ``CacheRecord``)."""

    key: str
    function_name: str
    status: str
    started: float
    finished: float
    hostname: str
    pid: int
    resource_dict: dict[str, Any]
    error_text: str | None
    slot: int | None
    error: bytes | None
    function: bytes
    args: bytes
    kwargs: bytes


def build(record: Fields, identity: tuple[int, ...], places: dict[str, tuple[int, int]],
          output_digest: bytes | None) -> Entry:
    """The entry of a file holding ``record``, its datasets at ``places`` (name -> (offset,
    length); {} for a file only HDF5 can read) and its output's digest as its header holds
    it. The strings most entries share are interned: a pickle of many entries then stores
    each once."""
    done_at = places.get("output")
    output = (*done_at, output_digest) if done_at and output_digest else None
    return Entry(
        record.key, sys.intern(record.function_name), sys.intern(record.status),
        record.started, record.finished, sys.intern(record.hostname), record.pid,
        record.resource_dict, record.error_text, record.slot, record.error,
        _placed(record.function, places.get("function")),
        _placed(record.args, places.get("args")),
        _placed(record.kwargs, places.get("kwargs")),
        output,  # type: ignore[arg-type]
        identity,
    )


def _placed(data: bytes, place: tuple[int, int] | None) -> bytes | Place:
    if len(data) <= INLINE_MAX or place is None:
        return data  # a large field of a file only HDF5 can read is kept inline
    return (*place, digest(data))


def digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


class PlainUnpickler(pickle.Unpickler):
    """Loads plain data only: no class or function can be named, so nothing runs."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a catalogue holds plain data, not {module}.{name}")


_WIDTH = len(Entry._fields)


def entry_table(table: Any) -> dict[str, Entry]:
    """``{file name: entry}`` from its plain form ``{file name: tuple}``; TypeError if
    malformed."""
    if not isinstance(table, dict):
        raise TypeError("the catalogue is not a table")
    entries = {}
    for name, value in table.items():
        if not (type(name) is str and type(value) is tuple and len(value) == _WIDTH):
            raise TypeError("the catalogue holds a malformed entry")
        entries[name] = tuple.__new__(Entry, value)
    return entries
