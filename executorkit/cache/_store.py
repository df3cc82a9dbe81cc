"""The on-disk cache: one HDF5 file per task, ``<directory>/<key>.h5``.

File layout (format 1)
    attributes   ``format`` (int 1) and ``complete`` (int 1, written last).
    datasets     1-D contiguous ``uint8`` byte strings:
                 ``meta``: UTF-8 JSON object with ``key``, ``function_name``, ``status``
                 ("done" or "failed"), ``started``, ``finished`` (epoch seconds),
                 ``hostname``, ``pid``, ``resource_dict``, ``error_text`` and
                 ``executorkit_version``; optionally ``slot`` (the pool slot it ran on);
                 ``function``, ``args``, ``kwargs``: cloudpickle;
                 ``output`` (status done only) and ``error`` (status failed, when the
                 exception could be pickled): cloudpickle.
    A file has an ``output`` if and only if its status is "done": lookups rely on that and
    read ``meta`` only when the output is absent.  Keeping all small fields in one JSON
    dataset makes a listing read one object instead of ten; inspect a file with
    ``json.loads(h5py.File(path)["meta"][()].tobytes())``.

Writers fill a private temporary file in the same directory and ``os.replace`` it onto
``<key>.h5``, so readers see either no file or a complete one, and concurrent writers of one
key leave exactly one valid file (the last rename wins).  After the rename, the writer
appends the entry a listing would read from the file to the folder's journal
(:mod:`executorkit.cache._journal`).  The ``complete`` attribute catches
files damaged some other way (copied partially, truncated by a full disk).

Reads go through h5py's low-level API: a cache hit costs one ``stat``, one HDF5 open and
two small reads, far less than opening an ``h5py.File``.  h5py is imported on first use.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pickle
import re
import secrets
import struct
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executorkit.cache._entry import build
from executorkit.cache._journal import append
from executorkit.errors import CacheMissError, ResourceError, SerializationError

__all__ = ["CacheCorruptionWarning", "CacheRecord", "CacheStore", "CorruptEntryError"]

FORMAT_VERSION = 1
SUFFIX = ".h5"
CORRUPT_SUFFIX = ".h5.corrupt"
TMP_SUFFIX = ".tmp"
STATUSES = ("done", "failed")
ANY_SIZE = sys.maxsize

# Keys from compute_key may start with "_" (private function names); a leading "." is
# reserved for temporary files.  200 characters leave room for the suffixes in 255 bytes.
_STORE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
_KEY_MAX = 200
_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "key": str,
    "function_name": str,
    "status": str,
    "started": (int, float),
    "finished": (int, float),
    "hostname": str,
    "pid": int,
    "resource_dict": dict,
    "error_text": (str, type(None)),
}
_META_FIELDS = tuple(_META_TYPES)
_MISSING = object()


class CacheCorruptionWarning(UserWarning):
    """A cache file could not be read; it is ignored (and, on lookup, moved aside)."""


class CorruptEntryError(Exception):
    """Internal: a cache file exists but cannot be read."""


@dataclass(slots=True)
class CacheRecord:
    """Everything stored about one finished task."""

    key: str
    function_name: str
    function: bytes
    args: bytes
    kwargs: bytes
    resource_dict: dict[str, Any]
    status: str
    output: bytes | None
    error: bytes | None
    error_text: str | None
    started: float
    finished: float
    hostname: str
    pid: int
    slot: int | None = None  # the pool slot it ran on (None: not recorded, older files)

    @property
    def runtime(self) -> float:
        return self.finished - self.started


@dataclass
class ListedRecord:
    """A record as a listing read it, with what lets a later listing trust it unread."""

    record: CacheRecord
    identity: tuple[int, ...] | None  # of the file read (file_identity); None: it changed meanwhile
    places: dict[str, tuple[int, int]]  # dataset -> (offset, length) for plain reads; {}: unknown
    output_digest: bytes | None  # blake2b-256 of the output, as the header vouches for it


def file_identity(stat: os.stat_result) -> tuple[int, int, int, int, int]:
    """What tells one version of a file from another: entries are replaced by renaming a new
    file into place (a new inode), and an edit in place changes the change time, which no
    program can set back (unlike the modification time)."""
    return stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


class CacheStore:
    """A directory of cache files, one per task key."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._dir = os.fspath(self.directory)
        _hdf5()  # import h5py now rather than inside the first task's lookup

    def __repr__(self) -> str:
        return f"CacheStore({self._dir!r})"

    def path(self, key: str) -> Path:
        """Path of the file holding ``key`` (which need not exist)."""
        return Path(self._file(key))

    def write(self, record: CacheRecord) -> Path:
        """Store ``record`` atomically, replacing any older entry of the same key."""
        _check_record(record)
        final = self._file(record.key)
        folder, base = os.path.split(final)  # a key with '/' lives in a sub-directory
        name = f".{base[:-len(SUFFIX)]}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        tmp = os.path.join(folder, name)
        os.makedirs(folder, exist_ok=True)  # the user may have removed the directory
        try:
            written = _write_file(tmp, record)
            # Held open across the rename: the identity journaled is that of this very file,
            # whatever another writer renames into place meanwhile (its inode cannot be
            # reused while open).
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.replace(tmp, final)
                identity = file_identity(os.fstat(fd))
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if written is not None:
            _journal_entry(folder, base, identity, written)
        return Path(final)

    def lookup(self, key: str) -> tuple[bool, Any]:
        """``(True, result)`` for a stored successful result, else ``(False, None)``.

        Failed entries are misses, so the task is re-run.  A corrupt file is a miss too: it is
        moved to ``<key>.h5.corrupt`` with a :class:`CacheCorruptionWarning`.  Errors of the
        environment (too many open files, permissions) are raised: the file may be fine.
        """
        path = self._file(key)
        try:
            before = os.stat(path)
        except FileNotFoundError:
            return False, None
        try:
            data = _read_output(path)
            if data is None:
                return False, None
        except FileNotFoundError:
            return False, None  # removed since the stat
        except MemoryError:
            raise
        except Exception as exc:
            if _environment_error(exc):
                raise
            _quarantine(path, before, exc)
            return False, None
        try:
            return True, pickle.loads(data)  # straight from the read buffer, no copy
        except (ImportError, AttributeError) as exc:
            # The file is sound; what is missing is on our side (the module of the result's
            # class is not importable here). A miss, but the entry is kept.
            warnings.warn(f"cache entry {path} could not be unpickled here "
                          f"({type(exc).__name__}: {exc}); running the call again",
                          CacheCorruptionWarning, stacklevel=2)
            return False, None
        except MemoryError:
            raise
        except Exception as exc:  # garbage where a pickle should be: corrupt
            _quarantine(path, before, exc)
            return False, None

    def read(self, key: str, *, load_output: bool = True) -> CacheRecord:
        """The full record of ``key``; KeyError if missing, CorruptEntryError if unreadable."""
        path = self._file(key)
        return read_record(path, load_output=load_output, missing=key)

    def _file(self, key: str) -> str:
        return entry_path(self._dir, key)


