"""FluxClusterExecutor against a real Flux broker: every call a batch job (nested instance).

The test command runs these inside ``flux start`` (one broker) and the ``flux_nodes`` ones
inside ``flux start --test-size=4``; elsewhere the broker tests skip with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import batch_status_scenario as status_scenario
import pytest
import taskfuncs as tf
from conftest import wait_until

from executorkit import FluxClusterExecutor, get_cache_data, terminate_tasks_in_cache
from executorkit.errors import DependencyError, ResourceError, TaskTimeoutError
from executorkit.executors._batch import JobFailedError
from executorkit.launchers import flux_batch
from executorkit.launchers.flux_batch import JobEnd, Pool, batch_script, check_shape, pool_of
from executorkit.resources import parse

HERE = os.path.dirname(os.path.abspath(__file__))
T = 120


def _no_broker() -> str | None:
    uri = os.environ.get("FLUX_URI")
    if not uri:
        return "no Flux broker: FLUX_URI is not set (the test command runs these in flux start)"
    try:
        flux = flux_batch.import_flux()
        flux.Flux(uri)
    except Exception as exc:
        return f"no usable Flux broker at {uri}: {exc}"
    return None


NO_BROKER = _no_broker()
needs_broker = pytest.mark.skipif(NO_BROKER is not None, reason=str(NO_BROKER))
broker = [pytest.mark.flux, needs_broker]


# The behaviours the issue names run in both instances of the test command.
ON_BOTH = pytest.mark.parametrize("instance", [
    pytest.param("one broker", marks=pytest.mark.flux),
    pytest.param("four nodes", marks=pytest.mark.flux_nodes)])


@pytest.fixture
def cluster(tmp_path, request):
    """``cluster(**kwargs)`` -> a FluxClusterExecutor on a temporary cache directory; after
    the test its futures are cancelled and it is shut down."""
    made = []
    callspec = getattr(request.node, "callspec", None)
    instance = callspec.params.get("instance") if callspec else None

    def make(**kwargs):
        kwargs.setdefault("cache_directory", str(tmp_path / "cache"))
        exe = FluxClusterExecutor(**kwargs)
        made.append(exe)
        if instance == "four nodes" and exe._pool.nodes < 4:
            pytest.skip(f"needs 4 Flux nodes, the instance has {exe._pool.nodes} "
                        f"(the test command runs this under flux start --test-size=4)")
        return exe

    yield make
    for exe in made:
        for job in list(exe._active.values()):
            job.future.cancel()
        exe.shutdown(wait=True)


def _gated(exe, d: str, name: str, **kwargs):
    """Submit a call that waits for its release file; return once its job runs it."""
    fut = exe.submit(tf.gate, d, name, **kwargs)
    wait_until(lambda: tf.started(d, name), timeout=T)
    return fut


def _job_result(job_id: str) -> str:
    """Flux's result for an inactive job ("" while it is active)."""
    import flux
    import flux.job

    info = flux.job.get_job(flux.Flux(), flux.job.JobID(job_id))
    return info["result"] if info and info["state"] == "INACTIVE" else ""


# ------------------------------------------------------------------ pure parts, no broker
POOL = Pool(nodes=4, cores=8, gpus=0, node_cores=2, node_gpus=0)


def test_pool_of_reads_the_resource_set():
    rset = {"execution": {"R_lite": [{"rank": "0-3", "children": {"core": "0-1"}},
                                     {"rank": "4", "children": {"core": "0-7", "gpu": "0,1"}}]}}
    assert pool_of(rset) == Pool(nodes=5, cores=16, gpus=2, node_cores=8, node_gpus=2)


@pytest.mark.parametrize(("request_", "key"), [
    ({"threads_per_core": 3}, "threads_per_core"),
    ({"gpus_per_core": 1}, "gpus_per_core"),
    ({"exclusive": True}, "exclusive"),
    ({"cores": 2, "num_nodes": 3}, "num_nodes"),
    ({"cores": 6, "num_nodes": 2}, "num_nodes"),  # 3 ranks on a node of 2 cores
])
def test_shapes_no_node_can_hold_are_refused(request_, key):
    with pytest.raises(ResourceError) as info:
        check_shape(parse(request_), POOL)
    assert info.value.key == key and info.value.allowed


def test_shapes_that_fit_pass():
    for ok in ({"cores": 8}, {"cores": 4, "num_nodes": 4, "exclusive": True},
               {"cores": 2, "threads_per_core": 2, "num_nodes": 2}):
        check_shape(parse(ok), POOL)


