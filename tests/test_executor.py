"""Core behaviour of SingleNodeExecutor, in per-task and block-allocation mode."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time

import pytest
import taskfuncs as tf
from conftest import new_executor

from executorkit import SingleNodeExecutor
from executorkit.errors import (
    ExecutorBrokenError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    WorkerDiedError,
)

T = 60  # timeout for every result()


def test_submit_map_and_stdlib_interop(make_executor):
    exe = make_executor(max_workers=2)
    fut = exe.submit(tf.add, 1, 2, 3)
    assert isinstance(fut, cf.Future)
    assert fut.result(timeout=T) == 6
    assert list(exe.map(tf.inc, range(10), timeout=T)) == list(range(1, 11))
    futs = [exe.submit(tf.inc, i) for i in range(5)]
    _, not_done = cf.wait(futs, timeout=T)
    assert not not_done
    assert sorted(f.result() for f in cf.as_completed(futs, timeout=T)) == [1, 2, 3, 4, 5]

    async def gather():
        return await asyncio.gather(*(asyncio.wrap_future(exe.submit(tf.inc, i))
                                      for i in range(3)))

    assert asyncio.run(asyncio.wait_for(gather(), T)) == [1, 2, 3]


def test_keyword_arguments_and_closures(make_executor):
    exe = make_executor(max_workers=1)
    offset = 10

    def shifted(x, *, by):
        return x + by + offset

    assert exe.submit(shifted, 1, by=2).result(timeout=T) == 13
    assert exe.submit(lambda: "lambda").result(timeout=T) == "lambda"


def test_context_manager_waits_and_refuses_after_shutdown(mode):
    with new_executor(mode, max_workers=2) as exe:
        futs = [exe.submit(tf.inc, i) for i in range(20)]
    assert all(f.done() for f in futs)
    assert [f.result() for f in futs] == list(range(1, 21))
    with pytest.raises(RuntimeError, match="after shutdown"):
        exe.submit(tf.inc, 1)


def test_exception_keeps_type_and_worker_traceback(make_executor):
    exe = make_executor(max_workers=1)
    fut = exe.submit(tf.fail, "nope")
    with pytest.raises(ValueError, match="nope") as info:
        fut.result(timeout=T)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "taskfuncs.py" in cause.tb and "in fail" in cause.tb
    assert 'raise ValueError(message)' in cause.tb  # the source line, not only the frame


def test_exception_classes_defined_in_the_driver_keep_identity(make_executor):
    exe = make_executor(max_workers=1)

    class LocalError(Exception):
        pass

    def raiser():
        raise LocalError("local")

    with pytest.raises(LocalError):
        exe.submit(raiser).result(timeout=T)


@pytest.mark.parametrize("fn, words, exitcode, signum", [
    (tf.exit_now, "exited with code 3", 3, None),
    (tf.kill_self, "SIGKILL", None, 9),
    (tf.segfault, "SIGSEGV", None, 11),
])
def test_dead_process_fails_only_its_task(make_executor, fn, words, exitcode, signum):
    exe = make_executor(max_workers=2)
    args = (3,) if fn is tf.exit_now else ()
    bad = exe.submit(fn, *args)
    good = [exe.submit(tf.inc, i) for i in range(6)]
    with pytest.raises(WorkerDiedError, match=words) as info:
        bad.result(timeout=T)
    assert info.value.exitcode == exitcode
    assert info.value.signal == signum
    assert [f.result(timeout=T) for f in good] == list(range(1, 7))
    assert exe.submit(tf.inc, 41).result(timeout=T) == 42


def test_unpicklable_argument_fails_that_future_only(make_executor):
    exe = make_executor(max_workers=1)
    bad = exe.submit(tf.identity, threading.Lock())
    with pytest.raises(SerializationError, match="argument 0"):
        bad.result(timeout=T)
    assert exe.submit(tf.inc, 1).result(timeout=T) == 2


def test_unpicklable_result(make_executor):
    exe = make_executor(max_workers=1)
    with pytest.raises(SerializationError, match="cannot be pickled") as info:
        exe.submit(tf.return_lock).result(timeout=T)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert exe.submit(tf.inc, 1).result(timeout=T) == 2


def test_unpicklable_exceptions_arrive_as_remote_errors(make_executor):
    exe = make_executor(max_workers=1)
    with pytest.raises(RemoteError, match="UnpicklableError: carries a lock") as info:
        exe.submit(tf.raise_unpicklable).result(timeout=T)
    assert "raise_unpicklable" in info.value.__cause__.tb
    with pytest.raises(RemoteError, match="NeedsTwoArgs"):
        exe.submit(tf.raise_needs_two).result(timeout=T)


def test_non_callable_is_rejected():
    with SingleNodeExecutor(max_workers=1) as exe, pytest.raises(TypeError, match="callable"):
        exe.submit(42)


def test_shutdown_wait_false_returns_while_a_task_runs(tmp_path, mode):
    exe = new_executor(mode, max_workers=1)
    fut = exe.submit(tf.gate, str(tmp_path), "a", 7)
    t0 = time.monotonic()
    exe.shutdown(wait=False)
    assert time.monotonic() - t0 < 5  # would block until the gate opens otherwise
    tf.release(str(tmp_path), "a")
    assert fut.result(timeout=T) == 7
    exe.shutdown(wait=True)


def test_task_output_reaches_the_driver(make_executor, capfd):
    exe = make_executor(max_workers=1)
    assert exe.submit(tf.say, "hello from a worker").result(timeout=T) == 19
    exe.shutdown(wait=True)
    out, _ = capfd.readouterr()
    assert "hello from a worker" in out


def test_nested_executor_uses_the_outer_grant():
    with SingleNodeExecutor(max_workers=2) as exe:
        cores, gpus, results = exe.submit(tf.nested_executor).result(timeout=T)
    assert cores == 1 and gpus == 0
    assert results == [1, 2, 3]


def test_many_tasks_in_both_modes(make_executor):
    exe = make_executor(max_workers=2)
    futs = [exe.submit(tf.inc, i) for i in range(300)]
    assert [f.result(timeout=T) for f in futs] == list(range(1, 301))
    assert exe.info["done"] == 300


def test_restart_limit_exhausted_breaks_the_executor():
    with SingleNodeExecutor(max_workers=1, block_allocation=True, restart_limit=0) as exe:
        with pytest.raises(WorkerDiedError):
            exe.submit(tf.exit_now, 1).result(timeout=T)
        with pytest.raises(ExecutorBrokenError):
            exe.submit(tf.inc, 1).result(timeout=T)


def test_block_worker_is_replaced_after_a_crash():
    with SingleNodeExecutor(max_workers=1, block_allocation=True, restart_limit=2) as exe:
        first = exe.submit(tf.pid).result(timeout=T)
        with pytest.raises(WorkerDiedError):
            exe.submit(tf.kill_self).result(timeout=T)
        second = exe.submit(tf.pid).result(timeout=T)
        assert first != second
        assert exe.submit(tf.pid).result(timeout=T) == second  # persistent again


def test_block_workers_are_persistent():
    with SingleNodeExecutor(max_workers=1, block_allocation=True) as exe:
        pids = {exe.submit(tf.pid).result(timeout=T) for _ in range(5)}
    assert len(pids) == 1


def test_per_task_processes_are_fresh():
    with SingleNodeExecutor(max_workers=1) as exe:
        pids = {exe.submit(tf.pid).result(timeout=T) for _ in range(3)}
    assert len(pids) == 3


def test_init_function_values_injected_by_name():
    def init():
        return {"state": "ready", "counter": 5, "unused": object}

    with SingleNodeExecutor(max_workers=2, block_allocation=True, init_function=init) as exe:
        assert exe.submit(tf.with_state, 1).result(timeout=T) == (1, "ready", 5)
        # explicit arguments win over injected ones
        assert exe.submit(tf.with_state, 2, state="mine").result(timeout=T) == (2, "mine", 5)
        assert exe.submit(tf.inc, 1).result(timeout=T) == 2  # no such parameter: nothing passed


def test_init_function_failure_fails_futures_clearly():
    def init():
        raise RuntimeError("cannot initialise")

    with SingleNodeExecutor(max_workers=1, block_allocation=True, init_function=init) as exe:
        with pytest.raises(ExecutorBrokenError, match="init_function") as info:
            exe.submit(tf.inc, 1).result(timeout=T)
        assert isinstance(info.value.__cause__, RuntimeError)


def test_init_function_needs_block_allocation():
    with pytest.raises(ValueError, match="block_allocation"):
        SingleNodeExecutor(init_function=dict)


def test_garbage_collected_executor_stops_its_processes():
    import gc

    exe = SingleNodeExecutor(max_workers=1)
    assert exe.submit(tf.inc, 1).result(timeout=T) == 2
    engine = exe._engine
    del exe
    gc.collect()
    assert engine._stopped.wait(T)


def test_source_lines_of_driver_only_code_are_filled_in(make_executor):
    """A function from a notebook cell has no file a worker can read; the driver fills
    the traceback's source lines from its own line cache."""
    import linecache

    filename = "<cell-executorkit-test>"
    source = "def cell_function(x):\n    raise KeyError('from a cell ' + str(x))\n"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {}
    exec(compile(source, filename, "exec"), namespace)
    exe = make_executor(max_workers=1)
    with pytest.raises(KeyError) as info:
        exe.submit(namespace["cell_function"], 3).result(timeout=T)
    assert "raise KeyError('from a cell ' + str(x))" in info.value.__cause__.tb


