"""The catalogue of a cache directory: get_cache_data takes unchanged entries from it, and it
never makes a listing show what the files do not hold."""

from __future__ import annotations

import os
import pathlib
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import cloudpickle
import h5py
import pytest

from executorkit.cache import (
    CacheCorruptionWarning,
    CacheRecord,
    CacheStore,
    _catalogue,
    _entry,
    _store,
    clear_cache,
    get_cache_data,
)
from executorkit.cache._catalogue import CATALOGUE

SUBPROCESS_TIMEOUT = 120


def triple(x: float, offset: float = 0.0) -> float:
    return 3 * x + offset


def record(key: str, *, args: tuple[Any, ...] = (1.0,), output: Any = 3.0,
           status: str = "done", finished: float = 1_700_000_000.0) -> CacheRecord:
    failed = status == "failed"
    return CacheRecord(
        key=key, function_name=f"{__name__}.triple", function=cloudpickle.dumps(triple),
        args=cloudpickle.dumps(args), kwargs=cloudpickle.dumps({"offset": 0.0}),
        resource_dict={"cores": 1}, status=status,
        output=None if failed else cloudpickle.dumps(output),
        error=cloudpickle.dumps(ValueError(key)) if failed else None,
        error_text=f"ValueError: {key}\n" if failed else None,
        started=finished - 1.0, finished=finished, hostname=socket.gethostname(),
        pid=os.getpid(),
    )


@pytest.fixture
def store(tmp_path: pathlib.Path) -> CacheStore:
    return CacheStore(tmp_path / "cache")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the entries a listing reads from their files (instead of the catalogue)."""
    paths: list[str] = []
    real = _catalogue.read_listed

    def counted(path: str, *args: Any, **kwargs: Any) -> Any:
        paths.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(_catalogue, "read_listed", counted)
    return paths


@pytest.fixture
def no_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers journal nothing: listings find entries through the catalogue alone."""
    monkeypatch.setattr(_store, "append", lambda *args: None)


def fill(store: CacheStore, count: int = 5) -> None:
    for index in range(count):
        store.write(record(f"k{index}", args=(float(index),), output=3.0 * index,
                           finished=1_700_000_000.0 + index))
    store.write(record("failed", status="failed", finished=1_600_000_000.0))


def shown(frame: Any) -> list[tuple[Any, ...]]:
    """What a frame says about each entry, comparable with ==."""
    return [
        (row.cache_key, row.function, row.input_args, row.input_kwargs, row.output,
         repr(row.error), row.error_text, row.status, row.runtime, row.resource_dict,
         row.hostname, row.pid, row.started, row.finished, row.filename)
        for row in frame.itertuples(index=False)
    ]


def stored_names(folder: pathlib.Path) -> set[str]:
    with _catalogue._Stored.read(os.fspath(folder)) as stored:
        return set(stored.entries)


# --------------------------------------------------------------------------------------------
# the catalogue is used

@pytest.mark.parametrize("load_outputs", [True, False])
def test_a_second_listing_reads_no_entry(store: CacheStore, reads: list[str],
                                         no_journal: None,
                                         load_outputs: bool) -> None:
    fill(store)
    first = get_cache_data(store.directory, load_outputs=load_outputs)
    assert len(reads) == 6 and (store.directory / CATALOGUE).is_file()
    reads.clear()
    again = get_cache_data(store.directory, load_outputs=load_outputs)
    assert reads == []
    assert shown(again) == shown(first)
    assert list(again["cache_key"]) == ["failed", "k0", "k1", "k2", "k3", "k4"]
    assert list(again["output"]) == ([None, 0.0, 3.0, 6.0, 9.0, 12.0] if load_outputs
                                     else [None] * 6)
    assert isinstance(again.loc[0, "error"], ValueError)


