"""The HDF5 cache store and the public helpers reading and pruning a cache directory."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import pickle
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import cloudpickle
import h5py
import numpy as np
import pandas as pd
import pytest

from executorkit.cache import (
    CacheCorruptionWarning,
    CacheRecord,
    CacheStore,
    _store,
    clear_cache,
    get_cache_data,
    get_future_from_cache,
)
from executorkit.cache._catalogue import CATALOGUE
from executorkit.cache._journal import JOURNAL
from executorkit.errors import RemoteError, RemoteTraceback, ResourceError, SerializationError

SUBPROCESS_TIMEOUT = 60


def square(x: float, offset: float = 0.0) -> float:
    return x * x + offset


def make_record(
    key: str,
    *,
    status: str = "done",
    output: Any = 4.0,
    error: BaseException | None = None,
    args: tuple[Any, ...] = (2.0,),
    kwargs: dict[str, Any] | None = None,
    function: Any = square,
    finished: float = 1_700_000_000.0,
    runtime: float = 1.5,
    raw_output: bytes | None = None,
) -> CacheRecord:
    failed = status == "failed"
    if raw_output is None and not failed:
        raw_output = cloudpickle.dumps(output)
    return CacheRecord(
        key=key,
        function_name=f"{function.__module__}.{function.__qualname__}",
        function=cloudpickle.dumps(function),
        args=cloudpickle.dumps(args),
        kwargs=cloudpickle.dumps(kwargs or {}),
        resource_dict={"cores": 2, "cwd": None},
        status=status,
        output=None if failed else raw_output,
        error=cloudpickle.dumps(error) if failed and error is not None else None,
        error_text=(f"Traceback (most recent call last):\n  ...\n{type(error).__name__}: {error}\n"
                    if failed else None),
        started=finished - runtime,
        finished=finished,
        hostname=socket.gethostname(),
        pid=os.getpid(),
    )


@pytest.fixture
def store(tmp_path: pathlib.Path) -> CacheStore:
    return CacheStore(tmp_path / "cache")


def names(directory: pathlib.Path) -> list[str]:
    """The files of ``directory`` but its catalogue and journal (tested on their own)."""
    return sorted(name for name in os.listdir(directory) if name not in (CATALOGUE, JOURNAL))


# --------------------------------------------------------------------------------------------
# CacheStore

def test_store_creates_directory_with_parents(tmp_path: pathlib.Path) -> None:
    store = CacheStore(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert store.path("k1") == tmp_path / "a" / "b" / "k1.h5"


def test_write_and_lookup_round_trip(store: CacheStore) -> None:
    value = {"array": np.arange(5.0), "text": "ü" * 3}
    path = store.write(make_record("k1", output=value))
    assert path == store.path("k1") and path.is_file()
    assert names(store.directory) == ["k1.h5"]  # no temporary file left behind
    hit, result = store.lookup("k1")
    assert hit is True
    assert result["text"] == value["text"]
    np.testing.assert_array_equal(result["array"], value["array"])


def test_lookup_of_missing_key_is_a_miss(store: CacheStore) -> None:
    assert store.lookup("nothing_here") == (False, None)
    assert names(store.directory) == []


def test_none_result_is_a_hit(store: CacheStore) -> None:
    store.write(make_record("k1", output=None))
    assert store.lookup("k1") == (True, None)


def test_failed_entry_is_a_miss_without_warning(store: CacheStore) -> None:
    store.write(make_record("k1", status="failed", error=ValueError("boom")))
    assert store.lookup("k1") == (False, None)
    assert names(store.directory) == ["k1.h5"]  # kept for inspection, not moved aside


def test_write_replaces_an_older_entry(store: CacheStore) -> None:
    store.write(make_record("k1", status="failed", error=ValueError("boom")))
    store.write(make_record("k1", output="second"))
    assert store.lookup("k1") == (True, "second")
    assert names(store.directory) == ["k1.h5"]


def test_read_returns_the_whole_record(store: CacheStore) -> None:
    record = make_record("k1", output=[1, 2], kwargs={"offset": 1.0})
    store.write(record)
    assert store.read("k1") == record
    without_output = store.read("k1", load_output=False)
    assert without_output.output is None and without_output.args == record.args
    with pytest.raises(KeyError, match="absent"):
        store.read("absent")


def test_file_is_plain_hdf5_with_metadata(store: CacheStore) -> None:
    store.write(make_record("k1", output=7))
    with h5py.File(store.path("k1"), "r") as handle:
        assert handle.attrs["complete"] == 1
        meta = json.loads(handle["meta"][()].tobytes())
        assert meta["status"] == "done" and meta["function_name"].endswith(".square")
        assert meta["resource_dict"] == {"cores": 2, "cwd": None}
        assert pickle.loads(handle["output"][()].tobytes()) == 7


@pytest.mark.parametrize(
    "key", [".hidden", "a//b", "/abs", "a/", "../up", "a/../b", "", "x" * 201, "a\n"])
def test_malformed_keys_are_rejected(store: CacheStore, key: str) -> None:
    with pytest.raises(ResourceError, match="cache key"):
        store.path(key)
    with pytest.raises(ResourceError):
        store.write(make_record(key))


def test_invalid_record_is_rejected(store: CacheStore) -> None:
    with pytest.raises(ValueError, match="status"):
        store.write(make_record("k1", status="running"))
    record = make_record("k1")
    record.output = None
    with pytest.raises(ValueError, match="output"):
        store.write(record)
    assert names(store.directory) == []


def test_unserializable_resource_dict_is_stored_as_text(store: CacheStore) -> None:
    record = make_record("k1")
    record.resource_dict = {"cwd": pathlib.Path("/work")}
    store.write(record)
    assert store.read("k1").resource_dict == {"cwd": "/work"}


# --------------------------------------------------------------------------------------------
# damaged files

def assert_moved_aside(store: CacheStore, key: str) -> None:
    assert not store.path(key).exists()
    assert (store.directory / f"{key}.h5.corrupt").is_file()


def test_truncated_file_is_a_miss_with_warning_and_moved_aside(store: CacheStore) -> None:
    path = store.write(make_record("k1", output=np.zeros(1000)))
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.warns(CacheCorruptionWarning, match=r"k1\.h5.*moved it to .*k1\.h5\.corrupt"):
        assert store.lookup("k1") == (False, None)
    assert_moved_aside(store, "k1")
    assert store.lookup("k1") == (False, None)  # now simply missing: no second warning


def test_garbage_file_replaces_an_older_corrupt_file(store: CacheStore) -> None:
    (store.directory / "k1.h5.corrupt").write_bytes(b"old")
    store.path("k1").write_bytes(b"this is not HDF5" * 64)
    with pytest.warns(CacheCorruptionWarning, match="k1.h5"):
        assert store.lookup("k1") == (False, None)
    assert_moved_aside(store, "k1")
    assert (store.directory / "k1.h5.corrupt").read_bytes().startswith(b"this is not HDF5")


def test_file_without_complete_marker_is_a_miss(store: CacheStore) -> None:
    path = store.write(make_record("k1"))
    with h5py.File(path, "r+") as handle:
        del handle.attrs["complete"]
    with pytest.warns(CacheCorruptionWarning, match="not completely written"):
        assert store.lookup("k1") == (False, None)
    assert_moved_aside(store, "k1")


def test_done_file_without_output_is_a_miss(store: CacheStore) -> None:
    path = store.write(make_record("k1"))
    with h5py.File(path, "r+") as handle:
        del handle["output"]
    with pytest.warns(CacheCorruptionWarning, match="no output"):
        assert store.lookup("k1") == (False, None)
    assert_moved_aside(store, "k1")


def test_output_that_cannot_be_unpickled_is_a_miss(store: CacheStore) -> None:
    store.write(make_record("k1", raw_output=b"\x80\x05not a pickle"))
    with pytest.warns(CacheCorruptionWarning, match="UnpicklingError"):
        assert store.lookup("k1") == (False, None)
    assert_moved_aside(store, "k1")


def test_environment_errors_are_raised_and_the_file_kept(
    store: CacheStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write(make_record("k1"))

    def refuse(path: str) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    # A valid file must not be moved aside because the process ran out of descriptors.
    monkeypatch.setattr(_store._hdf5(), "open", refuse)
    monkeypatch.setattr(_store, "_read_output_fast", refuse)
    with pytest.raises(OSError, match="Too many open files"):
        store.lookup("k1")
    assert names(store.directory) == ["k1.h5"]


KILLED_WRITER = textwrap.dedent('''
    import os, sys, time
    from executorkit.cache import CacheRecord, CacheStore

    def stuck_replace(src, dst):
        print("READY", src, flush=True)
        time.sleep(600)

    os.replace = stuck_replace
    record = CacheRecord(
        key=sys.argv[2], function_name="m.f", function=b"f", args=b"a", kwargs=b"k",
        resource_dict={}, status="done", output=b"o", error=None, error_text=None,
        started=0.0, finished=1.0, hostname="h", pid=os.getpid())
    CacheStore(sys.argv[1]).write(record)
''')


def test_writer_killed_before_rename_leaves_no_entry(store: CacheStore) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(store.directory), "k1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], SUBPROCESS_TIMEOUT)
        assert ready, "the writer never reached os.replace"
        line = proc.stdout.readline()
        assert line.startswith("READY"), proc.stderr.read() if proc.stderr else line
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=SUBPROCESS_TIMEOUT) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=SUBPROCESS_TIMEOUT)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    tmp = pathlib.Path(line.split(maxsplit=1)[1].strip())
    assert tmp.is_file() and tmp.name.startswith(".k1.")  # the write was complete but unpublished
    assert not store.path("k1").exists()
    assert store.lookup("k1") == (False, None)
    assert get_cache_data(store.directory).empty
    # The leftover is removed by an unfiltered clear_cache once it is stale.
    assert clear_cache(store.directory) == 0
    assert tmp.exists()  # too fresh to be judged stale
    old = time.time() - 600
    os.utime(tmp, (old, old))
    assert clear_cache(store.directory) == 0
    assert not tmp.exists()


CONCURRENT_WRITER = textwrap.dedent('''
    import os, pickle, sys, time
    from executorkit.cache import CacheRecord, CacheStore

    directory, key, go = sys.argv[1], sys.argv[2], sys.argv[3]
    store = CacheStore(directory)
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)
    for index in range(15):
        store.write(CacheRecord(
            key=key, function_name="m.f", function=b"f", args=b"a", kwargs=b"k",
            resource_dict={}, status="done", output=pickle.dumps((os.getpid(), index)),
            error=None, error_text=None, started=0.0, finished=1.0, hostname="h", pid=os.getpid()))
''')


def test_concurrent_writer_processes_leave_one_valid_file(
    store: CacheStore, tmp_path: pathlib.Path
) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(store.directory), "k1",
                          str(go)], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    try:
        go.touch()
        for proc in procs:
            _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
            assert proc.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert names(store.directory) == ["k1.h5"]
    hit, (pid, index) = store.lookup("k1")
    assert hit and pid in {proc.pid for proc in procs} and index == 14


def test_concurrent_writer_threads_leave_one_valid_file(store: CacheStore) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def write(worker: int) -> None:
        try:
            start.wait(timeout=SUBPROCESS_TIMEOUT)
            for index in range(10):
                store.write(make_record("k1", output=(worker, index)))
                hit, _ = store.lookup("k1")
                assert hit
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=SUBPROCESS_TIMEOUT)
    assert not errors
    assert names(store.directory) == ["k1.h5"]
    hit, (worker, index) = store.lookup("k1")
    assert hit and 0 <= worker < 6 and index == 9


def test_import_loads_neither_h5py_nor_pandas() -> None:
    code = ("import sys, executorkit, executorkit.cache; "
            "print(sorted({'h5py', 'pandas'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, check=True)
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# get_cache_data

EXPECTED_COLUMNS = {
    "cache_key", "function", "input_args", "input_kwargs", "output", "error", "status",
    "runtime", "resource_dict", "hostname", "started", "finished", "filename",
}


def fill(store: CacheStore) -> None:
    store.write(make_record("done_one", output={"value": 4.0}, args=(2.0,),
                            kwargs={"offset": 0.5}, finished=1_700_000_010.0, runtime=2.0))
    store.write(make_record("failed_one", status="failed", error=ZeroDivisionError("zero"),
                            finished=1_700_000_000.0))


def test_get_cache_data_columns_and_values(store: CacheStore) -> None:
    fill(store)
    (store.directory / ".done_one.123.abcd.tmp").write_bytes(b"partial")
    (store.directory / "old.h5.corrupt").write_bytes(b"junk")
    frame = get_cache_data(store.directory)
    assert set(frame.columns) >= EXPECTED_COLUMNS
    assert list(frame["cache_key"]) == ["failed_one", "done_one"]  # oldest first
    done = frame.set_index("cache_key").loc["done_one"]
    assert done["function"] is square
    assert done["input_args"] == (2.0,) and done["input_kwargs"] == {"offset": 0.5}
    assert done["output"] == {"value": 4.0} and done["error"] is None
    assert done["status"] == "done" and done["runtime"] == pytest.approx(2.0)
    assert done["resource_dict"] == {"cores": 2, "cwd": None}
    assert done["hostname"] == socket.gethostname()
    assert done["finished"] == pd.Timestamp(1_700_000_010.0, unit="s", tz="UTC")
    assert done["started"] == pd.Timestamp(1_700_000_008.0, unit="s", tz="UTC")
    assert done["filename"] == str(store.path("done_one"))
    failed = frame.set_index("cache_key").loc["failed_one"]
    assert failed["status"] == "failed" and failed["output"] is None
    assert isinstance(failed["error"], ZeroDivisionError) and str(failed["error"]) == "zero"
    assert isinstance(frame["runtime"].iloc[0], float)


def test_get_cache_data_without_outputs_does_not_unpickle_them(store: CacheStore) -> None:
    fill(store)
    poisoned = pickle.dumps(Exploding())
    store.write(make_record("poisoned", raw_output=poisoned))
    frame = get_cache_data(store.directory, load_outputs=False)  # any warning would fail here
    assert len(frame) == 3
    assert frame["output"].isna().all() and all(value is None for value in frame["output"])
    with pytest.warns(CacheCorruptionWarning, match="cannot unpickle the output"):
        loaded = get_cache_data(store.directory, load_outputs=True)
    assert loaded.set_index("cache_key").loc["poisoned", "output"] is None
    assert loaded.set_index("cache_key").loc["done_one", "output"] == {"value": 4.0}


class Exploding:
    """Unpickling this raises, as an output whose class is gone would."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, ())


