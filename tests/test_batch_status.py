"""The status.json of the batch executors (executors._batch_status), without a queue system;
the real Slurm and Flux runs are in test_slurm_cluster.py and test_flux_cluster.py."""

from __future__ import annotations

import json
import os
from concurrent.futures import Future
from types import SimpleNamespace

from conftest import wait_until

from executorkit.cli import main
from executorkit.executors._batch_status import BatchStatus
from executorkit.launchers.queue import JobSeen, parse_squeue
from executorkit.resources import parse


def _job(key, job_id, **res):
    return SimpleNamespace(key=key, job_id=job_id, res=parse(res), future=Future())


def _read(path):
    with open(path) as fh:
        return json.load(fh)


def _deferred(status):
    """Take the writer's deferred writes into the test's hands."""
    pending = []
    status._later = lambda delay, fn: pending.append(fn)
    return pending


def test_jobs_queued_running_and_finished_and_a_closed_file_as_last_known(tmp_path):
    path = str(tmp_path / "status.json")
    status = BatchStatus(path, executor="SlurmClusterExecutor")
    pending = _deferred(status)
    a, b, c = _job("ka", "11", cores=2), _job("kb", "12"), _job("kc", "13", gpus_per_core=1)
    for job, fn in ((a, _job), (b, _read), (c, _deferred)):
        status.queued(job, fn, ())
    assert len(pending) == 1 and not os.path.exists(path)  # one write for many changes
    pending.pop()()
    data = _read(path)
    assert data["format"] == 1 and data["closed"] is False
    assert data["executor"] == "SlurmClusterExecutor"
    assert data["pool"] == {"cpus": 4, "gpus": 1, "asked": True}  # what the calls ask for
    assert data["counts"] == {"done": 0, "failed": 0, "cancelled": 0, "submitted": 3,
                              "running": 0, "waiting": 3}
    assert [(x["function"], x["state"], x["key"], x["job_id"]) for x in data["calls"]] == [
        ("_job", "queued", "ka", "11"), ("_read", "queued", "kb", "12"),
        ("_deferred", "queued", "kc", "13")]
    assert data["busy_now"] == 0 and data["calls"][0]["host"] is None

    status.running(a, started=100.0, host="node1")
    status.running(a, started=100.0, host="node1")  # Slurm says it again: no news
    assert len(pending) == 1
    pending.pop()()
    data = _read(path)
    running = [x for x in data["calls"] if x["state"] == "running"]
    assert [(x["key"], x["started"], x["host"]) for x in running] == [("ka", 100.0, "node1")]
    assert data["busy_now"] == 0.5 and data["counts"]["running"] == 1

    a.future.set_result(1)
    b.future.set_exception(ValueError("boom\nmore lines"))
    pending.pop()()
    data = _read(path)
    assert data["counts"] == {**data["counts"], "done": 1, "failed": 1, "running": 0,
                              "waiting": 1}
    by_key = {x["key"]: x for x in data["calls"]}
    assert by_key["kb"]["error"] == "ValueError: boom" and by_key["kb"]["attempt"] == 1
    assert by_key["ka"]["state"] == "done" and by_key["ka"]["finished"] >= 100.0
    assert data["pool"] == {"cpus": 1, "gpus": 1, "asked": True}
    assert 0 < data["busy_fraction"] < 1  # ka ran part of the time the three asked

    status.close()  # kc's job lives on (shutdown(wait=False)): its state as last known
    data = _read(path)
    assert data["closed"] is True
    assert {x["key"]: x["state"] for x in data["calls"]} == {
        "ka": "done", "kb": "failed", "kc": "queued"}
    c.future.set_result(3)  # after the close nothing is written any more
    for fn in pending:
        fn()
    assert _read(path)["closed"] is True and _read(path)["counts"]["done"] == 1


class _LateCallbacks(Future):
    """A future whose done-callbacks have not run yet (they are only kept)."""

    def __init__(self):
        super().__init__()
        self.late = []

    def add_done_callback(self, fn):
        self.late.append(fn)


def test_a_future_done_before_close_is_counted_even_if_its_callback_is_late(tmp_path):
    path = str(tmp_path / "status.json")
    status = BatchStatus(path, executor="FluxClusterExecutor")
    _deferred(status)
    job = _job("k", "f1")
    job.future = _LateCallbacks()
    status.queued(job, _job, ())
    # As shutdown(wait=True) may see it: the future is done, its callbacks not yet run.
    job.future.set_result(5)
    assert job.future.late
    status.close()
    data = _read(path)
    assert data["calls"][0]["state"] == "done" and data["counts"]["done"] == 1


def test_the_deferred_write_runs_by_itself(tmp_path):
    path = str(tmp_path / "status.json")
    status = BatchStatus(path, executor="FluxClusterExecutor")
    job = _job("k", "f1")
    status.queued(job, _job, ())
    wait_until(lambda: os.path.exists(path) and _read(path)["counts"]["submitted"] == 1)
    job.future.set_result(1)
    wait_until(lambda: _read(path)["counts"]["done"] == 1)
    status.close()
    assert _read(path)["closed"] is True


def test_squeue_lines():
    out = ("7|RUNNING|2026-12-01T20:16:33|node[1-2]|None\n"
           "8|PENDING|2026-12-01T21:00:00||Priority\n"
           "9|PENDING|N/A||DependencyNeverSatisfied\n"
           "10|RUNNING|Unknown|n1|None\n")
    jobs = parse_squeue(out)
    assert jobs["7"].state == "RUNNING" and jobs["7"].nodes == "node[1-2]"
    assert jobs["7"].started is not None
    assert jobs["8"] == JobSeen("PENDING")  # an estimated start is not a start
    assert jobs["9"] == JobSeen("DEPENDENCY_NEVER_SATISFIED")
    assert jobs["10"] == JobSeen("RUNNING", None, "n1")


def test_status_lists_the_calls_a_batch_executor_left_running(tmp_path, capsys):
    path = str(tmp_path / "status.json")
    status = BatchStatus(path, executor="SlurmClusterExecutor")
    pending = _deferred(status)
    job = _job("kq", "4242")
    status.queued(job, _job, ())
    pending.pop()()
    assert main(["status", str(tmp_path)]) == 0  # this process is alive: a live table
    out = capsys.readouterr().out
    assert "calls ask for 1 CPUs" in out and "4242" in out and "queued" in out
    status.close()
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no live executor" in out and "live on" in out and "4242" in out
