"""What the status.json of a cluster executor shows, the same on Slurm and Flux (used by
test_slurm_cluster.py and test_flux_cluster.py; the unit tests are test_batch_status.py)."""

from __future__ import annotations

import json
import os

import taskfuncs as tf
from conftest import wait_until

from executorkit.cli import main

T = 180


def read(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def _running(path, function):
    data = read(path)
    return data is not None and any(c["state"] == "running" and c["function"] == function
                                    for c in data["calls"])


def follows_the_jobs(exe, cache, gates, capsys, *, host_while_running):
    """Done and failed calls, a running one, ``executorkit status`` live, then closed."""
    path = os.path.join(cache, "status.json")
    ok, bad = exe.submit(tf.inc, 1), exe.submit(tf.fail, "boom\nmore")
    assert ok.result(timeout=T) == 2
    assert bad.exception(timeout=T) is not None
    gated = exe.submit(tf.gate, gates, "s")
    wait_until(lambda: tf.started(gates, "s"), timeout=T)
    wait_until(lambda: _running(path, "gate"), timeout=T)
    live = read(path)
    assert main(["status", cache]) == 0
    table = capsys.readouterr().out
    tf.release(gates, "s")
    gated.result(timeout=T)
    exe.shutdown(wait=True)

    assert live["closed"] is False and live["executor"] == type(exe).__name__
    assert live["counts"] == {**live["counts"], "done": 1, "failed": 1, "running": 1,
                              "submitted": 3}
    assert live["pool"] == {"cpus": 1, "gpus": 0, "asked": True} and live["busy_now"] == 1
    calls = {c["function"]: c for c in live["calls"]}
    assert calls["gate"]["job_id"] == gated._job.job_id and calls["gate"]["started"]
    assert bool(calls["gate"]["host"]) == host_while_running  # null where not known
    assert calls["fail"]["state"] == "failed" and calls["fail"]["error"] == "ValueError: boom"
    assert calls["inc"]["state"] == "done" and calls["inc"]["host"]  # the entry says where
    assert calls["inc"]["finished"] >= calls["inc"]["started"]
    assert "gate" in table and "running" in table and gated._job.job_id in table
    assert "ValueError: boom" in table

    final = read(path)
    assert final["closed"] is True
    assert final["counts"] == {**final["counts"], "done": 2, "failed": 1, "running": 0,
                               "waiting": 0}
    assert sorted(c["state"] for c in final["calls"]) == ["done", "done", "failed"]
    assert main(["status", cache]) == 0
    out = capsys.readouterr().out
    assert "no live executor" in out and "2 done, 1 failed" in out and "live on" not in out


def left_running(exe, cache, gates, capsys):
    """shutdown(wait=False): the file says closed, the job as last known, and it lives on."""
    path = os.path.join(cache, "status.json")
    fut = exe.submit(tf.gate, gates, "w")
    wait_until(lambda: tf.started(gates, "w"), timeout=T)
    wait_until(lambda: _running(path, "gate"), timeout=T)
    exe.shutdown(wait=False)
    closed = read(path)
    assert closed["closed"] is True and closed["counts"]["running"] == 1
    assert [c["state"] for c in closed["calls"]] == ["running"]
    assert main(["status", cache]) == 0
    out = capsys.readouterr().out
    assert "live on" in out and "gate" in out and fut._job.job_id in out
    tf.release(gates, "w")
    fut.result(timeout=T)  # the job went on without the executor
    assert read(path) == closed  # nothing is written after the close
