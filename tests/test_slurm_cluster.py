"""SlurmClusterExecutor against the real Slurm cluster: every call an sbatch job."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import batch_status_scenario as status_scenario
import capabilities
import pytest
import taskfuncs as tf
from conftest import wait_until

from executorkit import SlurmClusterExecutor, get_cache_data, terminate_tasks_in_cache
from executorkit.errors import DependencyError, ResourceError
from executorkit.executors.slurm_cluster import JobFailedError
from executorkit.launchers.queue import job_script, sbatch_command
from executorkit.resources import parse

HERE = os.path.dirname(os.path.abspath(__file__))
T = 180
pytestmark = pytest.mark.slurm
needs_slurm = capabilities.skip_unless("slurm")


def _gated(exe: SlurmClusterExecutor, d: str, name: str):
    """Submit a call that waits for its release file; return once its job runs it."""
    fut = exe.submit(tf.gate, d, name)
    wait_until(lambda: tf.started(d, name), timeout=T)
    return fut


def test_sbatch_command_and_script():
    res = parse({"cores": 2, "threads_per_core": 3, "run_time_max": 61,
                 "slurm_cmd_args": ["--partition=debug"]})
    cmd = sbatch_command(res, job_name="k", script="/s.sh", output="/o", after_ok=["4", "5"])
    for part in ("--parsable", "--job-name=k", "--ntasks=2", "--cpus-per-task=3",
                 "--dependency=afterok:4:5", "--time=2", "--partition=debug", "--output=/o"):
        assert part in cmd
    assert cmd[-1] == "/s.sh"
    script = job_script(res, input_file="/in file.pkl", python="/py",
                        env=[("OMP_NUM_THREADS", "3")])
    assert "export OMP_NUM_THREADS=3" in script
    assert "srun --ntasks=2 --cpus-per-task=3 /py -m executorkit.worker.file_task " \
           "'/in file.pkl'" in script


def test_unsupported_parameters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="block_allocation"):
        SlurmClusterExecutor(cache_directory=str(tmp_path), block_allocation=True)


@needs_slurm
def test_dag_with_a_failing_node(tmp_path):
    cache = str(tmp_path / "cache")
    with SlurmClusterExecutor(cache_directory=cache, poll_interval=0.2) as exe:
        a = exe.submit(tf.inc, 1)
        b = exe.submit(tf.add, a, exe.submit(tf.inc, a))  # queued at once with afterok
        bad = exe.submit(tf.fail, "broken")
        after_bad = exe.submit(tf.inc, bad)
        assert b.result(timeout=T) == 5
        with pytest.raises(ValueError, match="broken") as info:
            bad.result(timeout=T)
        assert "in fail" in info.value.__cause__.tb
        with pytest.raises(DependencyError) as dep:
            after_bad.result(timeout=T)
        assert isinstance(dep.value.__cause__, ValueError)
    frame = get_cache_data(cache)
    assert sorted(frame["status"]) == ["done", "done", "done", "failed"]


@needs_slurm
def test_scancel_from_outside_fails_within_seconds(tmp_path):
    d = str(tmp_path / "g")
    with SlurmClusterExecutor(cache_directory=str(tmp_path / "cache"),
                              poll_interval=0.2) as exe:
        fut = _gated(exe, d, "x")
        subprocess.run(["scancel", fut._job.job_id], check=True, timeout=30)
        with pytest.raises(JobFailedError, match="CANCELLED") as info:
            fut.result(timeout=30)
        assert info.value.state.startswith("CANCELLED")


@needs_slurm
def test_cancel_runs_scancel(tmp_path):
    d = str(tmp_path / "g")
    with SlurmClusterExecutor(cache_directory=str(tmp_path / "cache"),
                              poll_interval=0.2) as exe:
        fut = _gated(exe, d, "y")
        job = fut._job.job_id
        assert fut.cancel()
        wait_until(lambda: _gone(job), timeout=60)


def _gone(job_id: str) -> bool:
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                            timeout=30).stdout.split()
    return job_id not in queued


def _driver(name: str, cache: str, d: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(HERE, "cluster_scenarios.py"), name,
                           cache, d], capture_output=True, text=True, timeout=300, cwd=HERE)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise AssertionError(proc.stdout[-2000:] + proc.stderr[-2000:])


@needs_slurm
def test_driver_restart_reattaches_instead_of_resubmitting(tmp_path):
    cache, d = str(tmp_path / "cache"), str(tmp_path / "g")
    first = _driver("start_gated", cache, d)
    wait_until(lambda: tf.started(d, "cg"), timeout=T)
    second = _driver("reattach", cache, d)
    assert second == {"job": first["job"], "value": 10}
    assert tf.runs(d, "cg-run") == 1  # the call ran once
    third = _driver("reattach", cache, d)  # finished: straight from the cache, no job
    assert third == {"job": None, "value": 10}


@needs_slurm
def test_terminate_tasks_in_cache(tmp_path):
    cache, d = str(tmp_path / "cache"), str(tmp_path / "g")
    first = _driver("start_gated", cache, d)
    assert terminate_tasks_in_cache(cache) == 1
    wait_until(lambda: _gone(first["job"]), timeout=60)
    assert terminate_tasks_in_cache(cache) == 0


@needs_slurm
def test_nested_job_executor_and_mpi_in_a_job(tmp_path):
    with SlurmClusterExecutor(cache_directory=str(tmp_path / "cache"),
                              poll_interval=0.2) as exe:
        nested = exe.submit(tf.inner_steps, 3, resource_dict={"threads_per_core": 2})
        ranks = exe.submit(tf.mpi_ranks, "j", resource_dict={"cores": 2})
        steps, cores = nested.result(timeout=T)
        assert cores == 2  # the inner executor's pool is what the job was granted
        assert len({s["SLURM_JOB_ID"] for s in steps}) == 1
        assert len({s["SLURM_STEP_ID"] for s in steps}) == 3
        assert [r[:2] for r in ranks.result(timeout=T)] == [(0, 2), (1, 2)]


@needs_slurm
def test_same_key_as_the_local_executor(tmp_path):
    """The key is computed in the driver the same way for every backend, so a result cached
    by SingleNodeExecutor is a hit for SlurmClusterExecutor (no job is submitted)."""
    from executorkit import SingleNodeExecutor

    cache = str(tmp_path / "cache")
    with SingleNodeExecutor(max_workers=1, cache_directory=cache) as local:
        assert local.submit(tf.add, 20, 22).result(timeout=T) == 42
    with SlurmClusterExecutor(cache_directory=cache) as cluster:
        fut = cluster.submit(tf.add, 20, 22)
        assert fut.done() and fut.result(timeout=T) == 42
        assert fut._job.job_id is None


def test_env_names_a_batch_script_cannot_export_are_refused(tmp_path):
    # No job is submitted: the name is refused at submit (and never reaches bash unquoted).
    exe = SlurmClusterExecutor(cache_directory=str(tmp_path))
    try:
        for name in ("X;touch pwned;Y", "A-B", "1A"):
            with pytest.raises(ResourceError, match="env") as info:
                exe.submit(tf.add, 1, 2, resource_dict={"env": {name: "1"}})
            assert info.value.key == "env"
    finally:
        exe.shutdown(wait=False)
    assert not os.path.exists(tmp_path / "pwned")
    script = job_script(parse({"env": {"OK_1": "v"}}), input_file="/in",
                        env=[("X;touch pwned;Y", "1")])
    assert "export 'X;touch pwned;Y'=1" in script  # quoted: bash refuses it, runs nothing


@needs_slurm
def test_batch_jobs_import_from_a_path_added_at_run_time(tmp_path):
    from test_syspath import module_on_new_path

    with SlurmClusterExecutor(cache_directory=str(tmp_path / "cache"), poll_interval=0.2) as exe, \
            module_on_new_path(str(tmp_path / "project")) as light:
        assert exe.submit(light.spin, 21).result(timeout=T) == 42


@needs_slurm
def test_status_json_follows_the_jobs(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    exe = SlurmClusterExecutor(cache_directory=cache, poll_interval=0.2)
    status_scenario.follows_the_jobs(exe, cache, str(tmp_path / "g"), capsys,
                                     host_while_running=True)  # squeue's node list


@needs_slurm
def test_status_json_after_shutdown_without_wait(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    exe = SlurmClusterExecutor(cache_directory=cache, poll_interval=0.2)
    status_scenario.left_running(exe, cache, str(tmp_path / "g"), capsys)
