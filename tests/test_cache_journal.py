"""The journal of a cache directory: the first listing after a campaign takes what the entry
writers journaled, and no journal record makes a listing show what the files do not hold."""

from __future__ import annotations

import os
import pathlib
import pickle
import subprocess
import sys
import time
from typing import Any

import pytest
import taskfuncs as tf
from test_cache_catalogue import WRITER, record, shown

from executorkit import SingleNodeExecutor
from executorkit.cache import (
    CacheStore,
    _catalogue,
    _entry,
    _journal,
    _store,
    clear_cache,
    get_cache_data,
)
from executorkit.cache._catalogue import CATALOGUE
from executorkit.cache._journal import JOURNAL

T = 60
SUBPROCESS_TIMEOUT = 120


@pytest.fixture
def store(tmp_path: pathlib.Path) -> CacheStore:
    return CacheStore(tmp_path / "cache")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the entries a listing reads from their files."""
    paths: list[str] = []
    real = _catalogue.read_listed

    def counted(path: str, *args: Any, **kwargs: Any) -> Any:
        paths.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(_catalogue, "read_listed", counted)
    return paths


def from_files(directory: pathlib.Path, **kwargs: Any) -> list[tuple[Any, ...]]:
    """What a listing shows when it reads every entry from its file."""
    saved = {name: (directory / name).read_bytes() for name in (JOURNAL, CATALOGUE)
             if (directory / name).exists()}
    for name in saved:
        os.unlink(directory / name)
    try:
        return shown(get_cache_data(directory, **kwargs))
    finally:
        for name in (JOURNAL, CATALOGUE):  # as this listing left them
            if (directory / name).exists():
                os.unlink(directory / name)
        for name, data in saved.items():
            (directory / name).write_bytes(data)


def journal_bytes(store: CacheStore) -> bytes:
    return (store.directory / JOURNAL).read_bytes()


# --------------------------------------------------------------------------------------------
# the journal is used

@pytest.mark.parametrize("load_outputs", [True, False])
def test_the_first_listing_after_real_calls_reads_no_entry(
    tmp_path: pathlib.Path, reads: list[str], load_outputs: bool
) -> None:
    """Entries written by the workers of an executor, as a campaign writes them."""
    cache = tmp_path / "cache"
    with SingleNodeExecutor(max_workers=2, cache_directory=os.fspath(cache)) as exe:
        futures = [exe.submit(tf.inc, index) for index in range(6)]
        futures.append(exe.submit(tf.fail, "journaled failure"))
        futures.append(exe.submit(tf.inc, 7, resource_dict={"cache_key": "campaign/run-7"}))
        cf_done = [future.exception(timeout=T) for future in futures]
    assert [exc is None for exc in cf_done] == [True] * 6 + [False, True]
    expected = from_files(cache, load_outputs=load_outputs)
    reads.clear()
    frame = get_cache_data(cache, load_outputs=load_outputs)
    assert reads == []
    assert shown(frame) == expected and len(frame) == 8
    assert not (cache / JOURNAL).exists() and (cache / CATALOGUE).is_file()
    assert not (cache / "campaign" / JOURNAL).exists()
    assert shown(get_cache_data(cache, load_outputs=load_outputs)) == expected
    assert reads == []  # and the next listing takes them from the catalogue


def test_outputs_journaled_serve_a_listing_with_outputs_later(store: CacheStore,
                                                              reads: list[str]) -> None:
    for index in range(4):
        store.write(record(f"k{index}", args=(float(index),), output=3.0 * index))
    get_cache_data(store.directory, load_outputs=False)
    frame = get_cache_data(store.directory)
    assert reads == [] and sorted(frame["output"]) == [0.0, 3.0, 6.0, 9.0]


def test_large_pickles_stay_out_of_the_journal(store: CacheStore, reads: list[str]) -> None:
    big = bytes(range(256)) * 200  # 51 kB
    store.write(record("big", args=(big,), output=big))
    assert len(journal_bytes(store)) < len(big) // 4
    frame = get_cache_data(store.directory)
    assert reads == []  # read at the places the journal points to, not as a whole entry
    assert frame.loc[0, "input_args"] == (big,) and frame.loc[0, "output"] == big


def test_the_journal_is_entries_on_top_of_the_catalogue(store: CacheStore,
                                                        reads: list[str]) -> None:
    """Written after a listing: the next one takes the catalogue's and the journal's."""
    for index in range(3):
        store.write(record(f"k{index}", output=float(index)))
    get_cache_data(store.directory)
    store.write(record("k1", args=(5.0,), output=15.0))  # rewritten
    store.write(record("new", output=7.0))
    expected = from_files(store.directory)
    reads.clear()
    assert shown(get_cache_data(store.directory)) == expected
    assert reads == []
    with _catalogue._Stored.read(os.fspath(store.directory)) as stored:
        assert set(stored.entries) == {"k0.h5", "k1.h5", "k2.h5", "new.h5"}
        assert pickle.loads(stored.outputs()["k1.h5"]) == 15.0


# --------------------------------------------------------------------------------------------
# a journal record never shows what the file does not hold

def test_a_record_whose_file_was_rewritten_later_is_not_trusted(
    store: CacheStore, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write(record("k", args=(1.0,), output=3.0))
    with monkeypatch.context() as patch:
        patch.setattr(_store, "append", lambda *args: None)  # a writer that journals nothing
        store.write(record("k", args=(2.0,), output=6.0))
    frame = get_cache_data(store.directory)
    assert reads == [os.fspath(store.path("k"))]
    assert frame.loc[0, "input_args"] == (2.0,) and frame.loc[0, "output"] == 6.0


def test_an_edit_in_place_after_the_record_is_read(store: CacheStore,
                                                   reads: list[str]) -> None:
    path = store.write(record("k", args=(1.0,), output=3.0))
    before = os.stat(path)
    with open(path, "r+b") as fh:  # rewrite a byte with itself: only the change time moves
        fh.seek(0)
        fh.write(fh.read(1))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    if os.stat(path).st_ctime_ns == before.st_ctime_ns:
        pytest.skip("this file system's change time did not move within the test")
    get_cache_data(store.directory)
    assert reads == [os.fspath(path)]


def test_a_rewrite_between_rename_and_journaling_is_not_paired_with_the_record(
    store: CacheStore, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer renames its version into place right after ours: our record carries
    the identity of the file we renamed (held open), so it does not vouch for theirs."""
    real = os.replace
    raced: list[bool] = []

    def racing(src: str, dst: str) -> None:
        real(src, dst)
        if not raced and dst.endswith("k.h5"):
            raced.append(True)
            store.write(record("k", args=(2.0,), output=6.0))  # theirs, journaled first

    with monkeypatch.context() as patch:
        patch.setattr(_store.os, "replace", racing)
        store.write(record("k", args=(1.0,), output=3.0))
    assert raced
    frame = get_cache_data(store.directory)
    assert frame.loc[0, "input_args"] == (2.0,) and frame.loc[0, "output"] == 6.0
    assert reads == [os.fspath(store.path("k"))]  # our record, the last one, is not trusted