def entry_path(directory: str | os.PathLike[str], key: str) -> str:
    """Path of the cache file of ``key`` in ``directory``; ResourceError for a malformed key.

    A key may name sub-directories (``"campaign/run-1"``): each ``/``-separated part follows
    the rules of a key, so ``..``, absolute paths and empty parts are refused.
    """
    if not isinstance(key, str) or len(key) > _KEY_MAX or \
            not all(_STORE_KEY.fullmatch(part) for part in key.split("/")):
        raise ResourceError(
            f"cache key {key!r} is invalid: use 1 to 200 characters of A-Z, a-z, 0-9, "
            "'.', '_' and '-', not starting with '.' or '-' (a '/' may separate "
            "sub-directories, each following the same rules)",
            key="cache_key",
            allowed="[A-Za-z0-9_][A-Za-z0-9._-]*, optionally joined by '/', 200 at most",
        )
    return os.path.join(directory, key + SUFFIX)


def read_record(
    path: str | os.PathLike[str],
    *,
    load_output: bool = True,
    load_inputs: bool = True,
    missing: str | None = None,
) -> CacheRecord:
    """Read a whole cache file; raise CorruptEntryError if it is unreadable or incomplete.

    The pickled fields are returned as bytes, not unpickled.  With ``load_output=False`` the
    output is not read (``None``), with ``load_inputs=False`` neither are the function and
    its arguments (``b""``).  A missing file raises KeyError naming ``missing`` (the key).
    """
    path = os.fspath(path)
    with _read_errors(path, missing):
        return _read_record(path, load_output, load_inputs)


