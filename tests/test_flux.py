"""FluxJobExecutor against a real Flux broker.

.ci_support/test.sh runs this module inside ``flux start`` (one broker: marker ``flux``)
and inside ``flux start --test-size=4`` (four brokers on this machine: marker
``flux_nodes``). The shared behaviour suite (conftest's flux modes) and the MPI suite also
run on Flux there.
"""

from __future__ import annotations

import os
import subprocess

import fluxfuncs as ff
import pytest
import taskfuncs as tf
from conftest import flux_missing, wait_until

from executorkit.errors import ResourceError, TaskTimeoutError, WorkerDiedError
from executorkit.resources import parse

T = 120
MISSING = flux_missing()
needs_broker = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
pytestmark = [pytest.mark.flux, needs_broker]


def _size():
    return ff.instance_size() if MISSING is None else (0, 0)


CORES, NODES = _size()


@pytest.fixture
def exe_factory():
    from executorkit import FluxJobExecutor

    made = []

    def make(**kwargs):
        exe = FluxJobExecutor(**kwargs)
        made.append(exe)
        return exe

    yield make
    for exe in made:
        exe.shutdown(wait=True, cancel_futures=True)


def _flux(*args):
    return subprocess.run(["flux", *args], capture_output=True, text=True, timeout=60,
                          check=True).stdout


def _read(path):
    with open(path) as fh:
        return fh.read()


def _job_state(jobid):
    return _flux("jobs", "-n", "-o", "{state} {result}", jobid).split()


# ------------------------------------------------------------------ jobspecs (as data)
def test_jobspec_carries_the_resources():
    from executorkit.launchers.flux import jobspec_for

    res = parse({"cores": 4, "threads_per_core": 2, "gpus_per_core": 1, "num_nodes": 2,
                 "exclusive": True, "run_time_max": 30})
    spec = jobspec_for(res, ["python", "-m", "w"], cwd="/work", env={"A": "1"},
                       options={"pmi": "simple"})
    counts = spec.resource_counts()
    assert (counts["node"], counts["core"], counts["gpu"]) == (2, 8, 4)
    assert spec.tasks[0]["count"] == {"per_slot": 1}
    assert spec.resources[0]["exclusive"] is True
    assert spec.duration == 35.0  # the limit plus Flux's grace: executorkit stops it first
    assert spec.cwd == "/work" and spec.environment == {"A": "1"}
    assert spec.getattr("system.shell.options.pmi") == "simple"


def test_exclusive_without_node_count_takes_whole_nodes():
    from executorkit.launchers.flux import jobspec_for

    spec = jobspec_for(parse({"cores": 3, "exclusive": True}), ["x"], cwd="/", env={},
                       options={}, cores_per_node=2)
    assert spec.resource_counts()["node"] == 2


def test_nested_jobspec_runs_a_broker():
    from executorkit.launchers.flux import jobspec_for

    spec = jobspec_for(parse({"cores": 2}), ["python", "w"], cwd="/", env={}, options={},
                       nest="/opt/flux/bin/flux")
    assert spec.tasks[0]["command"][:2] == ["/opt/flux/bin/flux", "broker"]
    assert spec.getattr("system.shell.options.per-resource.type") == "node"


def test_priority_maps_to_urgency():
    from executorkit.launchers.flux import urgency

    assert urgency(0, owner=True) == 16
    assert urgency(5, owner=True) == 21
    assert urgency(100, owner=True) == 31
    assert urgency(100, owner=False) == 16
    assert urgency(-100, owner=True) == 1  # 0 would hold the job forever


def test_wait_status_reads_the_shells_signal_convention():
    from executorkit.launchers.flux import wait_status

    assert wait_status(3 << 8) == 3
    assert wait_status(137 << 8) == -9  # the shell's 128 + SIGKILL
    assert wait_status(11) == -11


def test_failure_words():
    from executorkit.launchers.flux import job_failure

    text = job_failure("f123", 3, None, "x" * 5000 + "boom\n")
    assert text.startswith("Flux job f123 exited with code 3")
    assert text.endswith("boom") and len(text) < 2200
    text = job_failure("f9", None, ("exec", "task 0: start failed: nope"), "")
    assert "job exception type=exec: task 0: start failed: nope" in text


# ------------------------------------------------------------------ the pool
def test_pool_is_the_instance(exe_factory):
    exe = exe_factory()
    assert exe.max_cores == CORES
    assert exe.max_gpus == 0
    assert exe.submit(tf.inc, 1).result(timeout=T) == 2


