"""BatchExecutor's futures under the stdlib's wait()/as_completed(), on an in-memory queue
system (no Slurm or Flux needed): the part every cluster executor shares."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from executorkit.executors._batch import BatchExecutor
from executorkit.resources import Capabilities

T = 30


class FakeQueue(BatchExecutor):
    """Jobs are only recorded: none ever runs, so every future stays pending until the
    test completes or cancels it."""

    _caps = Capabilities("FakeQueue", max_cpus=4, max_gpus=0, max_nodes=1)

    def __init__(self, cache_directory: str) -> None:
        super().__init__(cache_directory=cache_directory, resource_dict=None,
                         disable_dependencies=False, wait=False, compatible={})
        self.submitted: list[str] = []
        self.cancelled: list[str] = []

    def _submit_job(self, job, after_ok):
        self.submitted.append(job.key)
        return str(len(self.submitted))

    def _attach(self, key):
        return None

    def _cancel_jobs(self, job_ids):
        self.cancelled += job_ids

    def _track(self, job):
        pass

    def _not_started(self, job_ids):
        return set(job_ids)


@pytest.fixture
def exe(tmp_path):
    executor = FakeQueue(str(tmp_path))
    yield executor
    executor.shutdown(wait=False)


def test_cancelled_job_is_seen_by_stdlib_wait_and_as_completed(exe):
    fut = exe.submit(abs, -1)
    assert fut.cancel()
    done, not_done = cf.wait([fut], timeout=T)
    assert done == {fut} and not not_done
    assert list(cf.as_completed([fut], timeout=T)) == [fut]
    assert exe.cancelled == ["1"]


def test_cancelled_twin_of_a_queued_call_is_seen_by_wait(exe):
    exe.submit(abs, -2)
    twin = exe.submit(abs, -2)  # the same call: a second handle on the queued job
    assert twin.cancel()
    assert cf.wait([twin], timeout=T)[0] == {twin}


def test_shutdown_cancel_futures_releases_waiters(tmp_path):
    exe = FakeQueue(str(tmp_path))
    futs = [exe.submit(abs, -i) for i in range(1, 4)]
    exe.shutdown(wait=False, cancel_futures=True)
    done, not_done = cf.wait(futs, timeout=T)
    assert not not_done and all(f.cancelled() for f in done)


def test_cancelling_a_call_waiting_for_a_foreign_future_cancels_its_job(exe):
    foreign: cf.Future = cf.Future()
    proxy = exe.submit(abs, foreign)
    foreign.set_result(-3)  # inputs done: the call is submitted as a job now
    assert exe.submitted
    assert proxy.cancel()
    assert cf.wait([proxy], timeout=T)[0] == {proxy}
    assert exe.cancelled == ["1"]  # the job it stood for is cancelled too