def _explode() -> None:
    raise RuntimeError("unpickled!")


def test_get_cache_data_skips_corrupt_files_with_warning(store: CacheStore) -> None:
    fill(store)
    store.path("broken").write_bytes(b"garbage" * 50)
    with pytest.warns(CacheCorruptionWarning, match="broken.h5"):
        frame = get_cache_data(store.directory)
    assert sorted(frame["cache_key"]) == ["done_one", "failed_one"]
    assert store.path("broken").exists()  # inspection does not move files


def test_get_cache_data_skips_entries_with_damaged_metadata(store: CacheStore) -> None:
    fill(store)
    with h5py.File(store.path("done_one"), "r+") as handle:
        del handle["meta"]
        handle.create_dataset("meta", data=np.frombuffer(b'{"status": 3}', dtype="u1"))
    with pytest.warns(CacheCorruptionWarning, match="done_one.h5.*mistypes"):
        frame = get_cache_data(store.directory)
    assert list(frame["cache_key"]) == ["failed_one"]


@pytest.mark.parametrize("create", [True, False])
def test_get_cache_data_of_empty_or_missing_directory(tmp_path: pathlib.Path,
                                                      create: bool) -> None:
    directory = tmp_path / "cache"
    if create:
        directory.mkdir()
    frame = get_cache_data(directory)
    assert frame.empty and set(frame.columns) >= EXPECTED_COLUMNS
    assert not directory.exists() or create