def read_listed(path: str, fd: int, stat: os.stat_result, *, output_up_to: int) -> ListedRecord:
    """Read the entry open as ``fd`` (at ``path``, ``stat`` its ``fstat``) for a listing:
    the whole record, the output only if its pickle has at most ``output_up_to`` bytes
    (ANY_SIZE: always); errors as :func:`read_record`."""
    with _read_errors(path, None):
        found = _read_open(fd, stat, output_up_to)
        if found is not _NO_HEADER:
            return found  # type: ignore[no-any-return]
        # (HDF5 tells the size of the output only by reading it)
        record = _read_record_hdf5(path, output_up_to == ANY_SIZE, True)
        # HDF5 opened the path again: vouch for the file only if it is still the one open here
        # (which cannot be replaced and come back while ``fd`` holds it).
        same = file_identity(os.stat(path)) == file_identity(stat)
        return ListedRecord(record, file_identity(stat) if same else None, {}, None)


@contextlib.contextmanager
def _read_errors(path: str, missing: str | None) -> Iterator[None]:
    """Missing file -> CacheMissError; damaged contents -> CorruptEntryError; errors of the
    environment (permissions, too many open files) pass unchanged: the file may be fine."""
    try:
        yield
    except FileNotFoundError:
        raise CacheMissError(f"no cache entry {missing or path!r} in "
                             f"{os.path.dirname(path)}") from None
    except (MemoryError, CorruptEntryError):
        raise
    except Exception as exc:
        if _environment_error(exc):
            raise
        raise CorruptEntryError(_describe(exc)) from exc


def entry_files(directory: str | os.PathLike[str]) -> list[str]:
    """Paths of the entries (``<key>.h5``) in ``directory`` and its sub-directories (keys
    with a ``/``), sorted; [] if it does not exist."""
    return sorted(os.path.join(folder, name)
                  for folder, names in entry_folders(directory) for name in names)


def entry_folders(directory: str | os.PathLike[str]) -> Iterator[tuple[str, list[str]]]:
    """``(folder, names of its entries)`` for ``directory`` and each sub-directory below it
    (hidden ones excepted); nothing if it does not exist."""
    pending = [os.fspath(directory)]
    while pending:
        here = pending.pop()
        names: list[str] = []
        try:
            with os.scandir(here) as scan:
                for entry in scan:
                    name = entry.name
                    if name[0] == ".":
                        continue  # temporary files, catalogues, hidden directories
                    if name.endswith(SUFFIX):  # is_entry_name, inlined: once per entry
                        names.append(name)
                    elif entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        yield here, names


def is_entry_name(name: str) -> bool:
    return name.endswith(SUFFIX) and not name.startswith(".")


# ---------------------------------------------------------------------------------------------
# writing


def _check_record(record: CacheRecord) -> None:
    entry_path("", record.key)  # raises ResourceError for a malformed key
    if record.status not in STATUSES:
        raise ValueError(f"status must be 'done' or 'failed', got {record.status!r}")
    if record.status == "done" and record.output is None:
        raise ValueError("a record with status 'done' needs its pickled output")