def test_outputs_come_from_the_catalogue_after_a_listing_without_them(
    store: CacheStore, reads: list[str]
) -> None:
    """A listing without outputs keeps the small outputs it read anyway; one with outputs
    then opens no entry."""
    fill(store)
    get_cache_data(store.directory, load_outputs=False)
    reads.clear()
    frame = get_cache_data(store.directory)
    assert reads == []
    assert list(frame["output"]) == [None, 0.0, 3.0, 6.0, 9.0, 12.0]


def test_an_unchanged_listing_leaves_the_catalogue_alone(store: CacheStore) -> None:
    fill(store)
    get_cache_data(store.directory)
    before = os.stat(store.directory / CATALOGUE)
    get_cache_data(store.directory)
    get_cache_data(store.directory, load_outputs=False)
    after = os.stat(store.directory / CATALOGUE)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_entries_in_sub_directories_have_their_own_catalogue(
    store: CacheStore, reads: list[str]
) -> None:
    store.write(record("top"))
    store.write(record("campaign/run-1", args=(2.0,), output=6.0))
    get_cache_data(store.directory)
    assert stored_names(store.directory) == {"top.h5"}
    assert stored_names(store.directory / "campaign") == {"run-1.h5"}
    reads.clear()
    frame = get_cache_data(store.directory)
    assert reads == []
    assert sorted(frame["cache_key"]) == ["campaign/run-1", "top"]


def test_large_inputs_and_outputs_stay_in_their_files(store: CacheStore,
                                                      reads: list[str]) -> None:
    big = bytes(range(256)) * 200  # 51 kB: more than the catalogue holds inline
    store.write(record("big", args=(big,), output=big))
    get_cache_data(store.directory, load_outputs=False)
    assert os.path.getsize(store.directory / CATALOGUE) < len(big)
    reads.clear()
    frame = get_cache_data(store.directory)
    assert reads == []  # read at the places the catalogue points to, not as a whole entry
    assert frame.loc[0, "input_args"] == (big,) and frame.loc[0, "output"] == big
    assert os.path.getsize(store.directory / CATALOGUE) < len(big)


# --------------------------------------------------------------------------------------------
# the catalogue never shows what the files do not hold

@pytest.mark.parametrize("load_outputs", [True, False])
def test_a_rewritten_entry_is_read_again(store: CacheStore, reads: list[str],
                                         no_journal: None,
                                         load_outputs: bool) -> None:
    fill(store)
    get_cache_data(store.directory, load_outputs=load_outputs)
    store.write(record("k1", args=(10.0,), output=30.0, finished=1_700_000_001.0))
    reads.clear()
    frame = get_cache_data(store.directory, load_outputs=load_outputs).set_index("cache_key")
    assert reads == [os.fspath(store.path("k1"))]
    assert frame.loc["k1", "input_args"] == (10.0,)
    assert frame.loc["k1", "output"] == (30.0 if load_outputs else None)
    reads.clear()
    get_cache_data(store.directory, load_outputs=load_outputs)
    assert reads == []


def test_an_edit_in_place_that_restores_the_modification_time_is_read_again(
    store: CacheStore, reads: list[str]
) -> None:
    """Same inode, size and modification time as catalogued: only the change time, which no
    program can set back, tells the file changed."""
    path = store.path("k")
    store.write(record("k", args=(1.0,), output=3.0))
    old_bytes = path.read_bytes()
    store.write(record("k", args=(2.0,), output=6.0))
    assert len(path.read_bytes()) == len(old_bytes)
    frame = get_cache_data(store.directory)
    assert frame.loc[0, "input_args"] == (2.0,)
    catalogued = os.stat(path)
    with open(path, "r+b") as fh:  # the older version's bytes, written over the newer file
        fh.write(old_bytes)
    os.utime(path, ns=(catalogued.st_atime_ns, catalogued.st_mtime_ns))
    now = os.stat(path)
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == \
        (catalogued.st_ino, catalogued.st_size, catalogued.st_mtime_ns)
    if now.st_ctime_ns == catalogued.st_ctime_ns:
        pytest.skip("this file system's change time did not move within the test")
    reads.clear()
    frame = get_cache_data(store.directory)
    assert reads == [os.fspath(path)]
    assert frame.loc[0, "input_args"] == (1.0,) and frame.loc[0, "output"] == 3.0


