"""cancel() of waiting and running tasks."""

from __future__ import annotations

import concurrent.futures as cf

import psutil
import pytest
import taskfuncs as tf
from conftest import wait_until

from executorkit.errors import DependencyError

T = 60


def test_cancel_waiting_task_never_runs(make_executor, tmp_path):
    exe = make_executor(max_workers=1)
    blocker = exe.submit(tf.gate, str(tmp_path), "g", 0)
    queued = exe.submit(tf.mark, str(tmp_path / "runs"), "queued")
    assert queued.cancel()
    assert queued.cancelled()
    tf.release(str(tmp_path), "g")
    assert blocker.result(timeout=T) == 0
    assert exe.submit(tf.inc, 1).result(timeout=T) == 2
    assert tf.runs(str(tmp_path / "runs"), "queued") == 0


def test_cancel_running_task_kills_it_and_frees_resources(make_executor, tmp_path):
    exe = make_executor(max_workers=1)
    running = exe.submit(tf.gate, str(tmp_path), "forever")
    dependent = exe.submit(tf.inc, running)
    wait_until(lambda: tf.started(str(tmp_path), "forever"))
    pid = int((tmp_path / "forever.started").read_text())
    assert running.running()
    assert running.cancel() is True
    assert running.cancelled()
    wait_until(lambda: not psutil.pid_exists(pid) or
               psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    # the only slot is free again
    assert exe.submit(tf.inc, 1).result(timeout=T) == 2
    with pytest.raises(DependencyError) as info:
        dependent.result(timeout=T)
    assert isinstance(info.value.__cause__, cf.CancelledError)


def test_cancel_after_completion_returns_false(make_executor):
    exe = make_executor(max_workers=1)
    fut = exe.submit(tf.inc, 1)
    assert fut.result(timeout=T) == 2
    assert fut.cancel() is False