# --------------------------------------------------------------------------------------------
# get_future_from_cache

def test_future_from_cache_done(store: CacheStore) -> None:
    fill(store)
    future = get_future_from_cache(store.directory, "done_one")
    assert future.done() and future.result(timeout=0) == {"value": 4.0}


def test_future_from_cache_failed_raises_the_recorded_error(store: CacheStore) -> None:
    fill(store)
    with pytest.raises(ZeroDivisionError) as info:
        get_future_from_cache(store.directory, "failed_one")
    error = info.value
    assert str(error) == "zero"
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "ZeroDivisionError: zero" in error.__cause__.tb


def test_future_from_cache_failed_with_unpicklable_exception(store: CacheStore) -> None:
    record = make_record("k1", status="failed", error=KeyError("lost"))
    record.error = None
    store.write(record)
    with pytest.raises(RemoteError) as info:
        get_future_from_cache(store.directory, "k1")
    assert info.value.type_name == "KeyError"


def test_future_from_cache_missing_key(store: CacheStore) -> None:
    with pytest.raises(FileNotFoundError, match=rf"absent.*{store.directory.name}") as info:
        get_future_from_cache(store.directory, "absent")
    assert isinstance(info.value, KeyError)  # what it raised before, still caught


def test_future_from_cache_corrupt_entry(store: CacheStore) -> None:
    store.path("k1").write_bytes(b"garbage")
    with pytest.raises(SerializationError, match="k1"):
        get_future_from_cache(store.directory, "k1")