def test_a_deleted_entry_disappears(store: CacheStore, reads: list[str]) -> None:
    fill(store)
    get_cache_data(store.directory)
    os.unlink(store.path("k2"))
    reads.clear()
    frame = get_cache_data(store.directory)
    assert reads == [] and "k2" not in set(frame["cache_key"]) and len(frame) == 5
    assert "k2.h5" not in stored_names(store.directory)  # and gone from the catalogue


def test_clear_cache_keeps_the_catalogue_consistent(store: CacheStore, reads: list[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fill(store)
    get_cache_data(store.directory)
    reads.clear()
    assert clear_cache(store.directory, status="failed") == 1
    assert reads == []  # the filter was matched against the catalogue
    assert stored_names(store.directory) == {f"k{index}.h5" for index in range(5)}
    saves: list[str] = []
    monkeypatch.setattr(_catalogue, "_save", lambda folder, *a: saves.append(folder))
    frame = get_cache_data(store.directory)
    assert saves == [] and reads == [] and "failed" not in set(frame["cache_key"])
    monkeypatch.undo()
    assert clear_cache(store.directory) == 5
    assert not (store.directory / CATALOGUE).exists()
    assert get_cache_data(store.directory).empty


def test_a_rewrite_racing_the_read_is_not_catalogued_as_the_new_version(
    store: CacheStore, monkeypatch: pytest.MonkeyPatch, no_journal: None
) -> None:
    """A writer renames a new version into place after the listing opened the old one: the
    catalogue records the identity of the file it read, so the next listing reads the new
    version instead of showing the old contents again."""
    store.write(record("k", args=(1.0,), output=3.0))
    real = _catalogue.read_listed
    raced: list[str] = []

    def racing(path: str, *args: Any, **kwargs: Any) -> Any:
        if not raced:
            raced.append(path)
            store.write(record("k", args=(2.0,), output=6.0))  # the listing holds the old one
        return real(path, *args, **kwargs)

    monkeypatch.setattr(_catalogue, "read_listed", racing)
    assert get_cache_data(store.directory).loc[0, "input_args"] == (1.0,)
    frame = get_cache_data(store.directory)
    assert frame.loc[0, "input_args"] == (2.0,) and frame.loc[0, "output"] == 6.0


def _damaged(good: bytes, damage: str) -> bytes:
    data = bytearray(good)
    if damage == "flipped byte":
        data[_catalogue._HEAD.size + 10] ^= 0xFF  # in the entries
    elif damage == "other format":
        data[len(_catalogue._MAGIC)] = 99
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not a catalogue at all" * 10)
    elif damage == "empty":
        data = bytearray()
    return bytes(data)


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "flipped byte",
                                    "other format"])
def test_a_damaged_catalogue_is_ignored_and_replaced(store: CacheStore, reads: list[str],
                                                     damage: str) -> None:
    fill(store)
    expected = shown(get_cache_data(store.directory))
    catalogue = store.directory / CATALOGUE
    catalogue.write_bytes(_damaged(catalogue.read_bytes(), damage))
    reads.clear()
    assert shown(get_cache_data(store.directory)) == expected
    assert len(reads) == 6  # every entry read from its file
    assert stored_names(store.directory) == {f"k{index}.h5" for index in range(5)} | \
        {"failed.h5"}
    reads.clear()
    get_cache_data(store.directory)
    assert reads == []


