"""The catalogue of a cache directory: what listings read from its entries, kept so that the
next listing takes an unchanged entry from there for the cost of one ``stat``.

File ``<folder>/.executorkit-catalogue``, one per folder (sub-directories have their own)::

    b"EKITCAT"  format (1 byte)  length of the entries section (8 bytes)
    blake2b-256 of the entries section  blake2b-256 of the outputs section
    entries section  outputs section

Both sections are pickles of plain data only, loaded by an unpickler that refuses every
global (so a catalogue cannot run code). The entries section is ``{file name: entry}`` (an
:class:`~executorkit.cache._entry.Entry` as a tuple): the identity of the file it was read from
(:func:`file_identity`: inode, device, size, modification and change times), the metadata,
and the pickled function, args, kwargs and error; a pickled input larger than
``INLINE_MAX`` bytes is held only as (offset, length, digest) in the entry's own file, read
and checked when a listing needs it. Equal function pickles are one object, so the pickle
stores them once. The outputs section, ``{file name: pickled output}``, holds the outputs
of up to ``INLINE_MAX`` bytes that a listing with outputs has read; a listing without
outputs does not read it.

The catalogue is only a cache, never a source of entries:

* the directory listing decides which entries exist: a deleted entry is gone from the next
  listing, however the catalogue was left;
* an entry is taken from the catalogue only while its file has the identity recorded; any
  other file is read (the identity recorded is the ``fstat`` of the very file read, so a
  writer renaming a new version into place meanwhile cannot pair old contents with a new
  identity);
* a catalogue that is missing, torn, of another format or fails a digest is ignored and
  rebuilt;
* entry writers (the workers) never touch it; they append to the folder's journal
  (:mod:`executorkit.cache._journal`), whose entries a listing takes over the catalogue's,
  under the same identity check, and folds into the catalogue it saves. A listing that read
  anything, took anything from the journal, or found entries gone, replaces it atomically
  (temporary file, then rename; a stale temporary is removed like an entry's). Concurrent
  listings may each replace it: the last one wins, and entries it lacks are read again by
  the next listing.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import secrets
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from executorkit.cache._entry import (
    DIGEST_SIZE,
    INLINE_MAX,
    Place,
    PlainUnpickler,
    build,
    digest,
    entry_table,
)
from executorkit.cache._entry import Entry as _Entry
from executorkit.cache._journal import Journaled, claim
from executorkit.cache._journal import remove as remove_journal
from executorkit.cache._store import (
    ANY_SIZE,
    TMP_SUFFIX,
    CacheRecord,
    CorruptEntryError,
    ListedRecord,
    entry_folders,
    file_identity,
    read_listed,
)
from executorkit.errors import CacheMissError

__all__ = ["CATALOGUE", "Listing", "Row", "forget", "list_rows", "remove_catalogues"]

CATALOGUE = ".executorkit-catalogue"
_MAGIC = b"EKITCAT"
_FORMAT = 1
_HEAD = struct.Struct(f"<7sBQ{DIGEST_SIZE}s{DIGEST_SIZE}s")
_PLACEABLE = ("function", "args", "kwargs")


class Row(NamedTuple):
    """One entry as a listing gives it: the fields of its record (the pickled ones as bytes;
    function, args and kwargs ``b""`` when inputs were not asked for, output None when
    outputs were not, or the call failed) and the path of its file."""

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
    output: bytes | None
    path: str


# A row is built from an unchanged entry by slicing (a large listing is mostly that):
_METADATA = Row._fields.index("function")  # rows and entries share the fields before it
_INPUTS = Row._fields.index("output")  # ... and, for inputs held inline, the ones before this
assert _Entry._fields[:_INPUTS] == Row._fields[:_INPUTS]
# NamedTuple._make is a Python function around tuple.__new__; listings make one per entry.
_as_row = functools.partial(tuple.__new__, Row)
_as_entry = functools.partial(tuple.__new__, _Entry)
_WIDTH = len(_Entry._fields)


@dataclass
class Listing:
    """The entries of a cache directory: a :class:`Row` for each readable one, in directory
    order, and ``(path, error)`` for each unreadable one."""

    rows: list[Row] = field(default_factory=list)
    unreadable: list[tuple[str, CorruptEntryError]] = field(default_factory=list)


def list_rows(
    directory: str | os.PathLike[str], *, load_outputs: bool, load_inputs: bool = True
) -> Listing:
    """Every entry of ``directory`` and its sub-directories, as :func:`read_record` would read
    it, through the catalogue of each folder, which is brought up to date."""
    listing = Listing()
    for folder, names in entry_folders(directory):
        with _Stored.read(folder) as stored:
            stored.absorb(claim(folder))
            _Folder(folder, stored, outputs=load_outputs, inputs=load_inputs).list(names, listing)
    return listing


def forget(folder: str, names: list[str]) -> None:
    """Drop the entries ``names`` (file names), just deleted from ``folder``, from its
    catalogue, so the next listing has nothing to rewrite."""
    gone = set(names)
    with _Stored.read(folder) as stored:
        if gone.isdisjoint(stored.entries):
            return
        entries = {name: entry for name, entry in stored.entries.items() if name not in gone}
        outputs = {name: data for name, data in stored.outputs().items() if name in entries}
    _save(folder, entries, outputs)


def remove_catalogues(directory: str | os.PathLike[str]) -> None:
    """Delete the catalogue and the journal of ``directory`` and of each sub-directory."""
    for folder, _names in entry_folders(directory):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, CATALOGUE))
        remove_journal(folder)


class _Folder:
    """One folder's listing: its catalogue as found, the entries found, and whether the
    catalogue must be written again."""

    def __init__(self, folder: str, stored: _Stored, *, outputs: bool, inputs: bool) -> None:
        self.folder, self.stored, self.outputs, self.inputs = folder, stored, outputs, inputs
        self.known = stored.entries
        self.known_outputs = stored.outputs() if outputs else {}
        self.found: dict[str, _Entry] = {}
        # the outputs to keep: all of them with ``outputs``, else only those read here
        self.found_outputs: dict[str, bytes] = {}
        self.changed = stored.journaled  # what a claimed journal said is kept in no other place
        self._functions: dict[bytes, bytes] | None = None

    def list(self, names: list[str], listing: Listing) -> None:
        prefix = os.path.join(self.folder, "")  # the paths os.path.join gives, made faster
        for name in names:
            path = prefix + name
            try:
                row = self._row(name, path)
            except (FileNotFoundError, CacheMissError):
                continue  # removed since the directory was listed
            except CorruptEntryError as exc:
                listing.unreadable.append((path, exc))
                continue
            listing.rows.append(row)
        if self.changed or len(self.found) != len(self.known):
            outputs = self.found_outputs if self.outputs else \
                {**self._outputs_kept(), **self.found_outputs}
            _save(self.folder, self.found, outputs)

    def _row(self, name: str, path: str) -> Row:
        entry = self.known.get(name)
        output = self.known_outputs.get(name)  # a catalogue holds outputs of its entries only
        if entry is not None and not self._needs_file(entry, output) \
                and file_identity(os.stat(path)) == entry.identity:
            return self._keep(name, entry, path, output)  # the common case: one stat
        fd = os.open(path, os.O_RDONLY)
        try:
            stat = os.fstat(fd)
            if entry is not None and file_identity(stat) == entry.identity:
                fields = self._read_places(fd, entry, output)
                if fields is not None:
                    return self._keep(name, entry, path, fields.pop("output", None), fields)
            # Small outputs are in the buffer read anyway: the catalogue keeps them for the
            # listings that load outputs, even when this one does not.
            listed = read_listed(path, fd, stat,
                                 output_up_to=ANY_SIZE if self.outputs else INLINE_MAX)
        finally:
            os.close(fd)
        return self._add(name, path, listed)

    def _needs_file(self, entry: _Entry, output: bytes | None) -> bool:
        if self.outputs and entry.status == "done" and output is None:
            return True
        return self.inputs and (type(entry.function) is tuple or type(entry.args) is tuple
                                or type(entry.kwargs) is tuple)

    def _read_places(self, fd: int, entry: _Entry, output: bytes | None) -> dict[str, bytes] | None:
        """The fields this listing wants (``output``: the one the catalogue holds, if any);
        those held only in the file are read from there. None if one of them is not where
        the catalogue says (the entry is then read whole)."""
        wanted: dict[str, Place | None] = {}
        if self.inputs:
            wanted.update((name, value) for name in _PLACEABLE
                          if type(value := getattr(entry, name)) is tuple)
        fields: dict[str, bytes] = {}
        if self.outputs and entry.status == "done":
            if output is None:
                wanted["output"] = entry.output
            else:
                fields["output"] = output
        for name, place in wanted.items():
            if place is None:
                return None
            offset, length, expected = place
            data = os.pread(fd, length, offset)
            if len(data) != length or digest(data) != expected:
                return None
            fields[name] = data
        return fields

    def _keep(self, name: str, entry: _Entry, path: str, output: bytes | None,
              fields: dict[str, bytes] | None = None) -> Row:
        self.found[name] = entry
        if output is not None:
            self._remember_output(name, output)
        if not self.inputs:
            return _as_row((*entry[:_METADATA], b"", b"", b"", output, path))
        if fields:
            inputs = tuple(fields.get(name, getattr(entry, name)) for name in _PLACEABLE)
            return _as_row((*entry[:_METADATA], *inputs, output, path))
        return _as_row((*entry[:_INPUTS], output, path))

    def _add(self, name: str, path: str, listed: ListedRecord) -> Row:
        record = listed.record
        self.changed = True
        if listed.identity is not None:  # else the file changed while it was read
            self.found[name] = self._entry(listed)
            if record.output is not None:
                self._remember_output(name, record.output)
        return _row_of(record, path, inputs=self.inputs, outputs=self.outputs)

    def _remember_output(self, name: str, output: bytes) -> None:
        if len(output) <= INLINE_MAX:
            self.found_outputs[name] = output
            if self.known_outputs.get(name) is not output:
                self.changed = True

    def _outputs_kept(self) -> dict[str, bytes]:
        """The outputs the catalogue held for the entries kept unchanged by a listing that
        did not load outputs."""
        return {name: data for name, data in self.stored.outputs().items()
                if name in self.found and self.found[name] is self.known.get(name)}

    def _entry(self, listed: ListedRecord) -> _Entry:
        assert listed.identity is not None
        entry = build(listed.record, listed.identity, listed.places, listed.output_digest)
        function = self._shared(entry.function)
        return entry if function is entry.function else entry._replace(function=function)

    def _shared(self, function: bytes | Place) -> bytes | Place:
        """One object per distinct function pickle, so the catalogue stores it once."""
        if type(function) is not bytes:
            return function
        if self._functions is None:
            self._functions = {e.function: e.function for e in self.known.values()
                               if type(e.function) is bytes}
        return self._functions.setdefault(function, function)


def _row_of(record: CacheRecord, path: str, *, inputs: bool, outputs: bool) -> Row:
    function, args, kwargs = (record.function, record.args, record.kwargs) if inputs \
        else (b"", b"", b"")
    return Row(record.key, record.function_name, record.status, record.started,
               record.finished, record.hostname, record.pid, record.resource_dict,
               record.error_text, record.slot, record.error, function, args, kwargs,
               record.output if outputs else None, path)


class _Stored:
    """A folder's catalogue file as found: its entries, and its outputs, read on demand from
    the same open file (so they belong to these entries, whatever replaced the file since)."""

    def __init__(self, entries: dict[str, _Entry], fd: int | None = None,
                 outputs_at: int = 0, outputs_digest: bytes = b"") -> None:
        self.entries = entries
        self._fd, self._outputs_at, self._outputs_digest = fd, outputs_at, outputs_digest
        self._outputs: dict[str, bytes] | None = None
        self._journal_outputs: dict[str, bytes] = {}
        self._journaled_names: set[str] = set()

    def absorb(self, journaled: Journaled) -> None:
        """Take what the journal says of a file name over what the catalogue says (each entry
        is trusted only while its file has the identity it records, like the catalogue's)."""
        functions = {e.function: e.function for e in self.entries.values()
                     if type(e.function) is bytes}
        entries = {}
        for name, record in journaled.items():
            entry = _journaled_entry(record, functions)
            if entry is not None:
                entries[name] = entry
                if record[0] is not None:
                    self._journal_outputs[name] = record[0]
        if entries:
            self.entries = {**self.entries, **entries}
            self._journaled_names = set(entries)
            self._outputs = None

    @property
    def journaled(self) -> bool:
        """Whether a journal said something the catalogue must now hold."""
        return bool(self._journaled_names)

    @classmethod
    def read(cls, folder: str) -> _Stored:
        """The catalogue of ``folder``; an empty one if there is none or it cannot be
        trusted (torn, damaged, of another format)."""
        try:
            fd = os.open(os.path.join(folder, CATALOGUE), os.O_RDONLY)
        except OSError:
            return cls({})
        try:
            magic, version, length, entries_digest, outputs_digest = _HEAD.unpack(
                os.pread(fd, _HEAD.size, 0))
            payload = os.pread(fd, length, _HEAD.size)
            if magic != _MAGIC or version != _FORMAT or digest(payload) != entries_digest:
                raise ValueError("not a catalogue of this format, or a damaged one")
            entries = entry_table(PlainUnpickler(io.BytesIO(payload)).load())
        except Exception:
            os.close(fd)
            return cls({})
        return cls(entries, fd, _HEAD.size + length, outputs_digest)

    def outputs(self) -> dict[str, bytes]:
        """The pickled outputs held for the entries, by file name: the journal's, and the
        catalogue's for the names not journaled ({} if they are damaged)."""
        if self._outputs is None:
            self._outputs = {}
            if self._fd is not None:
                with contextlib.suppress(Exception):
                    size = os.fstat(self._fd).st_size - self._outputs_at
                    payload = os.pread(self._fd, size, self._outputs_at)
                    if digest(payload) == self._outputs_digest:
                        self._outputs = _outputs(PlainUnpickler(io.BytesIO(payload)).load(),
                                                 self.entries)
            if self._journaled_names:  # the catalogue's output of those is another version's
                self._outputs = {name: data for name, data in self._outputs.items()
                                 if name not in self._journaled_names} | self._journal_outputs
        return self._outputs

    def __enter__(self) -> _Stored:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _journaled_entry(record: tuple[Any, ...], functions: dict[bytes, bytes]) -> _Entry | None:
    """The entry of a journal record ``(output, *entry)`` as the catalogue holds one: equal
    strings and function pickles one object each, so its pickle stores them once. None if
    malformed."""
    if len(record) != _WIDTH + 1:
        return None
    (_output, key, function_name, status, started, finished, hostname, pid, resource_dict,
     error_text, slot, error, function, args, kwargs, output, identity) = record
    if type(function) is bytes:
        function = functions.setdefault(function, function)
    try:
        return _as_entry((key, sys.intern(function_name), sys.intern(status), started,
                          finished, sys.intern(hostname), pid, resource_dict, error_text, slot,
                          error, function, args, kwargs, output, identity))
    except TypeError:  # a string field that is not one
        return None


def _outputs(table: Any, entries: dict[str, _Entry]) -> dict[str, bytes]:
    if not isinstance(table, dict) or not all(
            name in entries and type(data) is bytes for name, data in table.items()):
        raise TypeError("the catalogue holds malformed outputs")
    return table


def _save(folder: str, entries: dict[str, _Entry], outputs: dict[str, bytes]) -> None:
    """Replace ``folder``'s catalogue atomically; a folder without entries keeps none. A
    folder that cannot be written (a read-only campaign) just keeps listing by reading."""
    final = os.path.join(folder, CATALOGUE)
    if not entries:
        with contextlib.suppress(OSError):
            os.unlink(final)
        return
    table = pickle.dumps({name: tuple(entry) for name, entry in entries.items()}, protocol=5)
    held = pickle.dumps(outputs, protocol=5)
    head = _HEAD.pack(_MAGIC, _FORMAT, len(table), digest(table), digest(held))
    tmp = f"{final}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        with open(tmp, "xb") as fh:
            fh.write(head)
            fh.write(table)
            fh.write(held)
        os.replace(tmp, final)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
