"""Retries that escalate: the pure policy, then the executor (SingleNode, both modes)."""

from __future__ import annotations

import pytest
import retry_funcs

from executorkit import Command, SingleNodeExecutor, get_cache_data
from executorkit.errors import ResourceError, TaskTimeoutError, WorkerDiedError
from executorkit.resources import Capabilities, parse
from executorkit.retry import escalate, next_attempt


def _res(**kw):
    return parse(kw)


def test_escalate_multiplies_per_attempt_and_rounds_counts_up():
    first = _res(cores=1, threads_per_core=3, run_time_max=10,
                 retry_escalation={"run_time_max": 2, "threads_per_core": 1.5})
    assert escalate(first, 1).run_time_max == 20
    assert escalate(first, 2).run_time_max == 40
    assert escalate(first, 1).threads_per_core == 5  # ceil(4.5)
    assert escalate(first, 2).threads_per_core == 7  # ceil(6.75)


def test_escalation_is_capped_at_what_the_executor_can_grant():
    first = _res(cores=2, retry_escalation={"cores": 4})
    caps = Capabilities("test", max_cpus=4, max_gpus=0)
    assert escalate(first, 1, caps).cores == 4
    assert escalate(first, 3, caps).cores == 4


def test_which_failures_are_retried():
    first = _res(max_retries=2)
    died = WorkerDiedError("killed")
    assert next_attempt(first, [died]).res is not None
    assert next_attempt(first, [died, died]).res is not None
    assert next_attempt(first, [died, died, died]).res is None  # max_retries reached
    assert next_attempt(first, [TaskTimeoutError("slow")]).res is not None
    assert next_attempt(first, [ValueError("bad")]).res is None  # not retried by default
    assert next_attempt(_res(max_retries=1, retry_on=(ValueError,)),
                        [ValueError("bad")]).res is not None
    assert next_attempt(_res(), [died]).res is None  # default: no retries


@pytest.mark.parametrize("bad", [
    {"retry_escalation": {"memory": 2}},
    {"retry_escalation": {"cores": 0.5}},
    {"retry_escalation": [("cores", 2)]},
    {"max_retries": -1},
    {"retry_on": "ValueError"},
])
def test_bad_retry_keys_are_refused(bad):
    key = next(iter(bad))
    with pytest.raises(ResourceError) as info:
        parse(bad)
    assert info.value.key == key


def test_retry_succeeds_only_after_escalation(tmp_path):
    # per-task processes only: block-allocation workers have a fixed size (next tests)
    exe = SingleNodeExecutor(max_cores=2, cache_directory=str(tmp_path / "cache"))
    fut = exe.submit(retry_funcs.die_unless_two_threads, resource_dict={
        "max_retries": 2, "retry_escalation": {"threads_per_core": 2}})
    after = exe.submit(retry_funcs.add_one, exe.submit(len, fut))  # waits for the final outcome
    assert fut.result(timeout=120) == "ok with 2 threads"
    assert after.result(timeout=60) == len("ok with 2 threads") + 1
    exe.shutdown(wait=True)
    frame = get_cache_data(str(tmp_path / "cache"), load_outputs=False)
    attempts = frame[frame.cache_key.str.contains("die_unless")]
    assert sorted(attempts.status) == ["done", "failed"]  # both attempts recorded
    failed = attempts[attempts.status == "failed"].iloc[0]
    assert ".attempt-1" in failed.cache_key and "SIGKILL" in failed.error_text


@pytest.mark.parametrize("key", ["cores", "threads_per_core", "gpus_per_core"])
def test_block_allocation_refuses_escalating_a_worker_size(key):
    escalate = {"max_retries": 1, "retry_escalation": {key: 2}}
    with SingleNodeExecutor(max_workers=1, block_allocation=True, max_gpus=1) as exe:
        with pytest.raises(ResourceError, match="fixed size") as info:
            exe.submit(retry_funcs.add_one, 1, resource_dict=escalate)
        assert info.value.key == "retry_escalation" and key in str(info.value)
    with pytest.raises(ResourceError, match="fixed size"):
        SingleNodeExecutor(block_allocation=True, resource_dict=escalate)


def test_block_allocation_escalates_run_time_max(tmp_path):
    cache = str(tmp_path / "cache")
    with SingleNodeExecutor(max_workers=1, block_allocation=True, cache_directory=cache) as exe:
        fut = exe.submit(retry_funcs.hang_first_time, str(tmp_path / "marker"), resource_dict={
            "run_time_max": 1, "max_retries": 1, "retry_escalation": {"run_time_max": 60}})
        assert fut.result(timeout=120) == "second attempt"
    frame = get_cache_data(cache, load_outputs=False)
    by_status = {row.status: row for row in frame.itertuples()}
    assert set(by_status) == {"done", "failed"}
    assert "run_time_max" in by_status["failed"].error_text
    assert by_status["failed"].resource_dict["run_time_max"] == 1
    assert by_status["done"].resource_dict["run_time_max"] == 60  # the retry got more time


def test_command_killed_by_signal_is_retried_with_more_threads():
    script = 'test "$OMP_NUM_THREADS" = 2 || kill -9 $$; echo fine'
    with SingleNodeExecutor(max_cores=2) as exe:
        fut = exe.submit(Command(["sh", "-c", script]), resource_dict={
            "max_retries": 1, "retry_escalation": {"threads_per_core": 2}})
        assert fut.result(timeout=120).stdout == "fine\n"


def test_retry_on_extends_to_exceptions(make_executor, tmp_path):
    exe = make_executor(max_workers=1)
    fut = exe.submit(retry_funcs.fail_first_time, str(tmp_path / "m1"),
                     resource_dict={"max_retries": 1, "retry_on": (ValueError,)})
    assert fut.result(timeout=60) == "second attempt"
    plain = exe.submit(retry_funcs.fail_first_time, str(tmp_path / "m2"),
                       resource_dict={"max_retries": 1})
    with pytest.raises(ValueError):
        plain.result(timeout=60)


def test_future_fails_after_the_last_attempt_with_every_reason(make_executor):
    exe = make_executor(max_workers=1)
    fut = exe.submit(retry_funcs.always_die, resource_dict={"max_retries": 2})
    with pytest.raises(WorkerDiedError) as info:
        fut.result(timeout=120)
    assert len(info.value.attempts) == 3
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "failed all 3 attempts" in notes and "attempt 3: WorkerDiedError" in notes


def test_an_attempt_the_worker_recorded_is_filed_under_its_own_key(tmp_path):
    # A retried exception: the worker wrote the attempt's record itself (no driver record).
    import os

    from executorkit.cli._status import cache_summary

    cache = str(tmp_path / "cache")
    with SingleNodeExecutor(max_workers=1, cache_directory=cache) as exe:
        fut = exe.submit(retry_funcs.fail_first_time, str(tmp_path / "m"),
                         resource_dict={"max_retries": 1, "retry_on": (ValueError,)})
        assert fut.result(timeout=60) == "second attempt"
    frame = get_cache_data(cache, load_outputs=False)
    assert frame.cache_key.is_unique  # one row per key: the attempt is not a second "key"
    for key, filename in zip(frame.cache_key, frame.filename, strict=True):
        assert os.path.basename(filename) == key + ".h5"
    [failed] = frame[frame.status == "failed"].cache_key
    assert failed.endswith(".attempt-1")
    summary = cache_summary(cache)  # executorkit status: one call, and it succeeded
    assert "1 calls, 1 done, 0 failed; 1 earlier failed attempt(s)" in summary