def test_no_instance_is_a_clear_error(monkeypatch):
    from executorkit import FluxJobExecutor
    from executorkit.launchers.flux import FluxUnavailableError

    monkeypatch.delenv("FLUX_URI")
    with pytest.raises(FluxUnavailableError, match="no Flux broker is reachable"):
        FluxJobExecutor()
    with pytest.raises(FluxUnavailableError, match="cannot connect"):
        FluxJobExecutor(flux_executor="local:///nonexistent/executorkit/local-0")


def test_flux_executor_parameter_names_the_instance(exe_factory, monkeypatch):
    import flux
    from flux.job import FluxExecutor

    uri = os.environ["FLUX_URI"]
    monkeypatch.delenv("FLUX_URI")
    with FluxExecutor(handle_kwargs={"url": uri}) as fexe:
        exe = exe_factory(flux_executor=fexe)
        assert exe.submit(tf.inc, 2).result(timeout=T) == 3
    exe = exe_factory(flux_executor=flux.Flux(uri))
    assert exe.submit(tf.inc, 3).result(timeout=T) == 4


# ------------------------------------------------------------------ resources per call
def test_each_call_is_a_job_with_its_cores_cwd_and_env(exe_factory, tmp_path):
    exe = exe_factory()
    first = exe.submit(ff.where).result(timeout=T)
    second = exe.submit(ff.where).result(timeout=T)
    assert first[2] and second[2] and first[2] != second[2]  # two Flux jobs
    _, cpus, _ = exe.submit(ff.where, resource_dict={"threads_per_core": 2}).result(timeout=T)
    assert cpus == 2
    threads = exe.submit(tf.env, "OMP_NUM_THREADS", resource_dict={"threads_per_core": 2})
    assert threads.result(timeout=T) == {"OMP_NUM_THREADS": "2"}
    where = tmp_path / "new" / "dir"
    assert exe.submit(tf.cwd, resource_dict={"cwd": str(where)}).result(timeout=T) == str(where)
    got = exe.submit(tf.env, "MY_VAR", resource_dict={"env": {"MY_VAR": "v"}})
    assert got.result(timeout=T) == {"MY_VAR": "v"}


def test_priority_becomes_the_jobs_urgency(exe_factory):
    exe = exe_factory()
    assert exe.submit(ff.job_field, "urgency", resource_dict={"priority": 4}).result(
        timeout=T) == "20"


def test_user_gpu_variable_is_kept(exe_factory):
    # Flux's shell sets CUDA_VISIBLE_DEVICES=-1 for jobs without GPUs, unless told not to
    exe = exe_factory()
    plain = exe.submit(tf.env, "CUDA_VISIBLE_DEVICES").result(timeout=T)
    mine = exe.submit(tf.env, "CUDA_VISIBLE_DEVICES",
                      resource_dict={"env": {"CUDA_VISIBLE_DEVICES": "7"}}).result(timeout=T)
    assert plain == {"CUDA_VISIBLE_DEVICES": "-1"} and mine == {"CUDA_VISIBLE_DEVICES": "7"}


def test_bad_requests_fail_at_submit(exe_factory):
    exe = exe_factory()
    cases = [
        ({"gpus_per_core": 1}, "gpus_per_core"),
        ({"num_nodes": NODES + 1, "cores": NODES + 1}, "num_nodes"),
        ({"num_nodes": 2, "cores": 1}, "num_nodes"),
        ({"threads_per_core": CORES + 1}, "threads_per_core"),
        ({"cores": CORES + 1}, "cores"),
        ({"slurm_cmd_args": ["--mem=1G"]}, "slurm_cmd_args"),
    ]
    for res, key in cases:
        with pytest.raises(ResourceError) as info:
            exe.submit(tf.inc, 1, resource_dict=res)
        assert info.value.key in (key, "cores"), (res, info.value)
    with pytest.raises(ResourceError, match="pmi_mode"):
        from executorkit import FluxJobExecutor

        FluxJobExecutor(pmi_mode=3)
    assert exe.submit(tf.inc, 1).result(timeout=T) == 2


