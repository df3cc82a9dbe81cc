"""The cache as executors use it: hits start no process, keys chain through futures."""

from __future__ import annotations

import concurrent.futures as cf
import os
import time

import pytest
import taskfuncs as tf
from conftest import wait_until

from executorkit import SingleNodeExecutor, get_cache_data, get_future_from_cache

T = 60


def test_rerun_executes_nothing_and_starts_no_process(make_executor, tmp_path):
    cache, runs = str(tmp_path / "cache"), str(tmp_path / "runs")
    exe = make_executor(max_workers=2, cache_directory=cache)
    first = [exe.submit(tf.counted, runs, i) for i in range(10)]
    assert [f.result(timeout=T) for f in first] == [i * 10 for i in range(10)]
    exe.shutdown(wait=True)
    assert tf.runs(runs) == 10

    again = make_executor(max_workers=2, cache_directory=cache)
    second = [again.submit(tf.counted, runs, i) for i in range(10)]
    assert all(f.done() for f in second)  # answered during submit
    assert [f.result(timeout=T) for f in second] == [i * 10 for i in range(10)]
    assert not again._engine.launcher.started  # no fork server, no job: nothing started
    assert tf.runs(runs) == 10


def test_failed_entries_are_recorded_and_rerun(make_executor, tmp_path):
    cache, runs = str(tmp_path / "cache"), str(tmp_path / "runs")
    exe = make_executor(max_workers=1, cache_directory=cache)
    with pytest.raises(RuntimeError):
        exe.submit(tf.counted_fail, runs, 1).result(timeout=T)
    frame = get_cache_data(cache)
    assert list(frame["status"]) == ["failed"]
    assert "failed for 1" in frame["error_text"].iloc[0]
    with pytest.raises(RuntimeError):
        exe.submit(tf.counted_fail, runs, 1).result(timeout=T)
    assert tf.runs(runs) == 2


def test_downstream_hit_needs_nothing_upstream(make_executor, tmp_path):
    cache, runs = str(tmp_path / "cache"), str(tmp_path / "runs")
    exe = make_executor(max_workers=2, cache_directory=cache)
    up = exe.submit(tf.counted, runs, 1)
    down = exe.submit(tf.inc, up)
    assert down.result(timeout=T) == 11
    exe.shutdown(wait=True)
    # Remove the upstream entry: the downstream key chains through the upstream *key*,
    # so the downstream result is found while the upstream call is still running.
    up_key = next(k for k in get_cache_data(cache)["cache_key"] if k.startswith("counted"))
    os.remove(os.path.join(cache, f"{up_key}.h5"))
    again = make_executor(max_workers=2, cache_directory=cache)
    up2 = again.submit(tf.counted, runs, 1)
    down2 = again.submit(tf.inc, up2)
    assert down2.done() and down2.result(timeout=T) == 11
    assert up2.result(timeout=T) == 10


def test_same_call_same_key_across_modes_and_cache_key_override(tmp_path):
    cache = str(tmp_path / "cache")
    with SingleNodeExecutor(max_workers=1, cache_directory=cache) as exe:
        exe.submit(tf.inc, 1).result(timeout=T)
        exe.submit(tf.inc, 2, resource_dict={"cache_key": "my-key"}).result(timeout=T)
    with SingleNodeExecutor(max_workers=1, cache_directory=cache, block_allocation=True) as exe:
        assert exe.submit(tf.inc, 1).done()
    keys = set(get_cache_data(cache)["cache_key"])
    assert "my-key" in keys and len(keys) == 2
    assert get_future_from_cache(cache, "my-key").result(timeout=T) == 3


def test_per_call_cache_directory(make_executor, tmp_path):
    exe = make_executor(max_workers=1)
    where = str(tmp_path / "percall")
    assert exe.submit(tf.inc, 5, resource_dict={"cache_directory": where}).result(timeout=T) == 6
    assert len(get_cache_data(where)) == 1
    assert exe.submit(tf.inc, 5, resource_dict={"cache_directory": where}).done()


