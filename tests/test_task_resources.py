"""resource_dict keys as SingleNodeExecutor honours or rejects them."""

from __future__ import annotations

import copy
import os

import pytest
import taskfuncs as tf
from conftest import wait_until

from executorkit import SingleNodeExecutor
from executorkit.engine import THREAD_VARIABLES
from executorkit.errors import ResourceError, TaskTimeoutError

T = 60


def test_env_and_cwd(make_executor, tmp_path):
    exe = make_executor(max_workers=1)
    where = tmp_path / "new" / "dir"
    res = {"env": {"EK_TEST": "yes"}, "cwd": str(where)}
    assert exe.submit(tf.env, "EK_TEST", resource_dict=res).result(timeout=T) == {"EK_TEST": "yes"}
    assert exe.submit(tf.cwd, resource_dict=res).result(timeout=T) == str(where)
    assert where.is_dir()
    assert "EK_TEST" not in exe.submit(tf.env, "EK_TEST").result(timeout=T) or \
        exe.submit(tf.env, "EK_TEST").result(timeout=T)["EK_TEST"] is None


def test_threads_per_core_sets_thread_variables_and_reserves_cpus(tmp_path):
    with SingleNodeExecutor(max_cores=2) as exe:
        seen = exe.submit(tf.env, *THREAD_VARIABLES,
                          resource_dict={"threads_per_core": 2}).result(timeout=T)
        assert set(seen.values()) == {"2"}
        default = exe.submit(tf.env, "OMP_NUM_THREADS").result(timeout=T)
        assert default == {"OMP_NUM_THREADS": "1"}
        if len(os.sched_getaffinity(0)) >= 2:
            cpus = exe.submit(tf.affinity, resource_dict={"threads_per_core": 2})
            assert len(cpus.result(timeout=T)) == 2
        # 2 threads occupy the whole pool: a second such call waits for the first
        first = exe.submit(tf.gate, str(tmp_path), "t1", resource_dict={"threads_per_core": 2})
        wait_until(lambda: tf.started(str(tmp_path), "t1"))
        second = exe.submit(tf.mark, str(tmp_path / "m"), "second", 1)
        assert not second.done()
        assert tf.runs(str(tmp_path / "m")) == 0
        tf.release(str(tmp_path), "t1")
        assert second.result(timeout=T) == 1
        first.result(timeout=T)


