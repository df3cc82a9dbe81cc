"""The live status.json (engine._status) and ``executorkit status DIR``."""

from __future__ import annotations

import json
import os

import pytest
import taskfuncs as tf

from executorkit import Command, SingleNodeExecutor
from executorkit.cli import main
from executorkit.engine import _status
from executorkit.engine._records import FINISHED, QUEUED, RUNNING, _Task
from executorkit.errors import ResourceError
from executorkit.resources import parse
from tests.conftest import wait_until

T = 60


def _status_of(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def _running_with_host(path, function):
    data = _status_of(path)
    return data is not None and any(c["state"] == "running" and c["host"]
                                    and c["function"] == function for c in data["calls"])


def test_status_json_follows_the_campaign_live_and_after(tmp_path, capsys):
    cache, gates = str(tmp_path / "cache"), str(tmp_path / "gates")
    path = os.path.join(cache, "status.json")
    with SingleNodeExecutor(max_workers=2, cache_directory=cache) as exe:
        first = [exe.submit(tf.inc, i) for i in range(4)] + [exe.submit(tf.fail, "boom\nmore")]
        for f in first:
            f.exception(timeout=T)
        gated = exe.submit(tf.gate, gates, "g", resource_dict={"priority": 1})
        wait_until(lambda: tf.started(gates, "g"))
        wait_until(lambda: _running_with_host(path, "gate"))
        live = _status_of(path)
        assert main(["status", cache]) == 0
        table = capsys.readouterr().out
        tf.release(gates, "g")
        gated.result(timeout=T)
    assert live["closed"] is False and live["pool"] == {"cpus": 2, "gpus": 0}
    assert live["counts"]["running"] == 1 and live["counts"]["done"] == 4
    running = [c for c in live["calls"] if c["state"] == "running"]
    assert [c["function"] for c in running] == ["gate"]
    assert running[0]["resources"]["priority"] == 1 and running[0]["attempt"] == 1
    assert running[0]["started"] > live["started"] - 1
    assert 0 < live["busy_now"] <= 1 and 0 < live["busy_fraction"] <= 1
    assert "running" in table and "gate" in table and "ValueError: boom" in table
    final = _status_of(path)
    assert final["closed"] is True
    assert final["counts"] == {**final["counts"], "done": 5, "failed": 1, "running": 0}
    states = sorted(c["state"] for c in final["calls"])
    assert states == ["done"] * 5 + ["failed"]
    failed = next(c for c in final["calls"] if c["state"] == "failed")
    assert failed["error"] == "ValueError: boom" and failed["finished"] >= failed["started"]


def test_without_a_live_executor_status_summarises_the_cache(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    with SingleNodeExecutor(max_workers=1, cache_directory=cache) as exe:
        exe.submit(tf.inc, 1).result(timeout=T)
        exe.submit(tf.fail, "first line\nsecond line").exception(timeout=T)
    assert main(["status", cache]) == 0
    out = capsys.readouterr().out
    assert "no live executor" in out and "2 calls, 1 done, 1 failed" in out
    assert "ValueError: first line" in out and "second line" not in out
    assert "runtime of done calls" in out
    os.remove(os.path.join(cache, "status.json"))  # a cache without any status file
    assert main(["status", cache]) == 0
    assert "1 done, 1 failed" in capsys.readouterr().out


def test_status_of_a_missing_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["status", str(tmp_path), "--watch", "0"]) == 2


def test_status_file_parameter(tmp_path):
    path = tmp_path / "live" / "s.json"
    with SingleNodeExecutor(max_workers=1, status_file=path) as exe:
        exe.submit(tf.inc, 1).result(timeout=T)
        exe.submit(Command(["/bin/echo", "hi", 3])).result(timeout=T)
    data = _status_of(path)
    assert data["counts"]["done"] == 2
    assert [c["function"] for c in data["calls"]] == ["inc", "echo hi 3"]  # a program's line
    with SingleNodeExecutor(max_workers=1, cache_directory=tmp_path / "c",
                            status_file=False) as exe:
        exe.submit(tf.inc, 1).result(timeout=T)
    assert not (tmp_path / "c" / "status.json").exists()
    with pytest.raises(ResourceError, match="status_file"):
        SingleNodeExecutor(status_file=3)
    with pytest.raises(ResourceError, match="cache_directory"):
        SingleNodeExecutor(status_file=True)


class _FakeEngine:
    """What the writer uses of the engine: deferred calls and counts."""

    def __init__(self):
        self.deferred = []

    def _later(self, delay, fn):
        self.deferred.append(fn)

    def counts(self):
        return {"done": 0}

    def post(self, fn, *args):
        fn(*args)

    def dep_done(self, task, fut):
        pass

    def cancelled(self, task):
        pass


def test_writes_are_deferred_batched_and_only_reencode_what_changed(tmp_path, monkeypatch):
    engine = _FakeEngine()
    writer = _status.StatusWriter(str(tmp_path / "s.json"), engine, executor="x", cpus=4,
                                  gpus=0)
    encoded = []
    real = _status._call
    monkeypatch.setattr(_status, "_call", lambda task, fin: encoded.append(task.id) or
                        real(task, fin))
    tasks = [_Task(engine, i, tf.inc, (i,), {}, parse({})) for i in range(100)]
    for task in tasks:
        task.state = QUEUED
        writer.changed(task)
    assert len(engine.deferred) == 1  # one deferred write for any number of changes
    assert not (tmp_path / "s.json").exists()  # nothing written per call
    engine.deferred.pop()()
    assert sorted(encoded) == list(range(100))
    encoded.clear()
    tasks[7].state = RUNNING
    tasks[7].worker = type("W", (), {"host": "node1"})()
    writer.changed(tasks[7])
    engine.deferred.pop()()
    assert encoded == [7]  # O(changed): the 99 others keep their encoded form
    data = _status_of(tmp_path / "s.json")
    assert [c["host"] for c in data["calls"] if c["state"] == "running"] == ["node1"]
    assert data["busy_now"] == 0.25
    tasks[7].state = FINISHED
    tasks[7].future.set_result(1)
    writer.changed(tasks[7])
    writer.close()
    data = _status_of(tmp_path / "s.json")
    assert data["closed"] and data["busy_now"] == 0
    assert [c["state"] for c in data["calls"]].count("done") == 1
    for pending in engine.deferred:  # a write still due after close does not overwrite it
        pending()
    assert _status_of(tmp_path / "s.json")["closed"]
    engine.deferred.clear()
    writer.changed(tasks[8])  # after close: ignored, nothing scheduled
    assert engine.deferred == []