# ------------------------------------------------------------------ warm jobs
def test_warm_jobs_never_keep_a_wide_call_waiting(exe_factory):
    exe = exe_factory()
    assert [f.result(timeout=T) for f in [exe.submit(tf.inc, i) for i in range(4)]] == [1, 2, 3, 4]
    # idle warm jobs hold cores in Flux; a call needing every core gets them at once
    wide = exe.submit(ff.where, resource_dict={"threads_per_core": CORES})
    assert wide.result(timeout=T)[1] == CORES


def test_idle_warm_jobs_give_their_cores_back(exe_factory):
    first = exe_factory()
    assert first.submit(tf.inc, 1).result(timeout=T) == 2
    # `first` is still open with warm jobs; a second executor's calls must not wait for it
    second = exe_factory()
    assert second.submit(tf.inc, 2).result(timeout=T) == 3
    wait_until(lambda: _flux("jobs", "-n", "-o", "{id}").strip() == "", timeout=T)


# ------------------------------------------------------------------ failures
def test_cancel_of_a_running_call_cancels_its_job_and_frees_its_cores(exe_factory, tmp_path):
    exe = exe_factory()
    path = str(tmp_path / "jobid")
    fut = exe.submit(ff.job_id_to, path, resource_dict={"threads_per_core": CORES})
    wait_until(lambda: os.path.exists(path), timeout=T)
    assert fut.cancel()
    jobid = _read(path)
    wait_until(lambda: _job_state(jobid) == ["INACTIVE", "CANCELED"], timeout=T)
    # every core of the instance was held by that job: this runs only if they came back
    assert exe.submit(tf.inc, 1, resource_dict={"threads_per_core": CORES}).result(
        timeout=T) == 2


def test_job_killed_by_flux_fails_with_its_reason(exe_factory, tmp_path):
    exe = exe_factory()
    path = str(tmp_path / "jobid")
    fut = exe.submit(ff.job_id_to, path)
    wait_until(lambda: os.path.exists(path), timeout=T)
    jobid = _read(path)
    _flux("cancel", "--message=stopped by the test", jobid)
    from flux.job import JobID

    jobid = JobID(jobid).f58plain  # errors quote job ids in ASCII
    with pytest.raises(WorkerDiedError) as info:
        fut.result(timeout=T)
    text = str(info.value)
    assert jobid in text and "type=cancel" in text and "stopped by the test" in text


def test_time_limit_stops_the_job(exe_factory, tmp_path):
    exe = exe_factory()
    path = str(tmp_path / "jobid")
    fut = exe.submit(ff.job_id_to, path, resource_dict={"run_time_max": 1.5})
    with pytest.raises(TaskTimeoutError, match=r"run_time_max=1\.5"):
        fut.result(timeout=T)
    jobid = _read(path)
    wait_until(lambda: _job_state(jobid)[0] == "INACTIVE", timeout=T)
    assert _flux("jobs", "-n", "-o", "{duration}", jobid).strip() == "6.5"


def test_exit_reports_code_job_and_stderr_tail(exe_factory, capfd):
    exe = exe_factory()
    with pytest.raises(WorkerDiedError) as info:
        exe.submit(ff.shout_and_exit, 3).result(timeout=T)
    err = info.value
    assert err.exitcode == 3
    assert "exited with code 3" in str(err) and "Flux job " in str(err)
    assert "the last words on stderr" in str(err)
    out = capfd.readouterr()
    assert "to stdout before dying" in out.out  # a job's output reaches the driver's


def test_job_whose_command_fails_to_start(exe_factory):
    exe = exe_factory()
    # The interpreter the jobs run is gone (a moved venv, a node without the file system)
    exe._engine.launcher._python = "/nonexistent/bin/python"
    with pytest.raises(WorkerDiedError) as info:
        exe.submit(tf.inc, 1).result(timeout=T)
    assert "/nonexistent/bin/python" in str(info.value)
    assert "Flux job " in str(info.value)


def test_mpi_call_whose_rank_raises(exe_factory):
    exe = exe_factory()
    with pytest.raises(ValueError, match="rank 1 failed") as info:
        exe.submit(tf.mpi_fail_on, 1, resource_dict={"cores": 2}).result(timeout=T)
    assert "[rank 1 of 2]" in info.value.__cause__.tb
    assert exe.submit(tf.inc, 1).result(timeout=T) == 2


def test_mpi_ranks_are_started_by_flux(exe_factory):
    exe = exe_factory(pmi_mode="simple")
    out = exe.submit(ff.mpi_where, resource_dict={"cores": 2}).result(timeout=T)
    assert [r for r, _ in out] == [0, 1]
    assert len({w[2] for _, w in out}) == 1  # one Flux job holds both ranks


