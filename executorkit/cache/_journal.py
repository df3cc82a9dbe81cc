"""The journal of a cache folder: entry writers tell the next listing what they wrote, so it
need not open the entries written since the catalogue was saved.

File ``<folder>/.executorkit-journal``, appended to by every writer, never rewritten::

    record = b"EKJ\\x00"  blake2b-128  format (1 byte)  length (4 bytes)  payload

The digest covers the format, the length and the payload; the payload is a pickle of plain
data, ``(file name, pickled output or None, *entry)`` (:class:`~._entry.Entry`, the output
only up to ``INLINE_MAX`` bytes), loaded without importing anything. A record of another
format is skipped like a damaged one.

No lock anywhere, and the journal never makes a listing wrong:

* a writer appends one record with one ``O_APPEND`` write after renaming its entry into
  place. The identity in the record is the ``fstat`` of the very file renamed, taken while
  it is still held open (so its inode cannot be reused meanwhile), so a record never pairs
  one version's contents with another version's identity;
* a reader trusts a record only while the entry's file has that identity, as it trusts the
  catalogue; a later record of the same file name replaces an earlier one;
* a record that is torn, interleaved with another (``O_APPEND`` is not atomic on NFS or
  Lustre), fails its digest or is of another format is skipped, and reading resumes at the
  next record marker: that entry is read from its file;
* a listing claims the journal by renaming it to a private name, reads it and deletes it
  (the catalogue it then saves holds what the journal said). A writer that opened the journal
  before the rename may append to the claimed file after it was read: that record is lost,
  and its entry is read from its file by the next listing. Nothing else can be lost;
* a writer stops journaling once the journal holds ``_MAX_SIZE`` bytes (nobody lists the
  folder): its entries are then read from their files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import secrets
import struct
from typing import Any

from executorkit.cache._entry import INLINE_MAX, Entry, PlainUnpickler

__all__ = ["JOURNAL", "Journaled", "append", "claim", "remove"]

JOURNAL = ".executorkit-journal"
_MARK = b"EKJ\x00"
_FORMAT = 1
_FRAME = struct.Struct("<4s16sBI")  # marker, digest, format, payload length
_CHECKED = 20  # the digest covers the frame from here on, and the payload
_MAX_SIZE = 256 << 20

Journaled = dict[str, tuple[Any, ...]]  # file name -> (output, *entry)


def append(folder: str, name: str, entry: Entry, output: bytes | None) -> None:
    """Journal ``entry`` (of the file ``name`` in ``folder``, with its pickled ``output``)
    unless a field is too large to hold. Never raises for want of the journal: a listing
    then reads the entry from its file."""
    if entry.error is not None and len(entry.error) > INLINE_MAX:
        return
    held = output if output is not None and len(output) <= INLINE_MAX else None
    record = _record(pickle.dumps((name, held, *entry), protocol=5))
    with contextlib.suppress(OSError):
        fd = os.open(os.path.join(folder, JOURNAL), os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                     0o666)
        try:
            if os.fstat(fd).st_size < _MAX_SIZE:
                os.write(fd, record)  # one write: appended whole, or torn and skipped
        finally:
            os.close(fd)


def claim(folder: str) -> Journaled:
    """Take the journal of ``folder``: what its sound records say, by file name, the latest
    record of a name last. The journal is gone afterwards (see the module docstring)."""
    path = os.path.join(folder, JOURNAL)
    # A stale claimed journal of a killed listing is removed like an entry's temporary file.
    mine = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.rename(path, mine)
    except OSError:
        return {}  # none, another listing claimed it, or a folder we cannot write to
    try:
        with open(mine, "rb") as fh:
            data = fh.read()
    except OSError:
        data = b""
    finally:
        with contextlib.suppress(OSError):
            os.unlink(mine)
    return parse(data)


def parse(data: bytes) -> Journaled:
    """The sound records of a journal's bytes (see the module docstring)."""
    found: Journaled = {}
    view, size = memoryview(data), len(data)
    stream = io.BytesIO(data)
    # A fresh unpickler for each record: every record was pickled on its own, so its memo
    # references mean that record's objects. (An unpickler kept across records resolves
    # them into the previous record's memo, and clearing its memo does not reset its count.)
    unpack, blake2b = _FRAME.unpack_from, hashlib.blake2b
    at = data.find(_MARK)
    while at >= 0:
        if size - at >= _FRAME.size:
            _mark, check, version, length = unpack(view, at)
            end = at + _FRAME.size + length
            if version == _FORMAT and end <= size and \
                    blake2b(view[at + _CHECKED:end], digest_size=16).digest() == check:
                stream.seek(at + _FRAME.size)
                try:
                    record = PlainUnpickler(stream).load()
                except Exception:
                    record = None
                if type(record) is tuple and stream.tell() == end and _plain_head(record):
                    found[record[0]] = record[1:]
                at = data.find(_MARK, end)
                continue
        at = data.find(_MARK, at + 1)  # not a whole, sound record: resynchronise
    return found


def _plain_head(record: tuple[Any, ...]) -> bool:
    return len(record) > 2 and type(record[0]) is str and \
        (record[1] is None or type(record[1]) is bytes)


def remove(folder: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, JOURNAL))


def _record(payload: bytes) -> bytes:
    head = _FRAME.pack(_MARK, b"", _FORMAT, len(payload))[_CHECKED:]
    check = hashlib.blake2b(head, digest_size=16)
    check.update(payload)
    return _MARK + check.digest() + head + payload