def _records(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each record of a journal written in one piece."""
    spans, at = [], 0
    while at < len(data):
        length = _journal._FRAME.unpack_from(data, at)[3]
        end = at + _journal._FRAME.size + length
        spans.append((at, end))
        at = end
    return spans


def _other_format(payload: bytes) -> bytes:
    head = _journal._FRAME.pack(_journal._MARK, b"", 2, len(payload))[_journal._CHECKED:]
    import hashlib
    check = hashlib.blake2b(head + payload, digest_size=16).digest()
    return _journal._MARK + check + head + payload


@pytest.mark.parametrize("damage", ["torn last", "flipped byte", "garbage between",
                                    "interleaved", "other format", "short record"])
def test_damaged_records_are_skipped(store: CacheStore, reads: list[str],
                                     damage: str) -> None:
    for index in range(4):
        store.write(record(f"k{index}", args=(float(index),), output=3.0 * index))
    data = journal_bytes(store)
    spans = _records(data)
    assert len(spans) == 4
    _first, (b0, b1), (c0, _c1), (d0, d1) = spans
    if damage == "torn last":  # a writer killed or out of space mid-append
        data, unread = data[:d1 - 7], ["k3"]
    elif damage == "flipped byte":
        mutable = bytearray(data)
        mutable[b0 + 60] ^= 0xFF
        data, unread = bytes(mutable), ["k1"]
    elif damage == "garbage between":
        data, unread = data[:c0] + b"\0garbage EKJ\x00 more" + data[c0:], []
    elif damage == "interleaved":  # O_APPEND on NFS: a record written over another's tail
        data, unread = data[:b0 + 40] + data[c0:], ["k1"]
    elif damage == "other format":
        data = data[:b0] + _other_format(data[b0 + _journal._FRAME.size:b1]) + data[b1:]
        unread = ["k1"]
    else:  # a record that claims more bytes than the journal has
        data, unread = data[:d0] + data[d0:d0 + _journal._FRAME.size], ["k3"]
    (store.directory / JOURNAL).write_bytes(data)
    expected = from_files(store.directory)
    reads.clear()
    frame = get_cache_data(store.directory)
    assert shown(frame) == expected
    assert sorted(reads) == [os.fspath(store.path(key)) for key in unread]


class Marker:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_a_journal_cannot_run_code(store: CacheStore, tmp_path: pathlib.Path,
                                   reads: list[str]) -> None:
    """A record with a valid digest that names a global is refused, not unpickled."""
    store.write(record("k"))
    marker = tmp_path / "ran"
    payload = pickle.dumps(("k.h5", Marker(os.fspath(marker)), *range(16)), protocol=5)
    (store.directory / JOURNAL).write_bytes(_journal._record(payload))
    assert len(get_cache_data(store.directory)) == 1
    assert not marker.exists() and reads == [os.fspath(store.path("k"))]


def test_a_journal_that_reached_its_size_limit_takes_no_more(
    store: CacheStore, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write(record("k0"))
    monkeypatch.setattr(_journal, "_MAX_SIZE", len(journal_bytes(store)))
    store.write(record("k1"))
    assert len(_journal.parse(journal_bytes(store))) == 1
    assert len(get_cache_data(store.directory)) == 2
    assert reads == [os.fspath(store.path("k1"))]


# --------------------------------------------------------------------------------------------
# clear_cache

def test_clear_cache_keeps_journal_and_catalogue_consistent(store: CacheStore,
                                                            reads: list[str]) -> None:
    for index in range(3):
        store.write(record(f"k{index}", output=float(index)))
    store.write(record("failed", status="failed"))
    # The filter sees the journaled entries (without reading their files).
    assert clear_cache(store.directory, status="failed") == 1
    assert reads == [] and not (store.directory / JOURNAL).exists()
    with _catalogue._Stored.read(os.fspath(store.directory)) as stored:
        assert set(stored.entries) == {"k0.h5", "k1.h5", "k2.h5"}
    store.write(record("failed", status="failed"))  # journaled again
    assert clear_cache(store.directory, function="triple", status="done") == 3
    frame = get_cache_data(store.directory)
    assert list(frame["cache_key"]) == ["failed"] and reads == []
    store.write(record("k9"))
    assert clear_cache(store.directory) == 2
    assert sorted(os.listdir(store.directory)) == []  # entries, catalogue and journal gone
    store.write(record("k0", output=1.0))
    frame = get_cache_data(store.directory)
    assert list(frame["output"]) == [1.0] and reads == []


# --------------------------------------------------------------------------------------------
# concurrency: writers in many processes append while a listing claims and folds

WRITER_COUNTS = ("60", "4")  # keys per writer, keys every writer rewrites (WRITER)


def consistent(frame: Any) -> None:
    """Each row's arguments and output come from one version of its file."""
    for row in frame.itertuples(index=False):
        index, version = row.input_args
        assert row.input_kwargs == {"index": index, "version": version}, row
        assert row.output is None or row.output[:2] == (index, version), row


@pytest.mark.slow
def test_appends_from_many_processes_while_listings_fold(
    store: CacheStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(store.directory), str(n),
                                 *WRITER_COUNTS],
                                stderr=subprocess.PIPE, text=True) for n in range(4)]
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        listings = 0
        while any(proc.poll() is None for proc in writers):  # claim and fold while they append
            assert time.monotonic() < deadline, "the writers did not finish"
            consistent(get_cache_data(store.directory, load_outputs=listings % 2 == 0))
            listings += 1
        for proc in writers:
            _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
            assert proc.returncode == 0, err
    finally:
        for proc in writers:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert listings > 0
    expected = {f"w{n}_{index}" for n in range(4) for index in range(60)} | \
        {f"shared_{index}" for index in range(4)}
    frame = get_cache_data(store.directory)
    assert set(frame["cache_key"]) == expected and len(frame) == len(expected)
    for row in frame.itertuples(index=False):  # exactly what each file holds now
        stored = store.read(row.cache_key)
        assert row.input_args == pickle.loads(stored.args)
        assert row.output == pickle.loads(stored.output)