def test_two_executors_share_one_cache(tmp_path):
    cache = str(tmp_path / "cache")
    with SingleNodeExecutor(max_workers=1, cache_directory=cache) as a, \
            SingleNodeExecutor(max_workers=1, cache_directory=cache) as b:
        fa = [a.submit(tf.inc, i) for i in range(5)]
        fb = [b.submit(tf.inc, i) for i in range(5)]
        assert [f.result(timeout=T) for f in fa] == [f.result(timeout=T) for f in fb]
    frame = get_cache_data(cache)
    assert len(frame) == 5 and set(frame["status"]) == {"done"}


def test_foreign_future_arguments_are_keyed_by_value(make_executor, tmp_path):
    cache, runs = str(tmp_path / "cache"), str(tmp_path / "runs")
    exe = make_executor(max_workers=1, cache_directory=cache)
    gate = cf.Future()
    fut = exe.submit(tf.counted, runs, gate)
    gate.set_result(4)
    assert fut.result(timeout=T) == 40
    done = cf.Future()
    done.set_result(4)
    assert exe.submit(tf.counted, runs, done).result(timeout=T) == 40
    assert tf.runs(runs) == 1  # same value, same key


def test_init_function_is_part_of_the_key(tmp_path):
    cache = str(tmp_path / "cache")

    def init_a():
        return {"state": "a"}

    def init_b():
        return {"state": "b"}

    for init, expected in ((init_a, "a"), (init_b, "b"), (init_a, "a")):
        with SingleNodeExecutor(max_workers=1, block_allocation=True, init_function=init,
                                cache_directory=cache) as exe:
            assert exe.submit(tf.uses_state, 1).result(timeout=T) == (1, expected)
    assert len(get_cache_data(cache)) == 2


def test_corrupt_entry_is_a_miss_and_reruns(make_executor, tmp_path):
    from executorkit.cache import CacheCorruptionWarning

    cache, runs = str(tmp_path / "cache"), str(tmp_path / "runs")
    exe = make_executor(max_workers=1, cache_directory=cache)
    assert exe.submit(tf.counted, runs, 2).result(timeout=T) == 20
    (entry,) = [n for n in os.listdir(cache) if n.endswith(".h5")]
    with open(os.path.join(cache, entry), "r+b") as fh:
        fh.truncate(100)
    with pytest.warns(CacheCorruptionWarning):
        fut = exe.submit(tf.counted, runs, 2)
    assert fut.result(timeout=T) == 20
    wait_until(lambda: tf.runs(runs) == 2)


def test_task_output_is_kept_next_to_its_entry(make_executor, tmp_path, capfd):
    cache = str(tmp_path / "cache")
    exe = make_executor(max_workers=1, cache_directory=cache)
    assert exe.submit(tf.say, "kept for later").result(timeout=T) == 14
    exe.shutdown(wait=True)
    (key,) = get_cache_data(cache)["cache_key"]
    with open(os.path.join(cache, f"{key}.out")) as fh:
        assert "kept for later" in fh.read()
    assert "kept for later" in capfd.readouterr().out  # and it still reached the driver


def test_opening_a_cache_directory_removes_stale_temporaries(make_executor, tmp_path):
    """A writer killed mid-write leaves ``.<key>.<pid>.<token>.tmp``; the next executor that
    uses the directory removes it (once stale), and never reads it."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    cache.mkdir()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True, timeout=60).stdout)
    leftover = cache / f".inc_0123.{dead}.0123abcd.tmp"
    leftover.write_bytes(b"partial")
    then = time.time() - 600
    os.utime(leftover, (then, then))
    exe = make_executor(max_workers=1, cache_directory=str(cache))
    assert exe.submit(tf.inc, 1).result(timeout=T) == 2
    assert not leftover.exists()