def test_tasks_are_pinned_to_distinct_cpus(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to observe pinning")
    with SingleNodeExecutor(max_cores=2) as exe:
        a = exe.submit(tf.affinity)
        b = exe.submit(tf.affinity)
        assert len(a.result(timeout=T)) == 1 and len(b.result(timeout=T)) == 1


def test_gpus_are_distinct_among_running_tasks(tmp_path):
    with SingleNodeExecutor(max_cores=4, max_gpus=4) as exe:
        res = {"gpus_per_core": 2}
        g1 = exe.submit(tf.gate, str(tmp_path), "g1", resource_dict=res)
        g2 = exe.submit(tf.gate, str(tmp_path), "g2", resource_dict=res)
        wait_until(lambda: tf.started(str(tmp_path), "g1") and tf.started(str(tmp_path), "g2"))
        seen = [exe.submit(tf.env, "CUDA_VISIBLE_DEVICES", resource_dict=res)]
        # the pool (4 GPUs) is taken by g1 and g2, so the probe waits
        assert not seen[0].done()
        tf.release(str(tmp_path), "g1")
        tf.release(str(tmp_path), "g2")
        g1.result(timeout=T)
        g2.result(timeout=T)
        ids = seen[0].result(timeout=T)["CUDA_VISIBLE_DEVICES"].split(",")
        assert len(ids) == 2 and set(ids) <= {"0", "1", "2", "3"}
        # two concurrent holders never share: probe them while both run
        both = [exe.submit(tf.env, "CUDA_VISIBLE_DEVICES", "EXECUTORKIT_GPUS",
                           resource_dict=res) for _ in range(2)]
        vis = [set(f.result(timeout=T)["CUDA_VISIBLE_DEVICES"].split(",")) for f in both]
        assert all(len(v) == 2 for v in vis)
        no_gpu = exe.submit(tf.env, "CUDA_VISIBLE_DEVICES").result(timeout=T)
        assert no_gpu == {"CUDA_VISIBLE_DEVICES": ""}  # a task without GPUs sees none


def test_concurrent_gpu_tasks_get_disjoint_ids(tmp_path):
    with SingleNodeExecutor(max_cores=2, max_gpus=[4, 5, 6, 7]) as exe:
        futs = [exe.submit(tf.gate_env, str(tmp_path), f"h{i}", "CUDA_VISIBLE_DEVICES",
                           resource_dict={"gpus_per_core": 2}) for i in range(2)]
        # both run at the same time, each holding its GPUs
        wait_until(lambda: all(tf.started(str(tmp_path), f"h{i}") for i in range(2)))
        seen = [set((tmp_path / f"h{i}.env").read_text().split(",")) for i in range(2)]
        assert seen[0].isdisjoint(seen[1])
        assert seen[0] | seen[1] == {"4", "5", "6", "7"}
        for i in range(2):
            tf.release(str(tmp_path), f"h{i}")
        for f in futs:
            f.result(timeout=T)


def test_run_time_max_stops_the_task(make_executor):
    exe = make_executor(max_workers=1)
    fut = exe.submit(tf.sleep_forever, resource_dict={"run_time_max": 0.5})
    with pytest.raises(TaskTimeoutError, match="run_time_max") as info:
        fut.result(timeout=T)
    assert isinstance(info.value, TimeoutError)
    assert exe.submit(tf.inc, 1).result(timeout=T) == 2


def test_priority_orders_waiting_tasks(make_executor, tmp_path):
    exe = make_executor(max_workers=1)
    log = str(tmp_path / "order.txt")
    blocker = exe.submit(tf.gate, str(tmp_path), "p", 0)
    wait_until(lambda: tf.started(str(tmp_path), "p"))
    futs = [exe.submit(tf.append_line, log, name, resource_dict={"priority": prio})
            for name, prio in [("low", -1), ("mid", 0), ("high", 5), ("mid2", 0)]]
    # all four queued before the slot frees (a submit still on its way to the engine
    # thread would not compete for it yet)
    wait_until(lambda: exe._engine.sched.waiting == 4)
    tf.release(str(tmp_path), "p")
    blocker.result(timeout=T)
    for f in futs:
        f.result(timeout=T)
    with open(log) as fh:
        assert fh.read().split() == ["high", "mid", "mid2", "low"]


def test_error_log_file_gets_every_failure(make_executor, tmp_path):
    exe = make_executor(max_workers=2)
    path = tmp_path / "logs" / "errors.txt"
    futs = [exe.submit(tf.fail, f"failure-{i}", resource_dict={"error_log_file": str(path)})
            for i in range(6)]
    for f in futs:
        with pytest.raises(ValueError):
            f.result(timeout=T)
    text = path.read_text()
    assert text.count("=== ") == 6
    for i in range(6):
        assert f"failure-{i}" in text
    assert "in fail" in text  # the worker's traceback is in the log


def test_exclusive_runs_alone(tmp_path):
    with SingleNodeExecutor(max_cores=2) as exe:
        other = exe.submit(tf.gate, str(tmp_path), "o")
        wait_until(lambda: tf.started(str(tmp_path), "o"))
        excl = exe.submit(tf.affinity, resource_dict={"exclusive": True})
        assert not excl.done()
        tf.release(str(tmp_path), "o")
        other.result(timeout=T)
        cpus = excl.result(timeout=T)
        if len(os.sched_getaffinity(0)) >= 2:
            assert len(cpus) == 2


@pytest.mark.parametrize("resource_dict, key", [
    ({"cores": 0}, "cores"),
    ({"cores": "2"}, "cores"),
    ({"cores": True}, "cores"),
    ({"threads_per_core": -1}, "threads_per_core"),
    ({"gpus_per_core": 1}, "gpus_per_core"),  # no GPU pool declared
    ({"num_nodes": 2}, "num_nodes"),
    ({"slurm_cmd_args": ["--mem=1G"]}, "slurm_cmd_args"),
    ({"cores": 3}, "cores"),  # more ranks than the pool has CPUs
    ({"threads_per_core": 64}, "cores"),  # larger than the pool
    ({"run_time_max": 0}, "run_time_max"),
    ({"env": {"A": 1}}, "env"),
    ({"colour": "blue"}, "colour"),
    ({"cache_key": "../escape"}, "cache_key"),
])
def test_bad_resource_dicts_fail_at_submit(make_executor, resource_dict, key):
    exe = make_executor(max_cores=2)
    with pytest.raises(ResourceError) as info:
        exe.submit(tf.inc, 1, resource_dict=resource_dict)
    assert info.value.key == key
    assert key in str(info.value)


def test_block_workers_reject_larger_calls_and_exclusive():
    with SingleNodeExecutor(max_workers=2, block_allocation=True) as exe:
        with pytest.raises(ResourceError, match="one worker"):
            exe.submit(tf.inc, 1, resource_dict={"threads_per_core": 2})
        with pytest.raises(ResourceError, match="exclusive"):
            exe.submit(tf.inc, 1, resource_dict={"exclusive": True})


def test_user_dicts_are_never_mutated(make_executor, tmp_path):
    defaults = {"env": {"A": "1"}, "priority": 1}
    per_call = {"env": {"B": "2"}, "cwd": str(tmp_path)}
    snap_d, snap_c = copy.deepcopy(defaults), copy.deepcopy(per_call)
    exe = make_executor(max_workers=1, resource_dict=defaults)
    out = exe.submit(tf.env, "A", "B", resource_dict=per_call).result(timeout=T)
    assert out == {"A": None, "B": "2"}  # per-call env replaces the default env key
    assert defaults == snap_d and per_call == snap_c


def test_executor_level_defaults_apply(make_executor):
    exe = make_executor(max_workers=1, resource_dict={"env": {"LEVEL": "executor"}})
    assert exe.submit(tf.env, "LEVEL").result(timeout=T) == {"LEVEL": "executor"}


def test_bad_executor_parameters():
    with pytest.raises(ResourceError, match="max_workers"):
        SingleNodeExecutor(max_workers=0)
    with pytest.raises(ResourceError, match="max_cores"):
        SingleNodeExecutor(max_cores=-2)
    with pytest.raises(ResourceError, match="restart_limit"):
        SingleNodeExecutor(restart_limit=-1)
    with pytest.raises(ResourceError, match="max_gpus"):
        SingleNodeExecutor(max_gpus=[1, 1])
    with pytest.raises(ResourceError, match="unknown resource_dict key"):
        SingleNodeExecutor(resource_dict={"bogus": 1})


def test_gpus_are_detected_from_the_vendor_tool(tmp_path, monkeypatch):
    """Without a declared pool or visibility variable, nvidia-smi's list is the pool."""
    from executorkit.executors._base import gpu_pool

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: A100 (UUID: GPU-1)'\n"
                    "echo 'GPU 1: A100 (UUID: GPU-2)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for var in ("EXECUTORKIT_GPUS", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    assert gpu_pool(None) == (0, 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert gpu_pool(None) == (3,)  # what this process was given wins


def test_run_time_max_of_30_days_keeps_the_executor_working(make_executor):
    """A timer longer than epoll's ~24.8-day limit must not crash the engine's loop."""
    exe = make_executor(max_workers=1)
    month = {"run_time_max": 30 * 86400}
    assert exe.submit(tf.inc, 1, resource_dict=month).result(timeout=T) == 2
    assert exe.submit(tf.inc, 2).result(timeout=T) == 3


def test_env_with_a_nul_byte_is_rejected_at_submit(make_executor):
    exe = make_executor(max_workers=1)
    with pytest.raises(ResourceError, match=r"'BAD'.*NUL") as info:
        exe.submit(tf.inc, 1, resource_dict={"env": {"BAD": "a\0b"}})
    assert info.value.key == "env"
    assert exe.submit(tf.inc, 2).result(timeout=T) == 3
