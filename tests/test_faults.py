"""Fault injection, in both modes: workers killed from outside, memory exhaustion, objects
that fail to pickle or to be deleted, huge arguments, floods of submits and cancels, calls
from many threads and from done-callbacks, stdlib and asyncio waiting on our futures.

Every case checks the same things: nothing hangs (every wait has a timeout), the right
future fails with an error that says what happened, the executor keeps working, and no
process is left (the ``no_leftover_processes`` fixture of conftest.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import queue
import random
import signal
import threading

import faultfuncs as ff
import pytest
import taskfuncs as tf
from conftest import wait_until

import executorkit
from executorkit import SingleNodeExecutor
from executorkit.errors import (
    ExecutorBrokenError,
    RemoteError,
    SerializationError,
    WorkerDiedError,
)

T = 120


def _pid_of(directory, name) -> int:
    with open(os.path.join(directory, f"{name}.started")) as fh:
        return int(fh.read())


def _still_works(exe) -> None:
    assert exe.submit(tf.inc, 41).result(timeout=T) == 42


# ------------------------------------------------------------------ killed workers


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV, signal.SIGTERM])
def test_killed_worker_fails_only_its_call(make_executor, tmp_path, signum):
    d = str(tmp_path)
    exe = make_executor(max_workers=2)
    victim = exe.submit(tf.gate, d, "victim")
    other = exe.submit(tf.gate, d, "other", 7)
    wait_until(lambda: tf.started(d, "victim") and tf.started(d, "other"), timeout=T)
    os.kill(_pid_of(d, "victim"), signum)
    with pytest.raises(WorkerDiedError, match=signal.Signals(signum).name) as info:
        victim.result(timeout=T)
    assert info.value.signal == signum
    tf.release(d, "other")
    assert other.result(timeout=T) == 7
    _still_works(exe)


def test_call_that_closes_its_own_connection(make_executor):
    exe = make_executor(max_workers=1)
    with pytest.raises(WorkerDiedError, match="close_all_descriptors"):
        exe.submit(ff.close_all_descriptors).result(timeout=T)
    _still_works(exe)


def test_fork_server_killed_breaks_the_executor_with_a_named_error(make_executor, tmp_path):
    d = str(tmp_path)
    exe = make_executor(max_workers=1)
    fut = exe.submit(tf.gate, d, "held")
    wait_until(lambda: tf.started(d, "held"), timeout=T)
    exe._engine.launcher.process.kill()
    with pytest.raises(ExecutorBrokenError, match="fork server"):
        fut.result(timeout=T)
    with pytest.raises(ExecutorBrokenError, match="fork server"):
        exe.submit(tf.inc, 1)
    exe.shutdown(wait=True)


def test_out_of_memory_call_fails_with_memory_error(make_executor, mode):
    exe = make_executor(max_workers=1)
    # A persistent worker must get its limit back to stay usable; a one-shot one need not.
    fut = exe.submit(ff.allocate_past_limit, 256, mode == "block")
    with pytest.raises(MemoryError):
        fut.result(timeout=T)
    _still_works(exe)


# ------------------------------------------------------------------ pickling and __del__


@pytest.mark.parametrize("cls, expected, words", [
    (ff.ReduceRaises, RemoteError, "ReduceRaises"),
    (ff.ReduceExits, RemoteError, "ReduceExits"),
    (ff.StrRaises, ff.StrRaises, None),
])
def test_exceptions_that_cannot_travel_or_print(make_executor, cls, expected, words):
    exe = make_executor(max_workers=1)
    with pytest.raises(expected, match=words) as info:
        exe.submit(ff.raise_, cls, "boom").result(timeout=T)
    assert "raise_" in info.value.__cause__.tb  # the worker's traceback is still there
    _still_works(exe)


def test_result_whose_pickling_raises(make_executor):
    exe = make_executor(max_workers=1)
    with pytest.raises(SerializationError, match="refuses to be pickled"):
        exe.submit(ff.return_, ff.ResultReduceRaises).result(timeout=T)
    _still_works(exe)


def test_unpicklable_call_then_shutdown_no_wait():
    # upstream test_shutdown_deadlock_pickle: the failing future still completes.
    exe = SingleNodeExecutor(max_workers=2)
    assert exe.submit(tf.inc, 1).result(timeout=T) == 2
    fut = exe.submit(tf.identity, ff.ResultReduceRaises())
    exe.shutdown(wait=False)
    with pytest.raises(SerializationError, match="refuses to be pickled"):
        fut.result(timeout=T)
    exe.shutdown(wait=True)


def test_objects_raising_in_del_do_not_disturb_the_worker(make_executor):
    exe = make_executor(max_workers=1)
    assert exe.submit(ff.payload_size, ff.DelRaises(10)).result(timeout=T) == 10
    assert exe.submit(ff.drop_del_raises, 5).result(timeout=T) == 5
    _still_works(exe)


# ------------------------------------------------------------------ size and volume


def test_hundred_megabyte_argument_and_result(make_executor):
    size = 100 << 20
    exe = make_executor(max_workers=1)
    assert exe.submit(ff.nbytes, b"x" * size).result(timeout=T) == size
    assert len(exe.submit(ff.blob, size).result(timeout=T)) == size
    _still_works(exe)


def test_ten_thousand_submits_then_shutdown_no_wait(mode):
    n = 10_000
    exe = SingleNodeExecutor(max_workers=2, **({"block_allocation": True} if mode == "block"
                                               else {}))
    futures = [exe.submit(tf.inc, i) for i in range(n)]
    # Per-task mode starts a process per call: cancel what has not started, so the test
    # stays short; block mode runs every call.
    exe.shutdown(wait=False, cancel_futures=mode == "per-task")
    not_done = cf.wait(futures, timeout=600).not_done
    assert not not_done
    ran = [(i, f) for i, f in enumerate(futures) if not f.cancelled()]
    assert all(f.result() == i + 1 for i, f in ran)
    if mode == "block":
        assert len(ran) == n
    else:
        assert ran  # calls submitted while slots were free started before the cancel
    exe.shutdown(wait=True)


def test_cancelled_futures_wake_stdlib_wait_and_as_completed(make_executor, tmp_path):
    # The stdlib's wait()/as_completed() only count a cancelled future once the executor
    # has called set_running_or_notify_cancel() on it.
    d = str(tmp_path)
    exe = make_executor(max_workers=1)
    held = exe.submit(tf.gate, d, "held")
    waiting = exe.submit(tf.inc, 1)
    assert waiting.cancel() and waiting.cancel()
    assert cf.wait([waiting], timeout=30).done == {waiting}
    assert list(cf.as_completed([waiting], timeout=30)) == [waiting]
    wait_until(lambda: tf.started(d, "held"), timeout=T)
    assert held.cancel()  # a running call (our extension) too
    assert cf.wait([held], timeout=30).done == {held}
    _still_works(exe)
    assert exe.info["cancelled"] == 2  # cancel() twice counts once


def test_cancel_storm_while_calls_finish(make_executor):
    exe = make_executor(max_workers=2)
    futures = [exe.submit(tf.inc, i) for i in range(1000)]
    order = list(futures)
    random.Random(7).shuffle(order)
    halves = (order[::2], order[1::2])
    threads = [threading.Thread(target=lambda fs: [f.cancel() for f in fs], args=(h,))
               for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=T)
    not_done = cf.wait(futures, timeout=T).not_done
    assert not not_done
    for i, f in enumerate(futures):
        assert f.cancelled() or f.result() == i + 1
    _still_works(exe)
    info = exe.info
    assert info["failed"] == 0
    assert info["done"] + info["cancelled"] == len(futures) + 1


def test_submit_from_many_threads_at_once(make_executor):
    exe = make_executor(max_workers=2)
    threads, per_thread = 8, 100
    barrier = threading.Barrier(threads)
    out: list[list[cf.Future]] = [[] for _ in range(threads)]

    def submitter(k):
        barrier.wait(timeout=T)
        out[k] = [exe.submit(tf.add, k, i) for i in range(per_thread)]

    workers = [threading.Thread(target=submitter, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=T)
    for k in range(threads):
        assert [f.result(timeout=T) for f in out[k]] == [k + i for i in range(per_thread)]


def test_submit_from_done_callbacks(make_executor):
    exe = make_executor(max_workers=2)
    results: queue.Queue = queue.Queue()

    def chain(f):
        value = f.result()
        if value < 20:
            exe.submit(tf.inc, value).add_done_callback(chain)
        else:
            results.put(value)

    exe.submit(tf.inc, 0).add_done_callback(chain)
    assert results.get(timeout=T) == 20


def test_raising_done_callback_is_logged_and_harmless(make_executor, caplog):
    exe = make_executor(max_workers=1)

    def bad(_):
        raise ValueError("callback failed")

    fut = exe.submit(tf.inc, 1)
    fut.add_done_callback(bad)
    assert fut.result(timeout=T) == 2
    _still_works(exe)
    wait_until(lambda: "callback failed" in caplog.text, timeout=T)


def test_done_callback_raising_system_exit_does_not_break_the_executor(
        make_executor, caplog, tmp_path):
    # The stdlib lets a BaseException out of a done-callback; on our engine thread it must
    # be logged, not end the executor.
    d = str(tmp_path)
    exe = make_executor(max_workers=1)

    def exits(_):
        raise SystemExit("callback exits")

    fut = exe.submit(tf.gate, d, "held", 2)
    fut.add_done_callback(exits)  # (attached while the call is held: runs on the engine)
    tf.release(d, "held")
    assert fut.result(timeout=T) == 2
    _still_works(exe)
    assert "a done-callback of task" in caplog.text


# ------------------------------------------------------------------ waiting on our futures


def test_stdlib_wait_and_as_completed_with_timeouts(make_executor, tmp_path):
    d = str(tmp_path)
    exe = make_executor(max_workers=2)
    held = exe.submit(tf.gate, d, "held", 5)
    quick = exe.submit(tf.inc, 1)
    assert quick.result(timeout=T) == 2
    done, not_done = cf.wait([held, quick], timeout=0.2)
    assert (done, not_done) == ({quick}, {held})
    for as_completed in (cf.as_completed, executorkit.as_completed):
        seen = []
        with pytest.raises(cf.TimeoutError, match=r"1 \(of 2\) futures unfinished"):
            seen.extend(as_completed([held, quick], timeout=0.2))
        assert seen == [quick]
    tf.release(d, "held")
    assert [f.result() for f in cf.as_completed([held, quick], timeout=T)] in ([5, 2], [2, 5])


def test_asyncio_wrap_future_gathers_results(make_executor):
    exe = make_executor(max_workers=2)

    async def main():
        return await asyncio.gather(*(asyncio.wrap_future(exe.submit(tf.inc, i))
                                      for i in range(20)))

    assert asyncio.run(main()) == list(range(1, 21))


def test_asyncio_timeout_cancels_the_running_call(make_executor, tmp_path):
    d = str(tmp_path)
    exe = make_executor(max_workers=1)
    fut = exe.submit(tf.gate, d, "held")
    wait_until(lambda: tf.started(d, "held"), timeout=T)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(fut), 0.1)

    asyncio.run(main())
    assert fut.cancelled()  # asyncio cancels the wrapped future: our extension stops it
    _still_works(exe)

