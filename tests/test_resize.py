"""``exe.max_workers = n`` while the executor runs (executorlib's resizing, issue 11 point 4).

Concurrency is proven with a barrier (:func:`resize_funcs.meet`): calls only get past it when
they run at the same time. Worker processes are counted with psutil.
"""

from __future__ import annotations

import psutil
import pytest
import resize_funcs as rf
import taskfuncs as tf
from conftest import wait_until

from executorkit import SingleNodeExecutor, SlurmClusterExecutor
from executorkit.errors import ResourceError

T = 90  # seconds: every result() has a timeout


def worker_pids() -> set[int]:
    """Processes forked by the executors' fork servers (the test's direct children)."""
    me = psutil.Process()
    servers = {p.pid for p in me.children()}
    pids = set()
    for proc in me.children(recursive=True):
        try:
            if proc.pid not in servers and proc.status() != psutil.STATUS_ZOMBIE:
                pids.add(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def test_growing_a_block_pool_starts_initialised_workers_for_waiting_calls(tmp_path):
    barrier = str(tmp_path / "barrier")
    with SingleNodeExecutor(max_workers=1, block_allocation=True,
                            init_function=rf.init_tag) as exe:
        first = exe.submit(rf.meet, barrier, 2)
        second = exe.submit(rf.meet, barrier, 2)  # waits: the only worker is in the barrier
        wait_until(lambda: rf.arrived(barrier) == 1)
        assert len(worker_pids()) == 1 and not second.done()
        exe.max_workers = 2
        assert exe.max_workers == 2 and exe.max_cores == 2 and len(exe) == 2
        results = [first.result(timeout=T), second.result(timeout=T)]
        assert {tag for _, tag, _ in results} == {"initialised"}  # init_function ran in both
        assert len({pid for pid, _, _ in results}) == 2
        assert len(worker_pids()) == 2


def test_shrinking_a_block_pool_lets_running_calls_finish_and_retires_a_worker(tmp_path):
    gates = str(tmp_path / "gates")
    with SingleNodeExecutor(max_workers=2, block_allocation=True) as exe:
        running = [exe.submit(tf.gate, gates, f"g{i}", i) for i in range(2)]
        queued = [exe.submit(tf.pid) for _ in range(3)]
        wait_until(lambda: tf.started(gates, "g0") and tf.started(gates, "g1"))
        assert len(worker_pids()) == 2
        exe.max_workers = 1
        assert exe.max_workers == 1 and exe.max_cores == 1
        tf.release(gates, "g0")
        tf.release(gates, "g1")
        assert [f.result(timeout=T) for f in running] == [0, 1]
        pids = {f.result(timeout=T) for f in queued}
        wait_until(lambda: len(worker_pids()) == 1)
        assert pids == worker_pids()  # the queued calls ran on the worker that stayed
        assert exe.submit(tf.inc, 1).result(timeout=T) == 2


def gate_pid(directory, name) -> int:
    with open(f"{directory}/{name}.started") as fh:
        return int(fh.read())


def test_shrink_then_grow_again_before_the_retired_worker_is_done(tmp_path):
    gates = str(tmp_path / "gates")
    with SingleNodeExecutor(max_workers=2, block_allocation=True) as exe:
        held = [exe.submit(tf.gate, gates, f"g{i}", i) for i in range(2)]
        wait_until(lambda: tf.started(gates, "g0") and tf.started(gates, "g1"))
        kept, retired = gate_pid(gates, "g0"), gate_pid(gates, "g1")
        exe.max_workers = 1
        exe.max_workers = 2  # a new worker takes slot 1; the retired one still runs g1
        later = exe.submit(tf.pid)  # waits: two calls run already
        tf.release(gates, "g1")
        new = later.result(timeout=T)
        assert new not in {kept, retired}
        wait_until(lambda: worker_pids() == {kept, new})  # the retired worker stopped
        tf.release(gates, "g0")
        assert [f.result(timeout=T) for f in held] == [0, 1]


@pytest.mark.parametrize("block", [False, True])
def test_bad_sizes_are_refused_and_change_nothing(block):
    with SingleNodeExecutor(max_workers=2, max_cores=2, block_allocation=block) as exe:
        for bad in (0, -1, 1.5, True, None):
            with pytest.raises(ResourceError, match="max_workers must be an int >= 1"):
                exe.max_workers = bad
        with pytest.raises(ResourceError, match="max_cores") as info:
            exe.max_workers = 3
        assert info.value.key == "max_workers" and info.value.allowed == "1..2"
        assert exe.max_workers == 2
        assert exe.submit(tf.inc, 1).result(timeout=T) == 2
    with pytest.raises(RuntimeError, match="after shutdown"):
        exe.max_workers = 1


@pytest.mark.parametrize("fixed_pool", [False, True])
def test_per_task_mode_changes_the_calls_running_at_once(tmp_path, fixed_pool):
    # with max_cores the pool stays and only the limit of calls changes; without, the pool
    # follows max_workers as it did at creation
    barrier = str(tmp_path / "barrier")
    extra = {"max_cores": 2} if fixed_pool else {}
    with SingleNodeExecutor(max_workers=1, **extra) as exe:
        assert exe.max_cores == (2 if fixed_pool else 1)
        first = exe.submit(rf.meet, barrier, 2)
        second = exe.submit(rf.meet, barrier, 2)  # waits: one call at a time
        wait_until(lambda: rf.arrived(barrier) == 1)
        assert not second.done()
        exe.max_workers = 2
        pids = {first.result(timeout=T)[0], second.result(timeout=T)[0]}
        assert len(pids) == 2 and exe.max_workers == 2 and exe.max_cores == 2


def test_per_task_pool_a_waiting_call_would_not_fit_in_is_refused(tmp_path):
    gates = str(tmp_path / "gates")
    with SingleNodeExecutor(max_workers=2) as exe:
        held = exe.submit(tf.gate, gates, "g")
        wait_until(lambda: tf.started(gates, "g"))
        wide = exe.submit(tf.env, "OMP_NUM_THREADS", resource_dict={"threads_per_core": 2})
        with pytest.raises(ResourceError, match="waiting") as info:
            exe.max_workers = 1  # a pool of 1 CPU would strand the 2-CPU call
        assert info.value.key == "max_workers"
        assert exe.max_workers == 2 and exe.max_cores == 2  # nothing changed
        tf.release(gates, "g")
        assert wide.result(timeout=T) == {"OMP_NUM_THREADS": "2"}
        assert held.result(timeout=T) is None


def test_a_backend_that_cannot_resize_says_so(tmp_path):
    exe = SlurmClusterExecutor(cache_directory=str(tmp_path / "cache"))
    try:
        with pytest.raises(NotImplementedError, match="SlurmClusterExecutor"):
            exe.max_workers = 2
    finally:
        exe.shutdown(wait=True)
