"""Contract, memory and faults (issue 10): references the executor must not keep, the bytes
held for waiting calls, and shutdown from a done-callback.

The reference tests run with the cyclic garbage collector off: what they check is that
nothing is kept alive by reference cycles until the next full collection, which is what
made 10,000 dropped 1 MiB results pile up in the driver.
"""

from __future__ import annotations

import gc
import queue
import threading
import weakref

import pytest
import taskfuncs as tf
from conftest import wait_until

T = 60
MiB = 1 << 20


@pytest.fixture
def no_gc():
    was = gc.isenabled()
    gc.disable()
    yield
    if was:
        gc.enable()


@pytest.mark.parametrize("kind", ["bound method", "callable instance"])
def test_no_stale_references(make_executor, no_gc, kind):
    """CPython's test_no_stale_references: the submitted callable (and a bound method's
    instance) is freed once the call is done, although the future is still held. In
    block mode this also covers the per-function runtime table."""
    exe = make_executor(max_workers=1)
    thing = tf.Thing()
    collected = threading.Event()
    ref = weakref.ref(thing, lambda _: collected.set())
    fut = exe.submit(thing.method if kind == "bound method" else thing)
    assert fut.result(timeout=T) in ("method", "called")
    del thing
    assert collected.wait(T), "the executor keeps the callable of a finished call alive"
    assert ref() is None and fut.done()  # (the future was held throughout)


def test_map_frees_each_result(make_executor, no_gc):
    """CPython's test_free_reference: iterating over map() keeps no result alive."""
    exe = make_executor(max_workers=1)
    for obj in exe.map(tf.make_dummy, range(5), timeout=T):
        ref = weakref.ref(obj)
        del obj
        wait_until(lambda ref=ref: ref() is None, timeout=T)


def test_a_dropped_future_and_its_result_are_freed(make_executor, no_gc):
    exe = make_executor(max_workers=1)
    fut = exe.submit(tf.make_dummy, 1)
    result = fut.result(timeout=T)
    refs = weakref.ref(fut), weakref.ref(result)
    del fut, result
    wait_until(lambda: refs[0]() is None and refs[1]() is None, timeout=T)


def test_a_finished_future_still_works_as_an_input(make_executor):
    """The task keeps what a later call needs of a finished future (its name, its cache
    key) after letting go of the future itself."""
    exe = make_executor(max_workers=1)
    first = exe.submit(tf.inc, 1)
    assert first.result(timeout=T) == 2
    assert exe.submit(tf.inc, first).result(timeout=T) == 3
    failed = exe.submit(tf.fail, "no")
    with pytest.raises(ValueError):
        failed.result(timeout=T)
    with pytest.raises(ValueError, match="fail"):
        exe.submit(tf.inc, failed).result(timeout=T)


def _held_bytes(exe) -> int:
    """Pickled bytes the engine holds for its calls, read on the engine thread once the
    turn that queued the calls submitted so far has ended (its end pickles ahead)."""
    engine = exe._engine
    out: queue.Queue[int] = queue.Queue()

    def count() -> None:
        payloads = sum(len(b) for t in engine.tasks.values() if t.payload for b in t.payload)
        frames = sum(len(f) for w in engine.workers.values() for f in w.out)
        out.put(payloads + frames)

    # (post() runs after every call submitted before it has been queued; _later() then
    # runs in the next turn)
    engine.post(lambda: engine._later(0.0, count))
    return out.get(timeout=T)


def test_waiting_calls_hold_one_pickle_ahead(make_executor, tmp_path):
    """50 calls waiting with the same 1 MiB argument hold that one object and the pickle of
    the call that starts next, not 50 pickles."""
    exe = make_executor(max_workers=1)
    d = str(tmp_path)
    gate = exe.submit(tf.gate, d, "g")
    wait_until(lambda: tf.started(d, "g"), timeout=T)
    big = bytearray(MiB)
    futures = [exe.submit(tf.size_of, big) for _ in range(50)]
    assert MiB <= _held_bytes(exe) < 2 * MiB
    tf.release(d, "g")
    gate.result(timeout=T)
    assert [f.result(timeout=T) for f in futures] == [MiB] * 50


def test_an_unpicklable_argument_fails_its_call_when_it_starts(make_executor):
    exe = make_executor(max_workers=1)
    bad = exe.submit(tf.identity, threading.Lock())
    good = exe.submit(tf.inc, 1)
    with pytest.raises(TypeError, match="argument 0"):
        bad.result(timeout=T)
    assert good.result(timeout=T) == 2


def test_an_unpicklable_call_next_in_line_fails_before_its_turn(make_executor, tmp_path):
    """The call next in line is pickled ahead, while the slot is still busy: one that cannot
    be pickled fails then, and the calls behind it go on."""
    exe = make_executor(max_workers=1)
    d = str(tmp_path)
    gate = exe.submit(tf.gate, d, "g")
    wait_until(lambda: tf.started(d, "g"), timeout=T)
    bad = exe.submit(tf.identity, threading.Lock())
    good = exe.submit(tf.inc, 1)
    assert isinstance(bad.exception(timeout=T), TypeError)
    assert "argument 0" in str(bad.exception()) and not gate.done()
    tf.release(d, "g")
    gate.result(timeout=T)
    assert good.result(timeout=T) == 2


def test_shutdown_waiting_from_a_done_callback_raises(make_executor, tmp_path):
    """Done-callbacks run on the engine thread: shutdown(wait=True) there would wait for
    itself. It raises RuntimeError at once (as ProcessPoolExecutor does); wait=False works."""
    exe = make_executor(max_workers=1)
    d = str(tmp_path)
    outcome: queue.Queue[object] = queue.Queue()

    def callback(_):
        try:
            exe.shutdown(wait=True)
        except RuntimeError as err:
            outcome.put(err)
        else:
            outcome.put(None)
        exe.shutdown(wait=False)
        outcome.put("returned")

    fut = exe.submit(tf.gate, d, "g")
    wait_until(lambda: tf.started(d, "g"), timeout=T)
    fut.add_done_callback(callback)  # not done yet: it runs where the future completes
    tf.release(d, "g")
    err = outcome.get(timeout=T)
    assert isinstance(err, RuntimeError) and "done-callback" in str(err)
    assert outcome.get(timeout=T) == "returned"
    with pytest.raises(RuntimeError, match="after shutdown"):
        exe.submit(tf.inc, 1)
    exe._engine._stopped.wait(T)
    assert exe._engine._stopped.is_set()
