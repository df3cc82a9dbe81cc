"""SlurmJobExecutor against a real Slurm cluster (scenarios run under salloc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import capabilities
import pytest

from executorkit.errors import ResourceError
from executorkit.launchers.slurm import allocation, allocation_cpus, srun_command
from executorkit.resources import parse

HERE = os.path.dirname(os.path.abspath(__file__))


NO_SLURM = capabilities.missing("slurm")
needs_slurm = capabilities.skip_unless("slurm")


def run_scenario(name: str, ntasks: int = 4) -> dict:
    proc = subprocess.run(
        ["salloc", "-n", str(ntasks), "--time=10", sys.executable,
         os.path.join(HERE, "slurm_scenarios.py"), name],
        capture_output=True, text=True, timeout=300, cwd=HERE,
        env={**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"scenario {name} failed (rc={proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def test_srun_command_lines():
    res = parse({"cores": 4, "threads_per_core": 2, "gpus_per_core": 1, "num_nodes": 2,
                 "exclusive": True, "run_time_max": 90, "slurm_cmd_args": ["--mem=1G"]})
    cmd = srun_command(res, module="executorkit.worker.mpi", bootfile="/b", pmi_mode="pmix",
                       python="/py")
    assert cmd[:3] == ["srun", "--ntasks", "4"]
    for flag in ("--cpus-per-task", "--exact", "--gpus-per-task=1", "--exclusive",
                 "--time=2", "--mpi=pmix", "--mem=1G"):
        assert flag in cmd
    assert cmd[cmd.index("--nodes") + 1] == "2"
    assert cmd[-4:] == ["/py", "-m", "executorkit.worker.mpi", "/b"]
    plain = srun_command(parse({}), module="m", bootfile="/b", python="/py")
    assert "--gpus-per-task" not in " ".join(plain) and "--mpi" not in " ".join(plain)


def test_allocation_parsing():
    assert allocation_cpus("8") == 8
    assert allocation_cpus("4(x2),2") == 10
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_CPUS_PER_NODE": "4(x2)", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_GPUS_ON_NODE": "2"}
    assert allocation(env) == (8, 2, 4)
    with pytest.raises(ResourceError, match="inside a Slurm allocation"):
        allocation({})


def test_outside_an_allocation_the_pool_size_is_required(monkeypatch):
    from executorkit import SlurmJobExecutor

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ResourceError, match=r"max_cores=N .* or max_workers=N") as info:
        SlurmJobExecutor()
    assert info.value.key == "max_cores" and "max_workers" in info.value.allowed


@pytest.mark.slurm
@needs_slurm
def test_steps_run_side_by_side():
    out = run_scenario("concurrent_steps")
    assert out["pool"] == 4
    assert len(set(out["steps"])) == 3  # three different job steps at the same time
    assert out["threads"]["cpus_per_task"] == "2" and out["threads"]["omp"] == "2"
    assert out["chain"] == 3


@pytest.mark.slurm
@needs_slurm
def test_mpi_through_srun():
    out = run_scenario("mpi")
    assert out["ranks"] == [[0, 2], [1, 2]]
    assert out["failure"] == ["rank 1 failed", True]


def test_program_prefix_is_srun_for_several_ranks():
    from executorkit.launchers.slurm import SrunLauncher

    launcher = SrunLauncher(pmi_mode="pmi2", cpus_per_node=4)
    assert launcher.program_prefix(parse({})) == ()  # runs inside its worker's step
    prefix = launcher.program_prefix(parse({"cores": 3, "threads_per_core": 1}))
    assert prefix[:3] == ("srun", "--ntasks", "3") and "--mpi=pmi2" in prefix
    assert "python" not in " ".join(prefix)


@pytest.mark.slurm
@pytest.mark.skipif(NO_SLURM is not None, reason=str(NO_SLURM))
def test_commands_as_steps_with_a_failing_rank_and_a_stubborn_program():
    out = run_scenario("commands")
    assert out["one"][0] == "step" and out["one"][1] == "1" and out["one"][2] == "sh"
    assert out["two"] == ["rank 0 of 2", "rank 1 of 2"]
    assert out["two_args"] == ["srun", "--ntasks", "2"]
    assert out["rank_failed"] == [True, True]
    assert "run_time_max" in out["timeout"]
    assert out["stubborn_gone"] and out["after"] == 2
    assert out["escalated"] == "fine\n"
    assert out["status"] == [True, 4, 2]  # live status of the campaign, closed at shutdown
    # the killed first attempt of the escalated call and the timed-out program are "killed"
    assert out["report"] == {"done": 4, "failed": 1, "killed": 2}


@pytest.mark.slurm
@needs_slurm
def test_errors_and_time_limit_in_steps():
    out = run_scenario("errors")
    assert "run_time_max" in out["timeout"]
    assert "exited with code 3" in out["died"]
    assert out["raised"] == ["boom", True]
    assert out["after"] == 2


@pytest.mark.slurm
@needs_slurm
def test_block_allocation_workers_are_steps():
    out = run_scenario("block")
    assert out["ok"] is True
    assert out["steps"] <= 2  # persistent: calls reuse the two worker steps


@pytest.mark.slurm
@needs_slurm
def test_cancel_stops_the_step():
    out = run_scenario("cancel")
    assert out == {"cancelled": True, "after": 3}


def test_srun_keeps_small_calls_on_one_node_and_overlaps_when_nested():
    small = srun_command(parse({"cores": 2}), module="m", bootfile="/b", python="/py",
                         cpus_per_node=4)
    assert small[small.index("--nodes") + 1] == "1"
    big = srun_command(parse({"cores": 8}), module="m", bootfile="/b", python="/py",
                       cpus_per_node=4)
    assert "--nodes" not in big
    assert "--overlap" in srun_command(parse({}), module="m", bootfile="/b", python="/py",
                                       overlap=True)


@pytest.mark.slurm
@needs_slurm
def test_nested_job_executors_use_their_step_and_do_not_deadlock():
    out = run_scenario("nested", ntasks=2)
    assert out["results"] == [[1, [1, 2]], [1, [1, 2]]]


# Outside an allocation every srun makes its own job allocation. Other tests hold
# allocations on this small cluster at times, so a job may queue: generous time limits.
@pytest.mark.slurm
@pytest.mark.timeout(900)
@pytest.mark.skipif(NO_SLURM is not None, reason=str(NO_SLURM))
def test_outside_an_allocation_each_call_is_its_own_job(monkeypatch, tmp_path):
    import taskfuncs as tf
    from conftest import wait_until

    from executorkit import SlurmJobExecutor
    from executorkit.errors import TaskTimeoutError, WorkerDiedError

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    d, t = str(tmp_path), 600
    with SlurmJobExecutor(max_workers=2) as exe:
        assert exe.max_cores == 2
        gates = [exe.submit(tf.gate_env, d, f"s{i}", "SLURM_JOB_ID") for i in range(2)]
        wait_until(lambda: all(tf.started(d, f"s{i}") for i in range(2)), timeout=t)
        jobs = {tf.read(os.path.join(d, f"s{i}.env")) for i in range(2)}
        assert len(jobs) == 2 and None not in jobs  # side by side, two job allocations
        for i in range(2):
            tf.release(d, f"s{i}")
        assert [g.result(timeout=t) for g in gates] == [None, None]
        threads = exe.submit(tf.env, "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS",
                             resource_dict={"threads_per_core": 2}).result(timeout=t)
        assert threads == {"SLURM_CPUS_PER_TASK": "2", "OMP_NUM_THREADS": "2"}
        with pytest.raises(TaskTimeoutError, match="run_time_max"):
            exe.submit(tf.sleep_forever, resource_dict={"run_time_max": 2}).result(timeout=t)
        with pytest.raises(WorkerDiedError, match="exited with code 3"):
            exe.submit(tf.exit_now, 3).result(timeout=t)
        with pytest.raises(ValueError, match="boom") as info:
            exe.submit(tf.fail, "boom").result(timeout=t)
        assert "in fail" in info.value.__cause__.tb
        held = exe.submit(tf.gate_env, d, "c", "SLURM_JOB_ID")
        wait_until(lambda: tf.started(d, "c"), timeout=t)
        job = tf.read(os.path.join(d, "c.env"))
        assert held.cancel()
        wait_until(lambda: not _listed(job), timeout=120)  # the job allocation ended
        assert exe.submit(tf.inc, exe.submit(tf.inc, 1)).result(timeout=t) == 3


@pytest.mark.slurm
@pytest.mark.timeout(900)
@pytest.mark.skipif(NO_SLURM is not None, reason=str(NO_SLURM))
def test_outside_an_allocation_block_workers_are_jobs_and_resize(monkeypatch, tmp_path):
    import resize_funcs as rf
    from conftest import wait_until

    from executorkit import SlurmJobExecutor

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    barrier, t = str(tmp_path / "barrier"), 600
    with SlurmJobExecutor(max_workers=1, block_allocation=True,
                          init_function=rf.init_tag) as exe:
        first = exe.submit(rf.meet, barrier, 2, timeout=t)
        second = exe.submit(rf.meet, barrier, 2, timeout=t)
        wait_until(lambda: rf.arrived(barrier) == 1, timeout=t)
        exe.max_workers = 2  # a second worker job: the two calls meet
        results = [first.result(timeout=t), second.result(timeout=t)]
        assert [tag for _, tag, _ in results] == ["initialised", "initialised"]
        jobs = {job for _, _, job in results}
        assert len(jobs) == 2 and None not in jobs
        exe.max_workers = 1
        wait_until(lambda: sum(_listed(job) for job in jobs) == 1, timeout=120)
        assert exe.submit(sum, [1, 2]).result(timeout=t) == 3


def _listed(job: str) -> bool:
    """Whether Slurm still lists the job (pending or running)."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                         text=True, timeout=60)
    return bool(out.stdout.strip())


@pytest.mark.slurm
@pytest.mark.skipif(NO_SLURM is not None, reason=str(NO_SLURM))
@pytest.mark.parametrize("how", ["driver_sigkilled", "driver_sigterm"])
def test_steps_end_when_their_driver_is_killed(how):
    """The driver dies inside the allocation while a per-task step and a block-allocation
    step are busy: their workers notice and exit, the steps end, the allocation goes on,
    and no boot file (it holds the secret) is left."""
    out = run_scenario(how)
    assert out["steps_were_running"] is True
    assert out["boot_files"] == []
    if how == "driver_sigterm":
        assert out["status"] == -15  # still dies of SIGTERM, after removing its files
        assert out["run_dirs"] == []


@pytest.mark.slurm
@pytest.mark.skipif(NO_SLURM is not None, reason=str(NO_SLURM))
def test_boot_files_are_removed():
    out = run_scenario("boot_files_after_exit")
    assert out == {"during": [], "after": []}


@pytest.mark.slurm
@pytest.mark.skipif(NO_SLURM is not None, reason=str(NO_SLURM))
def test_steps_import_from_a_path_added_at_run_time():
    out = run_scenario("syspath")
    assert out == {"warm": 2, "per_task": 2, "block": 4, "mpi": [6, 6]}