# --------------------------------------------------------------------------------------------
# clear_cache

def fill_for_clearing(store: CacheStore) -> None:
    store.write(make_record("a_done_old", finished=1000.0))
    store.write(make_record("b_done_new", finished=5000.0))
    store.write(make_record("c_failed_old", status="failed", error=ValueError("x"),
                            finished=1000.0))
    store.write(make_record("d_other_fn", function=len, finished=5000.0))


def test_clear_cache_by_status(store: CacheStore) -> None:
    fill_for_clearing(store)
    assert clear_cache(store.directory, status="failed") == 1
    assert names(store.directory) == ["a_done_old.h5", "b_done_new.h5", "d_other_fn.h5"]


def test_clear_cache_by_function(store: CacheStore) -> None:
    fill_for_clearing(store)
    assert clear_cache(store.directory, function="builtins.len") == 1
    assert "d_other_fn.h5" not in names(store.directory)
    assert clear_cache(store.directory, function="square") == 3
    assert names(store.directory) == []


def test_clear_cache_by_time_combined_with_status(store: CacheStore) -> None:
    fill_for_clearing(store)
    assert clear_cache(store.directory, before=2000.0, status="done") == 1
    assert names(store.directory) == ["b_done_new.h5", "c_failed_old.h5", "d_other_fn.h5"]
    assert clear_cache(store.directory, before=2000.0) == 1
    assert names(store.directory) == ["b_done_new.h5", "d_other_fn.h5"]