# ------------------------------------------------------------------ block allocation
def test_block_workers_are_long_running_jobs(exe_factory):
    exe = exe_factory(block_allocation=True, max_workers=1,
                      resource_dict={"threads_per_core": 2}, init_function=lambda: {"state": 5})
    jobs = {exe.submit(ff.where).result(timeout=T)[2] for _ in range(5)}
    assert len(jobs) == 1
    _, cpus, jobid = exe.submit(ff.where).result(timeout=T)
    assert cpus == 2
    assert exe.submit(tf.uses_state, 1).result(timeout=T) == (1, 5)
    assert _job_state(jobid)[0] == "RUN"
    exe.shutdown(wait=True)
    wait_until(lambda: _job_state(jobid) == ["INACTIVE", "COMPLETED"], timeout=T)


def test_log_files_keep_each_jobs_output(exe_factory, tmp_path):
    exe = exe_factory(flux_log_files=str(tmp_path / "logs"))
    with pytest.raises(WorkerDiedError):
        exe.submit(ff.shout_and_exit, 4).result(timeout=T)
    exe.shutdown(wait=True)
    logs = sorted(os.listdir(tmp_path / "logs"))
    assert any(n.endswith(".out") for n in logs) and any(n.endswith(".err") for n in logs)
    text = "".join((tmp_path / "logs" / n).read_text() for n in logs)
    assert "to stdout before dying" in text and "the last words on stderr" in text


# ------------------------------------------------------------------ nesting
def test_nested_instance_is_what_the_call_was_granted(exe_factory):
    exe = exe_factory(flux_executor_nesting=True)
    cores, results = exe.submit(ff.inner_flux, 3, resource_dict={"cores": 2}).result(timeout=240)
    assert cores == 2
    assert len(results) == 3 and all(jobid for _, _, jobid in results)


def test_nesting_two_levels_deep(exe_factory):
    exe = exe_factory(flux_executor_nesting=True)
    out = exe.submit(ff.inner_flux, 2, True, resource_dict={"cores": 2}).result(timeout=300)
    outer_cores, (inner_cores, results) = out
    assert (outer_cores, inner_cores) == (2, 1)
    assert len(results) == 1 and results[0][1] == 1  # the innermost instance has one core


# ------------------------------------------------------------------ four brokers
@pytest.mark.flux_nodes
@pytest.mark.skipif(NODES < 4, reason=f"needs 4 Flux brokers, the instance has {NODES} "
                    "(flux start --test-size=4)")
class TestFourNodes:
    def test_pool_has_every_node(self, exe_factory):
        exe = exe_factory()
        assert exe.max_cores == CORES and CORES >= 4

    def test_num_nodes_spreads_ranks(self, exe_factory):
        exe = exe_factory()
        out = exe.submit(ff.mpi_where, resource_dict={"cores": 2, "num_nodes": 2})
        ranks = {w[0] for _, w in out.result(timeout=T)}
        assert len(ranks) == 2

    def test_exclusive_gets_whole_brokers(self, exe_factory):
        exe = exe_factory()
        per_node = CORES // NODES
        _, cpus, _ = exe.submit(ff.where, resource_dict={"exclusive": True,
                                                             "num_nodes": 1}).result(timeout=T)
        assert cpus == per_node
        out = exe.submit(ff.mpi_where, resource_dict={"cores": 2, "num_nodes": 2,
                                                     "exclusive": True}).result(timeout=T)
        assert len({w[0] for _, w in out}) == 2 and all(w[1] == per_node for _, w in out)

    def test_more_nodes_than_the_instance_fails_at_submit(self, exe_factory):
        exe = exe_factory()
        with pytest.raises(ResourceError, match="num_nodes"):
            exe.submit(tf.inc, 1, resource_dict={"num_nodes": NODES + 1,
                                                 "cores": NODES + 1})

    def test_command_ranks_run_on_the_nodes_asked_for(self, exe_factory, tmp_path):
        from executorkit import Command

        exe = exe_factory()
        fut = exe.submit(Command(["flux", "getattr", "rank"]),
                         resource_dict={"cores": 2, "num_nodes": 2, "cwd": str(tmp_path)})
        assert len(set(fut.result(timeout=T).stdout.split())) == 2  # one task on each broker

    def test_many_calls_use_every_broker(self, exe_factory):
        exe = exe_factory()
        futs = [exe.submit(ff.where) for _ in range(4 * NODES)]
        assert len({f.result(timeout=T)[0] for f in futs}) > 1


