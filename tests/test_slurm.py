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


def test_outside_an_allocation_is_a_clear_error(monkeypatch):
    from executorkit import SlurmJobExecutor

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ResourceError, match="SlurmClusterExecutor"):
        SlurmJobExecutor()


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