def _meta_json(record: CacheRecord) -> bytes:
    from executorkit._version import __version__

    meta = {name: getattr(record, name) for name in _META_FIELDS}
    meta["executorkit_version"] = __version__
    if record.slot is not None:
        meta["slot"] = record.slot
    try:
        # default=str: a resource_dict value like a Path is worth keeping as text.
        text = json.dumps(meta, sort_keys=True, default=str)
    except (TypeError, ValueError) as exc:
        raise SerializationError(
            f"the resource_dict of cache entry {record.key!r} cannot be stored as JSON: {exc}"
        ) from exc
    return text.encode("ascii")  # json.dumps escapes everything else


def _write_file(path: str, record: CacheRecord) -> _Written | None:
    """Write ``record`` to the new file ``path``; what a listing would read of it, or None
    for a file only HDF5 can read (no header or no listing extension)."""
    hdf5 = _hdf5()
    done = record.status == "done"
    datasets: dict[str, bytes | None] = {
        "meta": _meta_json(record),
        "function": record.function,
        "args": record.args,
        "kwargs": record.kwargs,
        "output": record.output if done else None,
        "error": None if done else record.error,
    }
    fid = hdf5.h5f.create(os.fsencode(path), hdf5.h5f.ACC_EXCL, fcpl=hdf5.fcpl,
                          fapl=hdf5.fapl)
    offsets: dict[str, int | None] = {}
    with hdf5.h5py.File(fid) as handle:
        handle.attrs["format"] = hdf5.np.int64(FORMAT_VERSION)
        for name, data in datasets.items():
            if data is not None:
                dset = handle.create_dataset(name, data=hdf5.np.frombuffer(data, dtype="u1"))
                offsets[name] = dset.id.get_offset()
        handle.attrs["complete"] = hdf5.np.int8(1)  # last: see the module docstring
    output_digest = _write_header(path, done, offsets, datasets)
    if output_digest is None:
        return None
    places = {name: (offset, len(datasets[name] or b"")) for name, offset in offsets.items()
              if offset is not None}
    return _Written(record, datasets, places, output_digest)


@dataclass
class _Written:
    """What a writer knows of the file it wrote with the header and its listing extension:
    enough to journal the entry a listing would read from it."""

    record: CacheRecord
    datasets: dict[str, bytes | None]
    places: dict[str, tuple[int, int]]
    output_digest: bytes


def _journal_entry(folder: str, name: str, identity: tuple[int, ...],
                   written: _Written) -> None:
    """Journal the entry just renamed into place as ``name`` with ``identity``, holding what
    a listing reads from the file: the metadata as its JSON gives it back (a tuple in the
    resource dict is a list there, a Path a string)."""
    fields = dict(_checked_meta(json.loads(written.datasets["meta"] or b"null")))
    record = CacheRecord(**fields, function=written.record.function,
                         args=written.record.args, kwargs=written.record.kwargs,
                         output=None, error=written.datasets["error"])
    done = record.status == "done"
    entry = build(record, identity, written.places, written.output_digest if done else None)
    append(folder, name, entry, written.datasets["output"])


# The first USERBLOCK bytes of every file are HDF5's user block, which HDF5 itself ignores.
# After the file is complete, a small header goes there: where the pickled output lies and
# its digest. A hit then costs two plain reads instead of an HDF5 open. Any mismatch (no
# header, a torn write, a digest that does not match) falls back to reading through HDF5.
# Right after it, the listing extension says where the other datasets lie, with one digest
# over them, so get_cache_data reads a file with plain reads too (files written before the
# extension existed are listed through HDF5).
USERBLOCK = 512
_MAGIC = b"EKIT\x01"
_HEADER = struct.Struct("<5sBQQ32sq")  # magic, done, offset, length, digest, mtime_ns
_LISTED = ("meta", "function", "args", "kwargs", "error")
_LISTING_MAGIC = b"EKIX\x01"
_LISTING = struct.Struct("<5s" + "QQ" * len(_LISTED) + "32s")  # magic, (offset, length)*, digest
assert _HEADER.size + _LISTING.size <= USERBLOCK