def test_batch_script():
    one = batch_script(parse({}), input_file="/c/k.in.pkl", python="/py", flux="/f")
    assert one == "#!/bin/sh\nexec /py -m executorkit.worker.file_task /c/k.in.pkl\n"
    mpi = batch_script(parse({"cores": 4, "threads_per_core": 2, "num_nodes": 2}),
                       input_file="/c d/k.in.pkl", python="/py", flux="/f", pmi_mode="simple")
    assert "exec /f run -n4 -c2 -N2 -opmi=simple /py -m executorkit.worker.file_task " \
           "'/c d/k.in.pkl'" in mpi


def test_job_end_words():
    timeout = JobEnd("f1", status=9, exception=("timeout", "resource allocation expired"))
    assert timeout.state == "timeout"
    assert "type=timeout: resource allocation expired) and was killed by SIGKILL" in \
        timeout.describe()
    assert JobEnd("f2", status=256).state == "failed"
    assert "exited with code 1" in JobEnd("f2", status=256).describe()
    lost = JobEnd("f3", lost="Connection reset by peer")
    assert lost.state == "lost" and "Connection reset" in lost.describe()
    assert "never started" in JobEnd("f4", exception=("dependency", "x")).describe()


def test_unsupported_parameters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="block_allocation"):
        FluxClusterExecutor(cache_directory=str(tmp_path), block_allocation=True)
    with pytest.raises(TypeError, match="bogus"):
        FluxClusterExecutor(cache_directory=str(tmp_path), bogus=1)


# ------------------------------------------------------------------ against a broker
@pytest.mark.flux
@needs_broker
@ON_BOTH
def test_dag_queued_at_once_with_a_failing_node(instance, cluster, tmp_path):
    d = str(tmp_path / "g")
    exe = cluster()
    gate = exe.submit(tf.gate, d, "dag", 1)
    a = exe.submit(tf.inc, gate)
    b = exe.submit(tf.add, a, exe.submit(tf.inc, a))
    bad = exe.submit(tf.fail, "broken")
    after_bad = exe.submit(tf.inc, exe.submit(tf.inc, bad))
    # every job is in Flux already, waiting on its inputs with afterok
    assert all(f._job.job_id for f in (a, b, after_bad)) and not a.done()
    with pytest.raises(ValueError, match="broken") as info:
        bad.result(timeout=T)
    assert "in fail" in info.value.__cause__.tb
    with pytest.raises(DependencyError) as dep:
        after_bad.result(timeout=T)
    assert isinstance(dep.value.__cause__, (ValueError, DependencyError))
    tf.release(d, "dag")
    assert b.result(timeout=T) == 5  # gate 1, a = 2, inc(a) = 3
    frame = get_cache_data(str(tmp_path / "cache"))
    assert sorted(frame["status"]) == ["done", "done", "done", "done", "failed"]


@pytest.mark.flux
@needs_broker
@ON_BOTH
def test_cancel_a_running_job(instance, cluster, tmp_path):
    d = str(tmp_path / "g")
    exe = cluster()
    fut = _gated(exe, d, "c")
    dependent = exe.submit(tf.inc, fut)
    job = fut._job.job_id
    assert fut.cancel()
    with pytest.raises(DependencyError):
        dependent.result(timeout=T)
    wait_until(lambda: _job_result(job) == "CANCELED", timeout=T)
    wait_until(lambda: _job_result(dependent._job.job_id) != "", timeout=T)


@pytest.mark.flux
@needs_broker
def test_job_cancelled_from_outside_fails_at_once(cluster, tmp_path):
    import flux
    import flux.job

    exe = cluster()
    fut = _gated(exe, str(tmp_path / "g"), "outside")
    flux.job.cancel(flux.Flux(), flux.job.JobID(fut._job.job_id), "by the test")
    with pytest.raises(JobFailedError, match="type=cancel: by the test") as info:
        fut.result(timeout=T)
    assert info.value.state == "cancel"


@pytest.mark.flux
@needs_broker
@ON_BOTH
def test_job_killed_by_its_time_limit(instance, cluster):
    exe = cluster()
    fut = exe.submit(tf.sleep_forever, resource_dict={"run_time_max": 2})
    with pytest.raises(TaskTimeoutError, match="type=timeout") as info:
        fut.result(timeout=T)
    assert exe.log_file(fut._job.key) in str(info.value)