def test_damaged_outputs_of_a_catalogue_are_read_from_the_files(
    store: CacheStore, reads: list[str]
) -> None:
    """The outputs have their own digest: damaged, they are read where the entries say (no
    entry is read whole) and the catalogue is written again with them."""
    fill(store)
    expected = shown(get_cache_data(store.directory))
    catalogue = store.directory / CATALOGUE
    data = bytearray(catalogue.read_bytes())
    data[-3] ^= 0xFF  # the last section: the outputs
    catalogue.write_bytes(bytes(data))
    with _catalogue._Stored.read(os.fspath(store.directory)) as stored:
        assert len(stored.entries) == 6 and stored.outputs() == {}
    reads.clear()
    assert shown(get_cache_data(store.directory)) == expected
    assert reads == []
    with _catalogue._Stored.read(os.fspath(store.directory)) as stored:
        assert len(stored.outputs()) == 5  # the done entries'


class Marker:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_a_catalogue_cannot_run_code(store: CacheStore, tmp_path: pathlib.Path,
                                     reads: list[str]) -> None:
    """Even with a valid digest, a catalogue naming a global is refused, not unpickled."""
    fill(store)
    get_cache_data(store.directory)
    marker = tmp_path / "ran"
    table = pickle.dumps({"k0.h5": Marker(os.fspath(marker))}, protocol=5)
    held = pickle.dumps({}, protocol=5)
    digest = _entry.digest
    head = _catalogue._HEAD.pack(_catalogue._MAGIC, _catalogue._FORMAT, len(table),
                                 digest(table), digest(held))
    (store.directory / CATALOGUE).write_bytes(head + table + held)
    reads.clear()
    assert len(get_cache_data(store.directory)) == 6
    assert not marker.exists() and len(reads) == 6


def test_temporary_files_are_never_read(store: CacheStore, reads: list[str]) -> None:
    """Neither an entry's nor a catalogue's temporary file is read, however complete."""
    fill(store)
    get_cache_data(store.directory)
    catalogue = store.directory / CATALOGUE
    leftover = store.directory / f"{CATALOGUE}.1.0123abcd.tmp"  # as a killed listing leaves it
    os.replace(catalogue, leftover)
    (store.directory / ".k9.1.0123abcd.tmp").write_bytes(store.path("k0").read_bytes())
    reads.clear()
    frame = get_cache_data(store.directory)
    assert len(reads) == 6 and not any(path.endswith(".tmp") for path in reads)
    assert sorted(frame["cache_key"]) == ["failed", "k0", "k1", "k2", "k3", "k4"]
    # Once stale, the catalogue's leftover goes like an entry writer's.
    old = time.time() - 2 * 3600
    os.utime(leftover, (old, old))
    clear_cache(store.directory, status="failed")
    assert not leftover.exists() and catalogue.exists()