def _write_header(path: str, done: bool, offsets: dict[str, int | None],
                  datasets: dict[str, bytes | None]) -> bytes | None:
    """Write the header and its listing extension; the output's digest, or None without
    the extension."""
    output = datasets["output"]
    if done and (offsets.get("output") is None or output is None):
        return None  # no contiguous output to point at: lookups use HDF5
    digest = hashlib.blake2b(output or b"", digest_size=32).digest()
    # The header vouches for the file as completed here: it carries the modification time
    # the file is then given, so any later change to the file (an in-place edit, say)
    # makes lookups read through HDF5 again.
    stamp = time.time_ns() // 1000 * 1000  # microseconds survive every file system we know
    header = _HEADER.pack(_MAGIC, 1 if done else 0, offsets.get("output") or 0,
                          len(output or b""), digest, stamp)
    listing = _listing(offsets, datasets)
    with open(path, "r+b") as fh:
        fh.write(header + listing)
    os.utime(path, ns=(stamp, stamp))
    return digest if listing else None


def _listing(offsets: dict[str, int | None], datasets: dict[str, bytes | None]) -> bytes:
    """The listing extension, or b"" when a dataset has no contiguous place to point at."""
    places: list[int] = []
    digest = hashlib.blake2b(digest_size=32)
    for name in _LISTED:
        data = datasets[name]
        offset = offsets.get(name)
        if data is not None and data and offset is None:
            return b""
        # length + 1, so "absent" (0) differs from "present and empty" (1)
        places += [offset or 0, 0 if data is None else len(data) + 1]
        digest.update(data or b"")
    return _LISTING.pack(_LISTING_MAGIC, *places, digest.digest())


_NO_HEADER = object()


def _read_output_fast(path: str) -> Any:
    """The pickled output via the user-block header; None for a failed entry;
    ``_NO_HEADER`` when the header is absent or does not match (read through HDF5)."""
    with open(path, "rb", buffering=0) as fh:
        head = fh.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return _NO_HEADER
        magic, done, offset, length, digest, stamp = _HEADER.unpack(head)
        if magic != _MAGIC or os.fstat(fh.fileno()).st_mtime_ns != stamp:
            return _NO_HEADER
        if not done:
            return None
        fh.seek(offset)
        data = fh.read(length)
    if len(data) != length or hashlib.blake2b(data, digest_size=32).digest() != digest:
        return _NO_HEADER
    return data