def test_log_obj_size_logs_call_and_result_sizes(make_executor, caplog):
    import logging

    exe = make_executor(max_workers=1, log_obj_size=True)
    with caplog.at_level(logging.INFO, logger="executorkit"):
        assert exe.submit(tf.identity, b"x" * 5000).result(timeout=T) == b"x" * 5000
    text = caplog.text
    assert "arguments" in text and "bytes pickled" in text
    sizes = [int(w) for line in text.splitlines() if "result" in line
             for w in line.split() if w.isdigit()]
    assert any(s >= 5000 for s in sizes)


def test_waiting_burns_no_cpu(make_executor, tmp_path):
    """A driver with a running call and 200 waiting ones sleeps: no busy loop."""
    exe = make_executor(max_workers=1)
    running = exe.submit(tf.gate, str(tmp_path), "idle")
    from conftest import wait_until

    wait_until(lambda: tf.started(str(tmp_path), "idle"))
    waiting = [exe.submit(tf.inc, i) for i in range(200)]
    cpu0, wall0 = time.process_time(), time.monotonic()
    time.sleep(1.0)  # let time pass to measure CPU use (not to order events)
    used = time.process_time() - cpu0
    assert used < 0.25 * (time.monotonic() - wall0), f"driver used {used:.2f} s of CPU"
    tf.release(str(tmp_path), "idle")
    running.result(timeout=T)
    assert [f.result(timeout=T) for f in waiting] == list(range(1, 201))