def test_a_directory_the_catalogue_cannot_be_written_to_still_lists(
    store: CacheStore, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(store)

    def refused(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "read-only campaign")

    monkeypatch.setattr(_catalogue.os, "replace", refused)
    assert len(get_cache_data(store.directory)) == 6
    monkeypatch.undo()
    assert sorted(os.listdir(store.directory)) == sorted(f"{key}.h5" for key in
                                                         ["failed", "k0", "k1", "k2", "k3",
                                                          "k4"])


def test_entries_only_hdf5_can_read_are_catalogued(store: CacheStore,
                                                   reads: list[str]) -> None:
    """Files without the listing extension: metadata from the catalogue, outputs (whose
    place the catalogue cannot know) from the file each time."""
    path = store.write(record("old", args=(5.0,), output=15.0))
    with open(path, "rb") as fh:
        head = fh.read(_store._HEADER.size)
    stamp = _store._HEADER.unpack_from(head)[-1]
    with open(path, "r+b") as fh:
        fh.seek(_store._HEADER.size)
        fh.write(b"\0" * _store._LISTING.size)
    os.utime(path, ns=(stamp, stamp))
    get_cache_data(store.directory, load_outputs=False)
    reads.clear()
    frame = get_cache_data(store.directory, load_outputs=False)
    assert reads == [] and frame.loc[0, "input_args"] == (5.0,)
    frame = get_cache_data(store.directory)
    assert reads == [os.fspath(path)] and frame.loc[0, "output"] == 15.0


def test_an_unreadable_entry_warns_on_every_listing(store: CacheStore) -> None:
    fill(store)
    store.path("broken").write_bytes(b"garbage" * 50)
    for _ in range(2):
        with pytest.warns(CacheCorruptionWarning, match="broken.h5"):
            assert len(get_cache_data(store.directory)) == 6


# --------------------------------------------------------------------------------------------
# concurrency: entry writers and listings in many processes

WRITER = textwrap.dedent('''
    import os, pickle, sys
    from executorkit.cache import CacheRecord, CacheStore

    directory, writer = sys.argv[1], int(sys.argv[2])
    count, shared = (int(x) for x in sys.argv[3:5]) if len(sys.argv) > 3 else (40, 5)
    store = CacheStore(directory)

    def write(key, index, version):
        store.write(CacheRecord(
            key=key, function_name="m.f", function=pickle.dumps(len), args=pickle.dumps(
            (index, version)), kwargs=pickle.dumps({"index": index, "version": version}),
            resource_dict={}, status="done", output=pickle.dumps((index, version, writer)),
            error=None, error_text=None, started=float(index), finished=float(index) + 1,
            hostname="h", pid=os.getpid()))

    for index in range(count):
        write(f"w{writer}_{index}", index, 0)
        write(f"shared_{index % shared}", index % shared, writer * 1000 + index)  # by all
''')

READER = textwrap.dedent('''
    import os, sys
    from executorkit.cache import get_cache_data

    directory, stop = sys.argv[1], sys.argv[2]
    listings = 0
    while not os.path.exists(stop) or listings < 2:
        frame = get_cache_data(directory, load_outputs=listings % 2 == 0)
        for row in frame.itertuples(index=False):
            index, version = row.input_args
            assert row.input_kwargs == {"index": index, "version": version}, row
            assert row.output is None or row.output[:2] == (index, version), row
        listings += 1
''')


def consistent(frame: Any) -> None:
    """Each row's arguments and output come from one version of its file."""
    for row in frame.itertuples(index=False):
        index, version = row.input_args
        assert row.input_kwargs == {"index": index, "version": version}, row
        assert row.output is None or row.output[:2] == (index, version), row


@pytest.mark.slow
def test_listings_while_many_processes_write_lose_no_entry(
    store: CacheStore, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop = tmp_path / "stop"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(store.directory), str(n)],
                                stderr=subprocess.PIPE, text=True) for n in range(3)]
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(store.directory), str(stop)],
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        listings = 0
        while any(proc.poll() is None for proc in writers):  # list while they write
            assert time.monotonic() < deadline, "the writers did not finish"
            consistent(get_cache_data(store.directory, load_outputs=listings % 2 == 1))
            listings += 1
        for proc in writers:
            _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
            assert proc.returncode == 0, err
        stop.touch()
        for proc in readers:
            _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
            assert proc.returncode == 0, err
    finally:
        for proc in writers + readers:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    expected = {f"w{n}_{index}" for n in range(3) for index in range(40)} | \
        {f"shared_{index}" for index in range(5)}
    frame = get_cache_data(store.directory)
    assert set(frame["cache_key"]) == expected and len(frame) == len(expected)
    consistent(frame)
    for row in frame.itertuples(index=False):  # exactly what each file holds now
        stored = store.read(row.cache_key)
        assert row.input_args == pickle.loads(stored.args)
        assert row.output == pickle.loads(stored.output)
    reads: list[str] = []
    real = _catalogue.read_listed
    monkeypatch.setattr(_catalogue, "read_listed",
                        lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    assert shown(get_cache_data(store.directory)) == shown(frame)
    assert reads == []


def test_catalogue_file_is_plain_and_hidden(store: CacheStore) -> None:
    """The catalogue is not an entry, not an HDF5 file, and not a directory to descend."""
    fill(store)
    get_cache_data(store.directory)
    assert not h5py.is_hdf5(store.directory / CATALOGUE)
    assert CATALOGUE.startswith(".") and not _store.is_entry_name(CATALOGUE)
    assert len(_store.entry_files(store.directory)) == 6