def _read_record_fast(path: str, load_output: bool, load_inputs: bool) -> Any:
    """The whole record through the header and its listing extension, with plain reads;
    ``_NO_HEADER`` when either is absent or does not match (read through HDF5)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        found = _read_open(fd, os.fstat(fd), ANY_SIZE if load_output else -1)
    finally:
        os.close(fd)
    if found is _NO_HEADER:
        return _NO_HEADER
    record: CacheRecord = found.record
    if not load_inputs:
        record.function = record.args = record.kwargs = b""
    return record


def _read_open(fd: int, stat: os.stat_result, output_up_to: int) -> Any:
    """:func:`_read_record_fast` on an open file whose ``fstat`` is ``stat``, reading the
    output if it has at most ``output_up_to`` bytes: a :class:`ListedRecord` or
    ``_NO_HEADER``."""
    # Entries are small: one read of the whole file is cheaper than a read per dataset.
    whole = stat.st_size <= _READ_WHOLE
    data = os.read(fd, stat.st_size if whole else _HEADER.size + _LISTING.size)
    if len(data) < _HEADER.size + _LISTING.size:
        return _NO_HEADER
    magic, done, offset, length, out_digest, stamp = _HEADER.unpack_from(data)
    listing = _LISTING.unpack_from(data, _HEADER.size)
    if magic != _MAGIC or listing[0] != _LISTING_MAGIC or stat.st_mtime_ns != stamp:
        return _NO_HEADER
    view = memoryview(data) if whole else None
    blobs = _listed_blobs(fd, view, listing[1:-1], listing[-1])
    if blobs is None:
        return _NO_HEADER
    output = None
    if done and length <= output_up_to:
        output = bytes(view[offset:offset + length]) if view else os.pread(fd, length, offset)
        if hashlib.blake2b(output, digest_size=32).digest() != out_digest:
            return _NO_HEADER
    meta = _checked_meta(json.loads(blobs.pop("meta") or b"null"))
    if (meta["status"] == "done") != bool(done):
        return _NO_HEADER
    places = {name: (listing[1 + 2 * index], listing[2 + 2 * index] - 1)
              for index, name in enumerate(_LISTED) if listing[2 + 2 * index]}
    if done:
        places["output"] = (offset, length)
    return ListedRecord(CacheRecord(**meta, **blobs, output=output), file_identity(stat),
                        places, out_digest if done else None)


_READ_WHOLE = 1 << 20


def _listed_blobs(fd: int, view: memoryview | None, places: tuple[int, ...],
                  digest: bytes) -> dict[str, Any] | None:
    blobs: dict[str, Any] = {}
    check = hashlib.blake2b(digest_size=32)
    for index, name in enumerate(_LISTED):
        offset, size = places[2 * index], places[2 * index + 1]
        data = None
        if size:
            data = bytes(view[offset:offset + size - 1]) if view else os.pread(fd, size - 1, offset)
            if len(data) != size - 1:
                return None
            check.update(data)
        blobs[name] = data
    return blobs if check.digest() == digest else None


# ---------------------------------------------------------------------------------------------
# reading


class _Hdf5:
    """The parts of h5py (and numpy) used here, imported on first use."""

    def __init__(self) -> None:
        import h5py
        import numpy
        from h5py import h5a, h5d, h5f, h5p, h5s, h5t

        self.h5py, self.np = h5py, numpy
        self.h5a, self.h5d, self.h5f, self.h5s, self.h5t = h5a, h5d, h5f, h5s, h5t
        self.fapl = h5p.create(h5p.FILE_ACCESS)
        self.fcpl = h5p.create(h5p.FILE_CREATE)
        self.fcpl.set_userblock(USERBLOCK)
        if hasattr(self.fapl, "set_file_locking"):
            # Files never change once renamed into place, so HDF5's advisory locks protect
            # nothing here, cost time, and fail on some parallel file systems.
            self.fapl.set_file_locking(False, True)

    def open(self, path: str) -> Any:
        return self.h5f.open(os.fsencode(path), self.h5f.ACC_RDONLY, self.fapl)


@functools.lru_cache(maxsize=1)
def _hdf5() -> _Hdf5:
    return _Hdf5()


def _read_output(path: str) -> Any:
    """The pickled output of a complete "done" file, None for a complete "failed" file."""
    data = _read_output_fast(path)
    if data is not _NO_HEADER:
        return data
    hdf5 = _hdf5()
    fid = hdf5.open(path)
    try:
        _check_complete(hdf5, fid)
        # Only "done" files have an output, so a hit needs no status read (a fifth of the
        # cost of a lookup); the status decides only when the output is absent.
        with contextlib.suppress(KeyError):
            return _dataset_array(hdf5, fid, b"output")
        status = _read_meta(hdf5, fid)["status"]
        if status == "failed":
            return None
        raise CorruptEntryError(f"no output for status {status!r}")
    finally:
        # Dropping the last reference closes the file; FileID.close() would also scan all
        # live h5py objects, which costs a quarter of a lookup.
        fid = None


def _read_record(path: str, load_output: bool, load_inputs: bool) -> CacheRecord:
    record = _read_record_fast(path, load_output, load_inputs)
    if record is not _NO_HEADER:
        return record  # type: ignore[no-any-return]
    return _read_record_hdf5(path, load_output, load_inputs)


def _read_record_hdf5(path: str, load_output: bool, load_inputs: bool) -> CacheRecord:
    hdf5 = _hdf5()
    fid = hdf5.open(path)
    try:
        _check_complete(hdf5, fid)
        meta = _read_meta(hdf5, fid)
        done = meta["status"] == "done"
        blobs: dict[str, Any] = {
            name: _dataset_bytes(hdf5, fid, name.encode()) if load_inputs else b""
            for name in ("function", "args", "kwargs")
        }
        blobs["output"] = _dataset_bytes(hdf5, fid, b"output") if done and load_output else None
        blobs["error"] = None if done else _optional_bytes(hdf5, fid, b"error")
        return CacheRecord(**meta, **blobs)
    finally:
        fid = None


def _read_meta(hdf5: _Hdf5, fid: Any) -> dict[str, Any]:
    return _checked_meta(json.loads(_dataset_bytes(hdf5, fid, b"meta")))


def _checked_meta(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise CorruptEntryError("the metadata is not a JSON object")
    wrong = [name for name, kinds in _META_TYPES.items()
             if not isinstance(meta.get(name, _MISSING), kinds)]
    if wrong:
        raise CorruptEntryError(f"the metadata lacks or mistypes {', '.join(wrong)}")
    if meta["status"] not in STATUSES:
        raise CorruptEntryError(f"unknown status {meta['status']!r}")
    out = {name: meta[name] for name in _META_FIELDS}
    slot = meta.get("slot")
    out["slot"] = slot if isinstance(slot, int) and not isinstance(slot, bool) else None
    return out


def _check_complete(hdf5: _Hdf5, fid: Any) -> None:
    buf = hdf5.np.zeros((), dtype="i1")
    # Read as stored (int8): no type conversion on the hot path.
    with contextlib.suppress(KeyError):
        hdf5.h5a.open(fid, b"complete").read(buf, mtype=hdf5.h5t.NATIVE_INT8)
    complete = int(buf)
    if complete != 1:
        raise CorruptEntryError("the file was not completely written")


def _dataset_bytes(hdf5: _Hdf5, fid: Any, name: bytes) -> bytes:
    return bytes(_dataset_array(hdf5, fid, name))


def _dataset_array(hdf5: _Hdf5, fid: Any, name: bytes) -> Any:
    """A uint8 dataset as a numpy array (a buffer pickle.loads reads without copying)."""
    dataset = hdf5.h5d.open(fid, name)
    size = dataset.get_storage_size()
    buf = hdf5.np.empty(size, dtype="u1")
    # An explicit memory space makes HDF5 refuse a dataset whose element count differs from
    # the buffer (wrong type or layout) instead of writing past the end of the buffer.
    memory = hdf5.h5s.create_simple((size,))
    dataset.read(memory, hdf5.h5s.ALL, buf, mtype=hdf5.h5t.NATIVE_UINT8)
    return buf


def _optional_bytes(hdf5: _Hdf5, fid: Any, name: bytes) -> bytes | None:
    if not fid.links.exists(name):
        return None
    return _dataset_bytes(hdf5, fid, name)


# ---------------------------------------------------------------------------------------------
# damaged files


def _environment_error(exc: BaseException) -> bool:
    # h5py sets errno only when the operating system refused (EMFILE, EACCES, ...); damaged
    # contents raise OSError without errno.
    return isinstance(exc, OSError) and exc.errno is not None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _quarantine(path: str, before: os.stat_result, exc: BaseException) -> None:
    """Move a corrupt file aside (unless a writer replaced it meanwhile) and warn."""
    target = path[: -len(SUFFIX)] + CORRUPT_SUFFIX
    try:
        now = os.stat(path)
        if file_identity(now) != file_identity(before):
            return  # a writer renamed a fresh file into place since we opened it
        os.replace(path, target)
    except FileNotFoundError:
        return  # another reader moved it aside and warned
    except OSError as move_error:
        warnings.warn(
            f"cache file {path} is unreadable ({_describe(exc)}) and could not be moved "
            f"aside ({_describe(move_error)}); the task will be run again",
            CacheCorruptionWarning,
            stacklevel=3,
        )
        return
    warnings.warn(
        f"cache file {path} is unreadable ({_describe(exc)}); moved it to {target}, "
        "the task will be run again",
        CacheCorruptionWarning,
        stacklevel=3,
    )


