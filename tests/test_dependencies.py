"""Futures as arguments: discovery anywhere in the arguments, resolution, failure."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import threading

import pytest
import taskfuncs as tf
from conftest import new_executor

from executorkit import SingleNodeExecutor
from executorkit.errors import DependencyError

T = 60


@dataclasses.dataclass
class Box:
    value: object
    label: str = "box"


@dataclasses.dataclass(frozen=True)
class FrozenBox:
    value: object


def unbox(b, fb, pair, mapping, group):
    return (b.value, fb.value, pair, mapping, sorted(group))


def test_chain_and_fan_in(make_executor):
    exe = make_executor(max_workers=2)
    fut = exe.submit(tf.inc, 0)
    for _ in range(20):
        fut = exe.submit(tf.inc, fut)
    assert fut.result(timeout=T) == 21
    parts = [exe.submit(tf.inc, i) for i in range(5)]
    assert exe.submit(tf.add, *parts).result(timeout=T) == 15


def test_futures_nested_anywhere(make_executor):
    exe = make_executor(max_workers=2)
    a, b, c, d, e = (exe.submit(tf.inc, i) for i in range(5))
    out = exe.submit(unbox, Box(a), FrozenBox(b), (c, [d]), {"k": {"deep": e}}, {a, b})
    assert out.result(timeout=T) == (1, 2, (3, [4]), {"k": {"deep": 5}}, [1, 2])


def test_failed_upstream_fails_dependents_with_cause(make_executor):
    exe = make_executor(max_workers=2)
    bad = exe.submit(tf.fail, "root cause")
    child = exe.submit(tf.inc, bad)
    grandchild = exe.submit(tf.add, child, 1)
    with pytest.raises(DependencyError) as info:
        child.result(timeout=T)
    assert isinstance(info.value.__cause__, ValueError)
    assert "root cause" in str(info.value.__cause__)
    assert "fail" in str(info.value)
    with pytest.raises(DependencyError) as info2:
        grandchild.result(timeout=T)
    # the root failure, named once: not the chain of messages
    assert info2.value.__cause__ is info.value.__cause__
    assert str(info2.value).count("root cause") == 1 and "task 1 (fail)" in str(info2.value)
    assert exe.submit(tf.inc, 1).result(timeout=T) == 2  # the machinery still works


def test_long_failing_chain_does_not_recurse(make_executor):
    exe = make_executor(max_workers=1)
    gate = cf.Future()
    fut = exe.submit(tf.inc, gate)
    futs = [fut]
    for _ in range(3000):
        fut = exe.submit(tf.inc, fut)
        futs.append(fut)
    gate.set_exception(KeyError("upstream"))
    for f in futs:
        with pytest.raises(DependencyError):
            f.result(timeout=T)


def test_cancelled_upstream_fails_dependents_and_nothing_hangs(make_executor, tmp_path):
    exe = make_executor(max_workers=1)
    blocker = exe.submit(tf.gate, str(tmp_path), "b", 0)
    waiting = exe.submit(tf.inc, 1)  # queued behind the blocker
    dependent = exe.submit(tf.inc, waiting)
    later = exe.submit(tf.inc, 10)
    assert waiting.cancel()
    with pytest.raises(DependencyError) as info:
        dependent.result(timeout=T)
    assert isinstance(info.value.__cause__, cf.CancelledError)
    tf.release(str(tmp_path), "b")
    assert blocker.result(timeout=T) == 0
    assert later.result(timeout=T) == 11
    assert exe.submit(tf.inc, 20).result(timeout=T) == 21


def test_futures_of_other_executors(make_executor):
    exe = make_executor(max_workers=2)
    bare = cf.Future()
    with cf.ThreadPoolExecutor(1) as pool:
        threaded = pool.submit(lambda: 40)
        fut = exe.submit(tf.add, bare, threaded)
        threading.Timer(0.0, bare.set_result, (2,)).start()
        assert fut.result(timeout=T) == 42


def test_foreign_failure_and_cancel(make_executor):
    exe = make_executor(max_workers=1)
    failed, cancelled = cf.Future(), cf.Future()
    f1 = exe.submit(tf.inc, failed)
    f2 = exe.submit(tf.inc, cancelled)
    failed.set_exception(OSError("disk"))
    cancelled.cancel()
    with pytest.raises(DependencyError) as i1:
        f1.result(timeout=T)
    assert isinstance(i1.value.__cause__, OSError)
    with pytest.raises(DependencyError) as i2:
        f2.result(timeout=T)
    assert isinstance(i2.value.__cause__, cf.CancelledError)


def test_disable_dependencies_rejects_future_arguments():
    with SingleNodeExecutor(max_workers=1, disable_dependencies=True) as exe:
        done = exe.submit(tf.inc, 1)
        with pytest.raises(ValueError, match="disable_dependencies"):
            exe.submit(tf.inc, done)
        with pytest.raises(ValueError, match="disable_dependencies"):
            exe.submit(tf.identity, [done])
        assert done.result(timeout=T) == 2


def test_shutdown_cancel_futures_cancels_dependency_waiters(tmp_path, mode):
    exe = new_executor(mode, max_workers=1)
    running = exe.submit(tf.gate, str(tmp_path), "r", 1)
    tf_started = lambda: tf.started(str(tmp_path), "r")  # noqa: E731
    from conftest import wait_until

    wait_until(tf_started)
    queued = exe.submit(tf.inc, 1)
    waiting = exe.submit(tf.inc, running)
    foreign = cf.Future()
    waiting_foreign = exe.submit(tf.inc, foreign)
    # The running call may end only once shutdown has cancelled the queued one (a release
    # racing the shutdown let it start first, once in a Flux run); the backstop turns a
    # queued call that is never cancelled into a failure instead of a hang.
    release = threading.Timer(T, tf.release, (str(tmp_path), "r"))
    release.start()
    queued.add_done_callback(lambda _: tf.release(str(tmp_path), "r"))
    exe.shutdown(wait=True, cancel_futures=True)
    release.cancel()
    assert queued.cancelled()
    assert waiting.cancelled()
    assert waiting_foreign.cancelled()
    assert running.result(timeout=T) == 1


def test_batched_futures_feed_later_submits(make_executor):
    exe = make_executor(max_workers=2)
    parts = [exe.submit(tf.inc, i) for i in range(7)]
    batches = exe.batched(parts, 3)
    assert len(batches) == 3
    sums = [exe.submit(sum, b) for b in batches]  # a batch future is a dependency
    assert sorted(len(b.result(timeout=T)) for b in batches) == [1, 3, 3]
    assert sum(s.result(timeout=T) for s in sums) == sum(range(1, 8))