# ------------------------------------------------------------- Commands: the program is the job
STUBBORN = 'trap "" TERM; echo $FLUX_JOB_ID > {d}/jobid; echo $$ > {d}/pid.$FLUX_TASK_RANK; ' \
           'while true; do sleep 0.05; done'


def _jobspec(jobid):
    import json

    return json.loads(_flux("job", "info", jobid, "jobspec"))


def _pid_gone(path):
    try:
        os.kill(int(_read(path)), 0)
    except ProcessLookupError:
        return True
    return False


def test_command_is_a_job_of_the_program_itself(exe_factory, tmp_path):
    from executorkit import Command

    exe = exe_factory()
    work = tmp_path / "new" / "work"  # created for the call
    argv = ["sh", "-c", 'echo job $FLUX_JOB_ID $MY_VAR $OMP_NUM_THREADS; pwd; cat; echo e >&2']
    result = exe.submit(Command(argv, stdin="fed in\n"), resource_dict={
        "cwd": str(work), "env": {"MY_VAR": "v"}, "threads_per_core": 2}).result(timeout=T)
    words, where, fed = result.stdout.splitlines()
    assert words.split()[2:] == ["v", "2"] and where == str(work) and fed == "fed in"
    assert result.returncode == 0 and result.stderr == "e\n" and result.cwd == str(work)
    assert result.args == argv
    # the job shell wrote the files in the call's cwd; the result was read back from them
    assert os.path.dirname(result.stdout_file) == str(work)
    assert _read(result.stdout_file) == result.stdout and _read(result.stderr_file) == "e\n"
    # no Python in between: the job's one task is the program, with the call's two cores
    spec = _jobspec(words.split()[1])
    assert spec["tasks"][0]["command"] == argv
    assert _flux("jobs", "-n", "-o", "{ntasks} {ncores}", words.split()[1]).split() == ["1", "2"]


def test_futures_in_a_commands_argv_and_stdin_are_dependencies(exe_factory, tmp_path):
    from executorkit import Command

    exe = exe_factory()
    word = exe.submit(Command(["echo", "upstream"]), resource_dict={"cwd": str(tmp_path)})
    number = exe.submit(tf.inc, 41)
    down = exe.submit(Command(["sh", "-c", 'echo "$0 $1 $(cat)"', word, number],
                              stdin=exe.submit(Command(["echo", "piped"]))),
                      resource_dict={"cwd": str(tmp_path)})
    assert down.result(timeout=T).stdout == "upstream 42 piped\n"


def test_mpi_command_is_a_job_of_that_many_tasks(exe_factory, tmp_path):
    import sys

    from executorkit import Command

    exe = exe_factory()
    code = ("import os; from mpi4py import MPI; c = MPI.COMM_WORLD; "
            "print(c.Get_rank(), c.Get_size(), os.environ['FLUX_JOB_ID'])")
    argv = [sys.executable, "-c", code]
    result = exe.submit(Command(argv), resource_dict={"cores": 2, "cwd": str(tmp_path)}).result(
        timeout=T)
    lines = sorted(result.stdout.splitlines())
    assert [line.split()[:2] for line in lines] == [["0", "2"], ["1", "2"]]
    jobid = lines[0].split()[2]
    assert {line.split()[2] for line in lines} == {jobid}  # one job holds both ranks
    assert _jobspec(jobid)["tasks"][0]["command"] == argv  # the program, not a worker
    assert _flux("jobs", "-n", "-o", "{ntasks}", jobid).strip() == "2"


def test_mpi_command_whose_rank_fails(exe_factory, tmp_path):
    from executorkit import Command, CommandError

    exe = exe_factory()
    script = 'if [ "$PMI_RANK" = 1 ]; then echo rank one failed >&2; exit 4; fi; echo ok'
    fut = exe.submit(Command(["sh", "-c", script]), resource_dict={"cores": 2,
                                                                     "cwd": str(tmp_path)})
    with pytest.raises(CommandError, match="rank one failed") as info:
        fut.result(timeout=T)
    assert info.value.returncode == 4 and "exited with code 4" in str(info.value)
    assert info.value.result.stdout == "ok\n"  # rank 0 ran to its end
    assert exe.submit(Command(["true"])).result(timeout=T).returncode == 0