@pytest.mark.flux
@needs_broker
@ON_BOTH
def test_job_whose_command_fails_to_start(instance, cluster, monkeypatch):
    monkeypatch.setattr("executorkit.executors.flux_cluster.flux_command",
                        lambda: "/nonexistent/flux")
    exe = cluster()
    fut = exe.submit(tf.inc, 1)
    with pytest.raises(JobFailedError) as info:
        fut.result(timeout=T)
    assert info.value.state == "exec"
    assert exe.log_file(fut._job.key) in str(info.value)
    assert info.value.job_id == fut._job.job_id


@pytest.mark.flux
@pytest.mark.mpi
@needs_broker
@ON_BOTH
def test_mpi_call_and_a_rank_that_raises(instance, cluster):
    exe = cluster()
    ranks = exe.submit(tf.mpi_ranks, "m", resource_dict={"cores": 2})
    failing = exe.submit(tf.mpi_fail_on, 1, resource_dict={"cores": 2})
    assert [r[:3] for r in ranks.result(timeout=T)] == [(0, 2, "m"), (1, 2, "m")]
    with pytest.raises(ValueError, match="rank 1 failed") as info:
        failing.result(timeout=T)
    assert "[rank 1 of 2]" in info.value.__cause__.tb


@pytest.mark.flux
@pytest.mark.mpi
@needs_broker
@ON_BOTH
def test_an_mpi_call_that_aborts_leaves_no_shared_memory_behind(instance, cluster, tmp_path):
    # MPICH removes its /dev/shm file at MPI_Finalize, which an aborted job never reaches
    exe = cluster()
    failing = exe.submit(tf.mpi_segments_then_fail_on, str(tmp_path), 1,
                         resource_dict={"cores": 2})
    with pytest.raises(ValueError, match="rank 1 failed"):
        failing.result(timeout=T)
    segments = (tmp_path / "segments").read_text().split()
    assert segments
    wait_until(lambda: not any(os.path.exists(s) for s in segments), timeout=T)


@pytest.mark.flux
@needs_broker
@ON_BOTH
def test_bad_resource_requests_are_refused_at_submit(instance, cluster):
    exe = cluster()
    pool = exe._pool
    bad = [({"cores": pool.cores + 1}, "cores"),
           ({"threads_per_core": pool.node_cores + 1}, "cores"
            if pool.node_cores + 1 > pool.cores else "threads_per_core"),
           ({"gpus_per_core": pool.gpus + 1}, "gpus_per_core"),
           ({"num_nodes": pool.nodes + 1, "cores": pool.nodes + 1}, "num_nodes"),
           ({"exclusive": True}, "exclusive"),
           ({"slurm_cmd_args": ["--mem=1G"]}, "slurm_cmd_args"),
           ({"priority": 3}, "priority"),
           ({"cores": 0}, "cores")]
    for request_, key in bad:
        with pytest.raises(ResourceError) as info:
            exe.submit(tf.inc, 1, resource_dict=request_)
        if key is not None:
            assert info.value.key == key, (request_, info.value)
    assert not exe._active  # nothing reached Flux


@pytest.mark.flux
@needs_broker
def test_threads_and_the_nested_instance_of_a_job(cluster):
    exe = cluster()
    info = exe.submit(tf.flux_instance, resource_dict={"threads_per_core": 2}).result(timeout=T)
    assert info["cores"] == 2 and info["omp"] == "2"  # the job's nested instance
    assert info["uri"] != os.environ["FLUX_URI"]


@pytest.mark.flux
@needs_broker
def test_a_flux_job_executor_inside_the_job(cluster):
    from concurrent.futures import Executor

    from executorkit import FluxJobExecutor

    if not issubclass(FluxJobExecutor, Executor):
        pytest.skip("FluxJobExecutor is not part of this build (it refuses to start)")
    exe = cluster()
    inner = exe.submit(tf.inner_flux_jobs, 3, resource_dict={"threads_per_core": 2})
    assert inner.result(timeout=T) == (2, [1, 2, 3])  # its pool is the job's two cores


@pytest.mark.flux
@needs_broker
def test_a_command_as_a_batch_job(cluster, tmp_path):
    from executorkit import Command

    exe = cluster()
    first = exe.submit(Command(["echo", "hello"]), resource_dict={"cwd": str(tmp_path / "w")})
    second = exe.submit(Command(["echo", first, "world"]))
    assert second.result(timeout=T).stdout == "hello world\n"