@pytest.mark.slow
def test_concurrent_appends_lose_no_record(store: CacheStore) -> None:
    """On a local file system every record appended by concurrent writers is read back."""
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(store.directory), str(n),
                                 *WRITER_COUNTS],
                                stderr=subprocess.PIPE, text=True) for n in range(4)]
    for proc in writers:
        _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert proc.returncode == 0, err
    data = journal_bytes(store)
    assert sum(1 for _ in _records(data)) == 4 * 60 * 2  # all whole, none interleaved
    journaled = _journal.parse(data)
    assert len(journaled) == 4 * 60 + 4
    for name, (_output, *entry) in journaled.items():
        if not name.startswith("shared"):
            assert _entry.Entry(*entry).identity == _store.file_identity(
                os.stat(store.directory / name))


def test_each_record_is_read_with_its_own_pickle_memo():
    # Records are pickled one by one, so a repeated object inside a record is a reference
    # into that record's memo. Read with one unpickler, a record must never resolve one to
    # an object of the record before it (a retried call's done entry once showed the
    # failed attempt's error text as a key of its resource_dict).
    from executorkit.cache import _journal

    first = ("a.h5", None, "failed: TimeoutError", "failed: TimeoutError", {"k": 1})
    second = ("b.h5", None, "run_time_max", "run_time_max", {"run_time_max": 60})
    data = b"".join(_journal._record(pickle.dumps(r, protocol=5)) for r in (first, second))
    assert _journal.parse(data) == {"a.h5": first[1:], "b.h5": second[1:]}
