"""Calls queued inside a block-allocation worker (prefetch of tiny calls): they are not
running until they start, they stay cancellable, and they never wait behind a call that
turned out long while another worker is free."""

from __future__ import annotations

import os

import pytest
import taskfuncs
from conftest import wait_until

from executorkit import SingleNodeExecutor
from executorkit.engine import _block
from executorkit.engine._records import SENT


def learn_tiny(exe, directory) -> None:
    """Run released gate calls until the executor knows ``gate`` as a tiny function."""
    os.makedirs(directory, exist_ok=True)
    for round_ in range(200):
        names = [f"warm-{round_}-{i}" for i in range(4)]
        for name in names:
            taskfuncs.release(directory, name)
        fs = [exe.submit(taskfuncs.gate, directory, name, i) for i, name in enumerate(names)]
        assert [f.result(timeout=60) for f in fs] == list(range(4))
        if exe._engine._known_tiny(taskfuncs.gate):
            return
    pytest.skip("the machine is too loaded for a file-system call to take under 2 ms")


@pytest.fixture
def keep_queued(monkeypatch):
    """No give-back of queued calls: they stay queued in the worker (SENT) while the call
    ahead of them blocks."""
    monkeypatch.setattr(_block, "OVERRUN", 0.0)


def engine_turn(exe) -> None:
    """Wait until the engine has handled everything posted so far and sent the resulting
    frames (a deferred call runs after the turn's flush). Cancelling is asynchronous: a
    queued call the worker starts before its Cancel arrives is stopped like a running
    call; the tests make the Cancel arrive first."""
    import threading

    engine = exe._engine
    done = threading.Event()
    engine.post(lambda: engine._later(0.0, done.set))
    assert done.wait(30)


def _state(fut):
    task = fut._task
    return None if task is None else task.state


def running_and_queued(exe, d):
    """Call ``a`` running (blocked on its gate) in the only worker, ``b`` sent behind it."""
    learn_tiny(exe, d)
    a = exe.submit(taskfuncs.gate, d, "a", "A")
    wait_until(lambda: taskfuncs.started(d, "a"))
    b = exe.submit(taskfuncs.gate, d, "b", "B")
    wait_until(lambda: _state(b) == SENT)
    return a, b


def test_queued_call_is_not_running_and_cancel_drops_it(tmp_path, keep_queued):
    d = str(tmp_path)
    with SingleNodeExecutor(max_workers=1, block_allocation=True) as exe:
        learn_tiny(exe, d)
        a = exe.submit(taskfuncs.gate, d, "a", "A")
        wait_until(lambda: taskfuncs.started(d, "a"))
        b = exe.submit(taskfuncs.gate, d, "b", "B")
        wait_until(lambda: _state(b) == SENT)  # sent to the worker, behind a
        assert a.running()
        assert not b.running()
        assert b.cancel()
        engine_turn(exe)
        taskfuncs.release(d, "a")
        assert a.result(timeout=60) == "A"
        wait_until(lambda: exe.info["waiting"] == 0)
        # the worker dropped b before starting it, and is still usable
        assert exe.submit(taskfuncs.identity, 5).result(timeout=60) == 5
    assert b.cancelled()
    assert not taskfuncs.started(d, "b")


def test_queued_call_reports_running_once_it_starts(tmp_path, keep_queued):
    d = str(tmp_path)
    with SingleNodeExecutor(max_workers=1, block_allocation=True) as exe:
        a, b = running_and_queued(exe, d)
        assert not b.running()
        taskfuncs.release(d, "a")
        assert a.result(timeout=60) == "A"
        wait_until(lambda: taskfuncs.started(d, "b"))
        wait_until(b.running)
        taskfuncs.release(d, "b")
        assert b.result(timeout=60) == "B"


def test_shutdown_cancel_futures_cancels_calls_queued_in_workers(tmp_path, keep_queued):
    d = str(tmp_path)
    exe = SingleNodeExecutor(max_workers=1, block_allocation=True)
    try:
        learn_tiny(exe, d)
        a = exe.submit(taskfuncs.gate, d, "a", "A")
        wait_until(lambda: taskfuncs.started(d, "a"))
        queued = [exe.submit(taskfuncs.gate, d, f"q{i}", i) for i in range(3)]
        wait_until(lambda: all(_state(f) == SENT for f in queued))
        exe.shutdown(wait=False, cancel_futures=True)
        engine_turn(exe)  # (the cancelling happens on the engine thread)
        assert all(f.cancelled() for f in queued)
        assert not a.cancelled()
        engine_turn(exe)
        taskfuncs.release(d, "a")
        assert a.result(timeout=60) == "A"
    finally:
        taskfuncs.release(d, "a")
        exe.shutdown(wait=True, cancel_futures=True)
    assert not any(taskfuncs.started(d, f"q{i}") for i in range(3))