@pytest.mark.flux
@needs_broker
def test_same_key_as_the_local_executor(tmp_path, cluster):
    from executorkit import SingleNodeExecutor

    cache = str(tmp_path / "cache")
    with SingleNodeExecutor(max_workers=1, cache_directory=cache) as local:
        assert local.submit(tf.add, 20, 22).result(timeout=T) == 42
    fut = cluster(cache_directory=cache).submit(tf.add, 20, 22)
    assert fut.done() and fut.result(timeout=T) == 42
    assert fut._job.job_id is None


# ------------------------------------------------------------------ drivers in processes
def _outside_env() -> dict:
    """A driver outside the instance: no FLUX_URI; it is given the URI explicitly."""
    env = dict(os.environ)
    env.pop("FLUX_URI", None)
    return env


def _scenario(name: str, cache: str, d: str) -> list[str]:
    return [sys.executable, os.path.join(HERE, "cluster_scenarios.py"), name, cache, d,
            "flux", os.environ.get("FLUX_URI", "")]


def _driver(name: str, cache: str, d: str) -> dict:
    proc = subprocess.run(_scenario(name, cache, d), capture_output=True, text=True,
                          timeout=300, cwd=HERE, env=_outside_env())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise AssertionError(proc.stdout[-2000:] + proc.stderr[-2000:])


@pytest.mark.flux
@needs_broker
def test_driver_killed_and_restarted_reattaches(tmp_path):
    cache, d = str(tmp_path / "cache"), str(tmp_path / "g")
    driver = subprocess.Popen(_scenario("start_and_hang", cache, d), stdout=subprocess.PIPE,
                              text=True, cwd=HERE, env=_outside_env())
    try:
        line = driver.stdout.readline()
        assert line.startswith("JOB "), line
        job = json.loads(line[4:])
        wait_until(lambda: tf.started(d, "cg"), timeout=T)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        driver.stdout.close()
    second = _driver("reattach", cache, d)
    assert second == {"job": job, "value": 10}
    assert tf.runs(d, "cg-run") == 1  # the call ran once
    third = _driver("reattach", cache, d)  # finished: straight from the cache, no job
    assert third == {"job": None, "value": 10}


@pytest.mark.flux
@needs_broker
def test_terminate_tasks_in_cache(tmp_path):
    cache, d = str(tmp_path / "cache"), str(tmp_path / "g")
    first = _driver("start_gated", cache, d)
    assert terminate_tasks_in_cache(cache, backend="flux") == 1
    wait_until(lambda: _job_result(first["job"]) == "CANCELED", timeout=T)
    assert terminate_tasks_in_cache(cache, backend="flux") == 0


# ------------------------------------------------------------------ four simulated nodes
@pytest.mark.flux_nodes
@needs_broker
def test_calls_over_several_nodes(cluster):
    exe = cluster()
    if exe._pool.nodes < 4:
        pytest.skip(f"needs 4 Flux nodes, the instance has {exe._pool.nodes} "
                    f"(the test command runs this under flux start --test-size=4)")
    spread = exe.submit(tf.flux_instance, "spread", resource_dict={"cores": 2, "num_nodes": 2})
    whole = exe.submit(tf.flux_instance, "whole",
                       resource_dict={"num_nodes": 1, "exclusive": True})
    ranks = exe.submit(tf.mpi_ranks, exe.submit(tf.inc, 1),
                       resource_dict={"cores": 4, "num_nodes": 4})
    for rank in spread.result(timeout=T):
        assert rank["size"] == 2 and rank["nodes"] == 2  # one broker on each granted node
    assert whole.result(timeout=T)["cores"] == exe._pool.node_cores
    assert [r[:3] for r in ranks.result(timeout=T)] == [(i, 4, 2) for i in range(4)]
    with pytest.raises(ResourceError) as info:
        exe.submit(tf.inc, 1, resource_dict={"cores": 2, "num_nodes": exe._pool.nodes + 1})
    assert info.value.key == "num_nodes"


@pytest.mark.flux
@needs_broker
def test_status_json_follows_the_jobs(cluster, tmp_path, capsys):
    exe = cluster()
    status_scenario.follows_the_jobs(exe, str(tmp_path / "cache"), str(tmp_path / "g"),
                                     capsys, host_while_running=False)  # no host in events


@pytest.mark.flux
@needs_broker
def test_status_json_after_shutdown_without_wait(cluster, tmp_path, capsys):
    exe = cluster()
    status_scenario.left_running(exe, str(tmp_path / "cache"), str(tmp_path / "g"), capsys)