def test_clear_cache_without_filter_removes_everything_but_live_writes(
    store: CacheStore,
) -> None:
    fill_for_clearing(store)
    get_cache_data(store.directory, load_outputs=False)  # writes the catalogue
    assert (store.directory / CATALOGUE).exists()
    (store.directory / "x.h5.corrupt").write_bytes(b"junk")
    live = store.directory / f".k.{os.getpid()}.0123abcd.tmp"  # a write in progress here
    live.write_bytes(b"partial")
    old = time.time() - 600
    os.utime(live, (old, old))
    unrelated = store.directory / "notes.txt"
    unrelated.write_text("mine")
    assert clear_cache(store.directory) == 4
    assert sorted(os.listdir(store.directory)) == [live.name, "notes.txt"]


def test_clear_cache_filter_skips_corrupt_entries_with_warning(store: CacheStore) -> None:
    fill_for_clearing(store)
    store.path("broken").write_bytes(b"garbage")
    with pytest.warns(CacheCorruptionWarning, match="broken.h5"):
        assert clear_cache(store.directory, status="done") == 3
    assert names(store.directory) == ["broken.h5", "c_failed_old.h5"]


def test_clear_cache_rejects_unknown_status(store: CacheStore) -> None:
    fill_for_clearing(store)
    with pytest.raises(ResourceError, match="'done', 'failed'") as info:
        clear_cache(store.directory, status="error")
    assert info.value.key == "status"
    assert len(names(store.directory)) == 4


def test_clear_cache_of_missing_directory(tmp_path: pathlib.Path) -> None:
    assert clear_cache(tmp_path / "absent") == 0
    assert not (tmp_path / "absent").exists()


def test_fast_path_header_is_checked_against_the_output(store: CacheStore) -> None:
    """Hits are read through the user-block header; flipped output bytes (with the
    modification time put back) fail its digest, and the entry is read through HDF5."""
    path = store.write(make_record("k1"))
    with open(path, "rb") as fh:
        head = fh.read(_store._HEADER.size)
    magic, done, offset, length, _digest, stamp = _store._HEADER.unpack(head)
    assert magic == _store._MAGIC and done == 1 and length > 0
    assert _store._read_output_fast(os.fspath(path)) is not _store._NO_HEADER
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * min(length, 8))
    os.utime(path, ns=(stamp, stamp))
    assert _store._read_output_fast(os.fspath(path)) is _store._NO_HEADER
    with h5py.File(path, "r") as handle:  # still an ordinary HDF5 file
        assert handle.attrs["complete"] == 1