def test_command_killed_by_a_signal_is_a_command_error(exe_factory, tmp_path):
    from executorkit import Command, CommandError

    exe = exe_factory()
    with pytest.raises(CommandError) as info:
        exe.submit(Command(["sh", "-c", "kill -SEGV $$"]),
                   resource_dict={"cwd": str(tmp_path)}).result(timeout=T)
    assert info.value.returncode == -11


def test_command_ignoring_sigterm_is_killed_at_run_time_max(exe_factory, tmp_path):
    from executorkit import Command

    exe = exe_factory()
    fut = exe.submit(Command(["sh", "-c", STUBBORN.format(d=tmp_path)]),
                     resource_dict={"cores": 2, "run_time_max": 2, "cwd": str(tmp_path)})
    with pytest.raises(TaskTimeoutError, match="run_time_max=2"):
        fut.result(timeout=T)
    pids = [str(tmp_path / f"pid.{rank}") for rank in (0, 1)]
    wait_until(lambda: all(os.path.exists(p) and _read(p).strip() for p in pids), timeout=T)
    wait_until(lambda: all(_pid_gone(p) for p in pids), timeout=T)
    jobid = _read(str(tmp_path / "jobid")).strip()
    wait_until(lambda: _job_state(jobid)[0] == "INACTIVE", timeout=T)


def test_cancel_of_a_running_command_cancels_its_job(exe_factory, tmp_path):
    from executorkit import Command

    exe = exe_factory()
    fut = exe.submit(Command(["sh", "-c", STUBBORN.format(d=tmp_path)]),
                     resource_dict={"threads_per_core": CORES, "cwd": str(tmp_path)})
    pid = str(tmp_path / "pid.0")
    wait_until(lambda: os.path.exists(pid) and _read(pid).strip(), timeout=T)
    assert fut.running() and fut.cancel()
    jobid = _read(str(tmp_path / "jobid")).strip()
    wait_until(lambda: _job_state(jobid) == ["INACTIVE", "CANCELED"], timeout=T)
    wait_until(lambda: _pid_gone(pid), timeout=T)
    # it held every core of the instance: this runs only once they came back
    assert exe.submit(Command(["true"]), resource_dict={"threads_per_core": CORES}).result(
        timeout=T).returncode == 0


@pytest.mark.skipif(CORES < 2, reason="needs an instance of two cores")
def test_command_retry_succeeds_only_after_escalation(exe_factory, tmp_path):
    from executorkit import Command, get_cache_data

    cache = str(tmp_path / "cache")
    exe = exe_factory(cache_directory=cache)
    # killed unless its job has two cores (Flux binds a task to its cores): needs escalation
    script = 'test "$(nproc)" = 2 || kill -9 $$; echo fine'
    fut = exe.submit(Command(["sh", "-c", script]), resource_dict={
        "max_retries": 1, "retry_escalation": {"threads_per_core": 2}, "cwd": str(tmp_path)})
    assert fut.result(timeout=T).stdout == "fine\n"
    frame = get_cache_data(cache)
    assert sorted(frame["status"]) == ["done", "failed"]  # the final run and attempt 1
    assert sorted(r.get("threads_per_core", 1) for r in frame["resource_dict"]) == [1, 2]


def test_command_results_are_cached_by_the_driver(exe_factory, tmp_path):
    from executorkit import Command, CommandError, get_cache_data

    cache, work = str(tmp_path / "cache"), tmp_path / "work"
    exe = exe_factory(cache_directory=cache)
    make = Command(["sh", "-c", "echo made > out.txt; echo $FLUX_JOB_ID"], outputs=["out.txt"])
    first = exe.submit(make, resource_dict={"cwd": str(work)}).result(timeout=T)
    again = exe.submit(make, resource_dict={"cwd": str(work)}).result(timeout=T)
    assert again == first  # a hit: no second job
    os.remove(work / "out.txt")  # a declared output is gone: it runs again
    third = exe.submit(make, resource_dict={"cwd": str(work)}).result(timeout=T)
    assert third.stdout != first.stdout and (work / "out.txt").exists()
    with pytest.raises(CommandError):
        exe.submit(Command(["false"]), resource_dict={"cwd": str(work)}).result(timeout=T)
    frame = get_cache_data(cache)
    assert sorted(frame["status"]) == ["done", "failed"]
    assert isinstance(frame[frame["status"] == "failed"]["error"].iloc[0], CommandError)