def test_call_behind_a_long_call_moves_to_a_free_worker(tmp_path):
    # gate is known tiny (like time.sleep(0)); then one of its calls blocks (like
    # time.sleep(100)). A call queued behind it must not wait for it while the other
    # worker is free.
    d = str(tmp_path)
    with SingleNodeExecutor(max_workers=2, block_allocation=True) as exe:
        try:
            learn_tiny(exe, d)
            a = exe.submit(taskfuncs.gate, d, "a", "A")
            b = exe.submit(taskfuncs.gate, d, "b", "B")
            wait_until(lambda: taskfuncs.started(d, "a") and taskfuncs.started(d, "b"))
            taskfuncs.release(d, "c")
            c = exe.submit(taskfuncs.gate, d, "c", "C")
            taskfuncs.release(d, "b")
            assert b.result(timeout=60) == "B"
            assert c.result(timeout=60) == "C"  # ran while a still blocks
            assert a.running()
        finally:
            taskfuncs.release(d, "a")
        assert a.result(timeout=60) == "A"


def test_cancel_of_a_queued_call_that_has_just_started_stops_it(tmp_path, keep_queued):
    # Whether the engine still sees it queued (its Cancel then meets a call already
    # started) or running, the call is stopped like any cancelled running call.
    d = str(tmp_path)
    with SingleNodeExecutor(max_workers=1, block_allocation=True) as exe:
        a, b = running_and_queued(exe, d)
        taskfuncs.release(d, "a")
        wait_until(lambda: taskfuncs.started(d, "b"))
        assert b.cancel()
        assert a.result(timeout=60) == "A"
        assert exe.submit(taskfuncs.identity, 7).result(timeout=60) == 7  # a new worker
    assert b.cancelled()


def test_a_worker_killed_for_a_call_already_done_fails_no_other_call(tmp_path, keep_queued):
    # The engine kills a worker for a cancelled call that has started, but that call may be
    # done before the kill takes effect: the call running by then (and those behind it) is
    # no more to blame than the rest and runs again, where it used to fail with
    # WorkerDiedError (found by a cancel storm while calls finished). Here the worker is
    # killed "for" b, queued behind a: a is the bystander.
    d = str(tmp_path)
    with SingleNodeExecutor(max_workers=1, block_allocation=True) as exe:
        a, b = running_and_queued(exe, d)
        engine = exe._engine
        worker = b._task.worker
        engine.post(lambda: engine._stop_worker(worker, b._task))
        wait_until(lambda: worker.id not in engine.workers, timeout=60)  # killed, finalized
        for name in ("a", "b"):
            taskfuncs.release(d, name)
        assert a.result(timeout=60) == "A"
        assert b.result(timeout=60) == "B"


def test_calls_waiting_when_their_function_proves_tiny_may_then_queue_in_workers(tmp_path):
    # All calls of a new function are submitted while the only worker is busy, so none is
    # known tiny when it enters the engine's queue. Once the first two have proved tiny,
    # the rest must no longer count as "not known tiny" (which holds every worker to one
    # call at a time): else a first round of thousands runs one call per round trip.
    from executorkit.engine._records import QUEUED

    with SingleNodeExecutor(max_workers=1, block_allocation=True) as exe:
        engine = exe._engine
        blocker = exe.submit(taskfuncs.gate, tmp_path, "blocker", "B")
        futures = [exe.submit(taskfuncs.inc, i) for i in range(100)]
        seen = []
        futures[1].add_done_callback(  # runs on the engine thread, right after the 2nd call
            lambda _: seen.append((engine._slow_active, sum(
                t.state == QUEUED for t in list(engine.tasks.values())))))
        engine_turn(exe)
        assert engine._slow_active == 101  # the blocker and every inc call: none known tiny
        taskfuncs.release(tmp_path, "blocker")
        assert blocker.result(timeout=60) == "B"
        assert [f.result(timeout=60) for f in futures] == list(range(1, 101))
    slow_active, queued = seen[0]
    assert queued > 0  # calls were still waiting in the engine's queue then...
    assert slow_active == 0  # ...and none of them held the workers to one call any more


def test_large_calls_are_not_queued_in_workers(tmp_path):
    # A worker's queue holds about QUEUE_BYTES of pickled calls: tiny calls with small
    # arguments queue deeply, calls as large as that run one per worker (the driver holds
    # every queued call's bytes until the worker has read them).
    with SingleNodeExecutor(max_workers=2, block_allocation=True) as exe:
        engine = exe._engine
        small = [exe.submit(len, b"x" * 100) for _ in range(20)]
        assert [f.result(timeout=60) for f in small] == [100] * 20
        engine_turn(exe)
        assert engine.sched.max_running > 2 * 2  # several tiny calls per worker
        big = bytes(_block.QUEUE_BYTES + 1)
        large = [exe.submit(len, big) for _ in range(3)]
        assert [f.result(timeout=60) for f in large] == [len(big)] * 3
        engine_turn(exe)
        assert engine.sched.max_running == 2  # one call per worker