def _leftover(store: CacheStore, pid: int, age: float) -> pathlib.Path:
    """A temporary file as a writer killed ``age`` seconds ago would leave it."""
    path = store.directory / f".k{pid}.{pid}.0123abcd.tmp"
    path.write_bytes(b"partial")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True, timeout=60)
    return int(proc.stdout)


def test_a_filtered_clear_cache_also_removes_stale_temporaries(store: CacheStore) -> None:
    fill_for_clearing(store)
    stale = _leftover(store, _dead_pid(), age=600)
    fresh = _leftover(store, os.getpid(), age=600)  # its writer (this process) is alive
    assert clear_cache(store.directory, status="failed") == 1
    assert not stale.exists() and fresh.exists()


def test_temporaries_are_never_entries(store: CacheStore) -> None:
    fill_for_clearing(store)
    leftover = store.directory / ".a_done_old.1.0123abcd.tmp"
    leftover.write_bytes(store.path("a_done_old").read_bytes())  # complete, but not published
    frame = get_cache_data(store.directory, load_outputs=False)
    assert not any(name.endswith(".tmp") for name in frame["filename"])
    assert len(frame) == len(_store.entry_files(store.directory))


def test_listing_reads_entries_without_hdf5(
    store: CacheStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """get_cache_data reads what the user-block header points at: no HDF5 open at all."""
    store.write(make_record("ok", args=(3.0,), kwargs={"k": 1}))
    store.write(make_record("bad", status="failed", error=ValueError("boom")))
    with monkeypatch.context() as through_hdf5:
        through_hdf5.setattr(_store, "_read_record_fast", lambda *a: _store._NO_HEADER)
        expected = {key: store.read(key) for key in ("ok", "bad")}

    def refuse(path: str) -> None:
        raise AssertionError("HDF5 opened for a listing")

    monkeypatch.setattr(_store._hdf5(), "open", refuse)
    for key, record in expected.items():
        assert _store.read_record(os.fspath(store.path(key))) == record
    frame = get_cache_data(store.directory).set_index("cache_key")
    assert frame.loc["ok", "input_args"] == (3.0,) and frame.loc["ok", "output"] == 4.0
    assert frame.loc["ok", "input_kwargs"] == {"k": 1}
    assert isinstance(frame.loc["bad", "error"], ValueError)
    assert frame.loc["bad", "output"] is None


def test_listing_falls_back_to_hdf5_when_the_extension_does_not_match(store: CacheStore) -> None:
    """Flipped bytes in a listed dataset (modification time put back) fail the listing's
    digest: the entry is read through HDF5, which sees the same flipped bytes."""
    path = store.write(make_record("k1", args=(7.0,)))
    with open(path, "rb") as fh:
        head = fh.read(_store._HEADER.size + _store._LISTING.size)
    stamp = _store._HEADER.unpack_from(head)[-1]
    listing = _store._LISTING.unpack_from(head, _store._HEADER.size)
    meta_offset = listing[1]
    assert _store._read_record_fast(os.fspath(path), True, True) is not _store._NO_HEADER
    with open(path, "r+b") as fh:
        fh.seek(meta_offset)
        fh.write(b" ")  # one byte of the metadata changed
    os.utime(path, ns=(stamp, stamp))
    assert _store._read_record_fast(os.fspath(path), True, True) is _store._NO_HEADER


def test_entries_without_the_listing_extension_are_read_through_hdf5(store: CacheStore) -> None:
    """Files written before the extension existed (a bare header) still list."""
    path = store.write(make_record("old", args=(5.0,)))
    with open(path, "rb") as fh:
        head = fh.read(_store._HEADER.size)
    stamp = _store._HEADER.unpack_from(head)[-1]
    with open(path, "r+b") as fh:
        fh.seek(_store._HEADER.size)
        fh.write(b"\0" * _store._LISTING.size)
    os.utime(path, ns=(stamp, stamp))
    assert _store._read_record_fast(os.fspath(path), True, True) is _store._NO_HEADER
    frame = get_cache_data(store.directory)
    assert frame.loc[0, "input_args"] == (5.0,) and frame.loc[0, "output"] == 4.0
