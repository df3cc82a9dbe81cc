"""executorlib code with only the import changed (``import executorkit as executorlib``).

One test (or a few) per point of the drop-in issue: what a migrating user wrote against
executorlib must work here, or hit a documented, deliberate difference (docs/migration.md).
"""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys

import capabilities
import pytest
import taskfuncs as tf

import executorkit as executorlib
from executorkit.errors import DependencyError

T = 60  # seconds: every result() has a timeout


def raise_error(parameter):
    raise RuntimeError(f"bad {parameter}")


def add_function(parameter_1, parameter_2):
    return parameter_1 + parameter_2


def get_error(a):
    raise ValueError(a)


def takes_resource_dict(resource_dict):
    return resource_dict


# 1 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [False, True])
def test_dependent_of_failed_future_is_caught_as_the_upstream_type(block):
    with executorlib.SingleNodeExecutor(max_cores=1, block_allocation=block) as exe:
        lst = []
        for _ in range(3):
            lst = exe.submit(raise_error, parameter=lst)
        with pytest.raises(RuntimeError) as info:
            lst.result(timeout=T)
    err = info.value
    assert isinstance(err, DependencyError)
    assert isinstance(err.__cause__, RuntimeError) and "bad []" in str(err.__cause__)
    assert "raise_error" in str(err)  # names the failed upstream task


def test_split_future_and_batched_items_are_caught_as_the_upstream_type():
    with executorlib.SingleNodeExecutor(max_workers=1) as exe:
        bad = exe.submit(raise_error, parameter=1)
        first, _second = executorlib.split_future(bad, n=2)
        with pytest.raises(RuntimeError):
            first.result(timeout=T)
        (batch,) = exe.batched([bad], n=1)
        with pytest.raises(RuntimeError):
            batch.result(timeout=T)
        assert isinstance(batch.exception(timeout=T), DependencyError)


def test_batched_leaves_a_failed_input_out_as_executorlib_does():
    with executorlib.SingleNodeExecutor() as exe:
        inputs = [exe.submit(add_function, i, 0) for i in range(5)]
        inputs.append(exe.submit(raise_error, parameter=0))
        batches = exe.batched(inputs, n=3)
        results = [b.result(timeout=T) for b in batches]
    assert len(results) == 2
    assert sorted(x for batch in results for x in batch) == [0, 1, 2, 3, 4]


def test_gpus_on_an_executor_without_a_gpu_pool_raise_the_type_executorlib_raises():
    with pytest.raises(TypeError) as info:  # executorlib: TypeError; here also a ValueError
        executorlib.SingleNodeExecutor(max_cores=1, resource_dict={"cores": 1,
                                                                   "gpus_per_core": 1})
    assert isinstance(info.value, ValueError) and info.value.key == "gpus_per_core"
    with executorlib.SingleNodeExecutor(max_cores=1) as exe, \
            pytest.raises(TypeError, match="max_gpus"):
        exe.submit(add_function, 1, 2, resource_dict={"gpus_per_core": 1})


def test_combined_dependency_error_pickles():
    with executorlib.SingleNodeExecutor(max_workers=1) as exe:
        bad = exe.submit(raise_error, parameter=1)
        err = exe.submit(add_function, bad, 1).exception(timeout=T)
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, RuntimeError) and isinstance(again, DependencyError)
    assert str(again) == str(err)


# 2 -----------------------------------------------------------------------------------------
def get_worker_id(executorlib_worker_id):
    return executorlib_worker_id


def init_with_id(executorlib_worker_id):
    return {"seen_at_init": executorlib_worker_id}


def both(seen_at_init, executorlib_worker_id):
    return seen_at_init, executorlib_worker_id


def test_worker_id_block_allocation(tmp_path):
    with executorlib.SingleNodeExecutor(max_cores=1, block_allocation=True) as exe:
        assert exe.submit(get_worker_id, resource_dict={}).result(timeout=T) == 0
    with executorlib.SingleNodeExecutor(max_cores=2, block_allocation=True,
                                        init_function=init_with_id) as exe:
        futures = [exe.submit(tf.gate, str(tmp_path), "w", None) for _ in range(2)]
        ids = [exe.submit(both) for _ in range(2)]  # queued behind the gates: one per worker
        tf.release(str(tmp_path), "w")
        [f.result(timeout=T) for f in futures]
        pairs = [f.result(timeout=T) for f in ids]
    assert all(a == b for a, b in pairs) and {b for _, b in pairs} <= {0, 1}


def gated_id(directory, executorlib_worker_id):
    tf.gate(directory, "p")
    return executorlib_worker_id


def test_worker_id_per_task_is_the_slot(tmp_path):
    from conftest import wait_until

    with executorlib.SingleNodeExecutor(max_cores=2) as exe:
        blocker = exe.submit(gated_id, str(tmp_path))
        wait_until(lambda: tf.started(str(tmp_path), "p"))
        other = exe.submit(get_worker_id).result(timeout=T)  # runs beside the blocker
        tf.release(str(tmp_path), "p")
        assert {blocker.result(timeout=T), other} == {0, 1}


# 4 -----------------------------------------------------------------------------------------
def test_len_counts_unfinished_calls_and_the_executor_stays_truthy(tmp_path):
    with executorlib.SingleNodeExecutor(max_workers=1, block_allocation=True) as exe:
        assert exe and len(exe) == 0
        futures = [exe.submit(tf.gate, str(tmp_path), "g", i) for i in range(4)]
        assert len(exe) == 4
        tf.release(str(tmp_path), "g")
        assert [f.result(timeout=T) for f in futures] == [0, 1, 2, 3]
        assert len(exe) == 0 and exe


@pytest.mark.parametrize("block", [False, True])
def test_max_workers_reads_and_resizes(block):
    # executorlib's resize test, with only the import changed (the process counting and
    # the proofs of concurrency are in test_resize.py)
    exe = executorlib.SingleNodeExecutor(max_workers=1, block_allocation=block)
    try:
        futures = [exe.submit(tf.inc, i) for i in range(4)]
        assert exe.max_workers == 1
        exe.max_workers = 2
        assert exe.max_workers == 2 and exe.info["max_workers"] == 2
        assert [f.result(timeout=T) for f in futures] == [1, 2, 3, 4]
        exe.max_workers = 1
        assert [f.result(timeout=T) for f in [exe.submit(tf.inc, i) for i in range(4)]] == \
            [1, 2, 3, 4]
    finally:
        exe.shutdown(wait=True)
    assert exe.max_workers is None


# 5 -----------------------------------------------------------------------------------------
def test_map_waits_for_a_future_of_a_list():
    with executorlib.SingleNodeExecutor(max_workers=2) as exe:
        numbers = exe.submit(list, range(4))
        assert list(exe.map(tf.inc, numbers, timeout=T)) == [1, 2, 3, 4]


# 6 -----------------------------------------------------------------------------------------
def test_cache_key_with_a_subdirectory(tmp_path):
    cache_directory = str(tmp_path / "executorlib_cache")
    with executorlib.SingleNodeExecutor(cache_directory=cache_directory) as exe:
        futures = [exe.submit(sum, [i, i], resource_dict={"cache_key": "same/j" + str(i)})
                   for i in range(1, 4)]
        results = [f.result(timeout=T) for f in futures]
    listed = os.listdir(os.path.join(cache_directory, "same"))  # hidden: the cache's journal
    assert sorted(name for name in listed if not name.startswith(".")) == \
        ["j1.h5", "j2.h5", "j3.h5"]
    data = executorlib.get_cache_data(cache_directory=cache_directory)
    assert all("same" in name for name in data["filename"])
    assert sum(data["output"]) == sum(results)
    assert executorlib.get_future_from_cache(cache_directory, "same/j2").result(timeout=T) == 4
    with executorlib.SingleNodeExecutor(cache_directory=cache_directory) as exe:  # a hit
        again = exe.submit(tf.pid, resource_dict={"cache_key": "same/j1"})
        assert again.result(timeout=T) == 2


@pytest.mark.parametrize("key", ["../up", "/abs/path", "a//b", "a/../b"])
def test_cache_key_leaving_the_directory_is_refused(tmp_path, key):
    with executorlib.SingleNodeExecutor(cache_directory=str(tmp_path)) as exe, \
            pytest.raises(ValueError, match="cache_key"):
        exe.submit(sum, [1], resource_dict={"cache_key": key})


# 7 -----------------------------------------------------------------------------------------
def test_get_future_from_cache_missing_and_failed(tmp_path):
    cache_directory = str(tmp_path)
    with pytest.raises(FileNotFoundError):
        executorlib.get_future_from_cache(cache_directory=cache_directory, cache_key="nothing")
    with executorlib.SingleNodeExecutor(cache_directory=cache_directory) as exe, \
            pytest.raises(ValueError):
        exe.submit(get_error, a=1, resource_dict={"cache_key": "err"}).result(timeout=T)
    with pytest.raises(ValueError):
        executorlib.get_future_from_cache(cache_directory=cache_directory, cache_key="err")


# 10 ----------------------------------------------------------------------------------------
def test_info_is_a_property_and_terminate_task_in_cache_exists():
    with executorlib.SingleNodeExecutor(max_workers=2) as exe:
        assert exe.submit(tf.inc, 1).result(timeout=T) == 2
        info = exe.info
    assert info["max_workers"] == 2 and info["done"] == 1 and info["cache_directory"] is None
    assert callable(executorlib.terminate_task_in_cache)
    assert callable(executorlib.terminate_tasks_in_cache)


# 11 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [False, True])
def test_function_with_its_own_resource_dict_parameter_is_refused(block):
    with executorlib.SingleNodeExecutor(max_cores=1, block_allocation=block) as exe, \
            pytest.raises(ValueError, match="resource_dict"):
        exe.submit(takes_resource_dict, resource_dict={})


# 9 -----------------------------------------------------------------------------------------
SUBMISSION_TEMPLATE = """\
#!/bin/bash
#SBATCH --job-name={{job_name}}
#SBATCH --chdir={{working_directory}}
#SBATCH --ntasks={{cores}}
# my site's own line
{{command}}
"""


def test_submission_template_fills_the_job_script(tmp_path):
    from executorkit.launchers.queue import job_script
    from executorkit.resources import parse

    res = parse({"cores": 2, "cwd": str(tmp_path), "submission_template": SUBMISSION_TEMPLATE})
    script = job_script(res, input_file="/x/in.pkl", env=[("OMP_NUM_THREADS", "1")],
                        pmi_mode="pmi2", job_name="k1")
    assert script.startswith("#!/bin/bash\n#SBATCH --job-name=k1\n")
    assert f"#SBATCH --chdir={tmp_path}\n#SBATCH --ntasks=2\n# my site's own line\n" in script
    assert "export OMP_NUM_THREADS=1\nexec srun --ntasks=2" in script
    assert "executorkit.worker.file_task /x/in.pkl" in script


def test_submission_template_and_pysqa_config_directory_elsewhere_are_clear_errors(tmp_path):
    with executorlib.SingleNodeExecutor(max_workers=1) as exe, \
            pytest.raises(ValueError, match=r"submission_template.*SlurmClusterExecutor"):
        exe.submit(tf.inc, 1, resource_dict={"submission_template": SUBMISSION_TEMPLATE})
    with pytest.raises(ValueError, match=r"pysqa_config_directory.*submission_template"):
        executorlib.SlurmClusterExecutor(cache_directory=str(tmp_path),
                                         pysqa_config_directory=str(tmp_path))


# newer executorlib resource_dict keys: timeout, run_time_limit, restart_limit ----------------
@pytest.mark.parametrize("block", [False, True])
@pytest.mark.parametrize("key", ["timeout", "run_time_limit"])
def test_timeout_keys_fail_the_call_with_a_timeout_error(block, key):
    with executorlib.SingleNodeExecutor(max_workers=1, block_allocation=block) as exe:
        slow = exe.submit(tf.sleep_forever, resource_dict={key: 1})
        with pytest.raises(TimeoutError, match="run_time_max=1"):  # executorlib: TimeoutError
            slow.result(timeout=T)
        assert exe.submit(tf.inc, 1).result(timeout=T) == 2  # the pool carries on


def test_timeout_aliases_are_run_time_max_and_clash_clearly():
    from executorkit.errors import ResourceError
    from executorkit.resources import parse

    assert parse({"timeout": 5}).run_time_max == 5.0
    assert parse({"run_time_limit": 7}).run_time_max == 7.0
    for clash in ({"timeout": 1, "run_time_max": 2}, {"timeout": 1, "run_time_limit": 1}):
        with pytest.raises(ResourceError, match="twice"):
            parse(clash)
    with pytest.raises(ResourceError, match=r"resource_dict\['timeout'\]") as info:
        parse({"timeout": -1})
    assert info.value.key == "timeout"


@pytest.mark.parametrize("limit", [0, 1])
def test_restart_limit_in_the_executor_resource_dict(limit):
    from executorkit.errors import ExecutorBrokenError, WorkerDiedError

    given = {"restart_limit": limit}
    with executorlib.SingleNodeExecutor(max_workers=1, block_allocation=True,
                                        resource_dict=given) as exe:
        with pytest.raises(WorkerDiedError):
            exe.submit(tf.exit_now, 3).result(timeout=T)
        if limit == 0:  # the one worker died and may not be replaced: the executor is broken
            with pytest.raises(ExecutorBrokenError, match="restart_limit=0"):
                exe.submit(tf.inc, 1).result(timeout=T)
        else:  # replaced once
            assert exe.submit(tf.inc, 1).result(timeout=T) == 2
    assert given == {"restart_limit": limit}  # the user's dict is not changed


def test_restart_limit_is_refused_per_call_and_when_given_twice():
    from executorkit.errors import ResourceError

    with executorlib.SingleNodeExecutor(max_workers=1) as exe:
        with pytest.raises(ResourceError, match="whole executor") as info:
            exe.submit(tf.inc, 1, resource_dict={"restart_limit": 1})
        assert info.value.key == "restart_limit"
    with pytest.raises(ResourceError, match="give it once"):
        executorlib.SingleNodeExecutor(restart_limit=3, resource_dict={"restart_limit": 2})


# 12 ----------------------------------------------------------------------------------------
# A function from a module the driver imports through its own sys.path (the directory of
# the script, a test runner's rootdir, sys.path.append in a notebook) runs in the workers
# too: executorlib pickles such a caller's module by value, we hand the workers the path.
HELPER_SOURCE = """\
def scaled(x):
    return 10 * x


def rank_and_size(x):
    from mpi4py import MPI

    return x, MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
"""


@pytest.fixture
def helper_module(tmp_path):
    """A module importable only through an entry the driver added to sys.path."""
    import importlib
    import sys

    directory = tmp_path / "on_driver_path_only"
    directory.mkdir()
    name = f"helpers_{os.getpid()}_{abs(hash(str(tmp_path)))}"
    (directory / f"{name}.py").write_text(HELPER_SOURCE)
    sys.path.append(str(directory))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop(name, None)


@pytest.mark.parametrize("block", [False, True])
def test_function_from_a_module_on_the_drivers_path_runs_in_workers(helper_module, block):
    assert str(os.path.dirname(helper_module.__file__)) not in os.environ["PYTHONPATH"]
    with executorlib.SingleNodeExecutor(max_workers=2, block_allocation=block) as exe:
        assert exe.submit(helper_module.scaled, 4).result(timeout=T) == 40
        assert list(exe.map(helper_module.scaled, [1, 2], timeout=T)) == [10, 20]


@pytest.mark.mpi
def test_mpi_ranks_import_a_module_on_the_drivers_path(helper_module):
    capabilities.require("mpi")
    with executorlib.SingleNodeExecutor(max_cores=2) as exe:
        fut = exe.submit(helper_module.rank_and_size, 7, resource_dict={"cores": 2})
        assert fut.result(timeout=T) == [(7, 0, 2), (7, 1, 2)]


@pytest.mark.slurm
def test_batch_job_imports_a_module_on_the_drivers_path(helper_module, tmp_path):
    capabilities.require("slurm")
    with executorlib.SlurmClusterExecutor(cache_directory=str(tmp_path / "cache")) as exe:
        assert exe.submit(helper_module.scaled, 5).result(timeout=180) == 50


def test_worker_pythonpath_adds_only_what_a_fresh_interpreter_lacks(helper_module):
    import site

    from executorkit.launchers.pythonpath import worker_pythonpath

    directory = os.path.dirname(helper_module.__file__)
    entries = worker_pythonpath({"PYTHONPATH": "/first"}).split(os.pathsep)
    assert entries[0] == "/first" and directory in entries
    assert not set(site.getsitepackages()) & set(entries)  # stays behind the stdlib


# 13 ----------------------------------------------------------------------------------------
def calls_exit(code):
    import sys

    sys.exit(code)


def exit_at_init():
    import sys

    sys.exit()


@pytest.mark.parametrize("block", [False, True])
def test_sys_exit_in_a_task_fails_its_future_and_never_exits_the_driver(block):
    from executorkit.errors import WorkerDiedError

    with executorlib.SingleNodeExecutor(max_workers=1, block_allocation=block) as exe:
        fut = exe.submit(calls_exit, 3)
        with pytest.raises(RuntimeError, match=r"calls_exit called sys.exit\(3\)") as info:
            fut.result(timeout=T)  # executorlib: ExecutorlibSocketError, a RuntimeError
        assert isinstance(info.value, WorkerDiedError) and info.value.exitcode == 3
        assert isinstance(info.value.__context__, SystemExit)
        assert exe.submit(tf.inc, 1).result(timeout=T) == 2  # the executor goes on
        dependent = exe.submit(tf.inc, exe.submit(calls_exit, None))
        with pytest.raises(RuntimeError, match=r"sys.exit\(\)"):
            dependent.result(timeout=T)


def test_sys_exit_in_init_function_is_a_runtime_error():
    with pytest.raises(RuntimeError, match=r"init_function called sys.exit"), \
            executorlib.SingleNodeExecutor(max_workers=1, block_allocation=True,
                                           init_function=exit_at_init) as exe:
        exe.submit(sum, [1, 1]).result(timeout=T)


# 14 ----------------------------------------------------------------------------------------
class _QueueWithOneJob:
    """Slurm as a driver sees it right after the last run: one job of this key and this
    cache directory, in the given state."""

    def __init__(self, state: str, script: str):
        self.state, self.script = state, script

    def jobs_by_name(self):
        return {"k": ("41", self.state, "None", self.script)}

    def cancel(self, job_ids):
        raise AssertionError(f"nothing to cancel: {job_ids}")


@pytest.mark.parametrize(("state", "attached"), [("COMPLETING", None), ("COMPLETED", None),
                                                 ("RUNNING", "41"), ("PENDING", "41")])
def test_rerun_does_not_attach_to_a_job_that_has_ended(tmp_path, state, attached):
    # `rm -rf cache; python script.py` right after the last run: that run's job may still be
    # COMPLETING (its epilog); waiting on it would fail "ended COMPLETED without a result".
    exe = executorlib.SlurmClusterExecutor(cache_directory=str(tmp_path))
    try:
        exe._queue = _QueueWithOneJob(state, str(tmp_path / "k.sh"))
        assert exe._attach("k") == attached
    finally:
        exe.shutdown(wait=True)


def test_sys_exit_in_a_task_is_also_the_stdlib_pool_s_system_exit(tmp_path):
    # ProcessPoolExecutor re-raises SystemExit; executorlib users catch RuntimeError: both work.
    from executorkit.errors import TaskExitError

    with executorlib.SingleNodeExecutor(max_workers=1) as exe:
        fut = exe.submit(calls_exit, 3)
        with pytest.raises(SystemExit) as info:
            fut.result(timeout=T)
        assert isinstance(info.value, RuntimeError) and isinstance(info.value, TaskExitError)
        dependent = exe.submit(str, fut)
        with pytest.raises(RuntimeError) as dep_info:
            dependent.result(timeout=T)
        assert not isinstance(dep_info.value, SystemExit)  # only the call that exited
    # Left uncaught, it ends a script loudly (message printed, exit status 1), not silently.
    script = tmp_path / "exits.py"
    script.write_text(
        "import sys\nfrom executorkit import SingleNodeExecutor\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_dropin import calls_exit\n"
        "if __name__ == '__main__':\n"
        "    with SingleNodeExecutor(max_workers=1) as exe:\n"
        "        exe.submit(calls_exit, 0).result(timeout=60)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert "calls_exit called sys.exit(0)" in proc.stderr


def _wrapping(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def test_worker_id_reaches_wrapped_functions_and_only_those_that_name_it():
    # The worker decides from a plain function's code whether it names the parameter; a
    # wrapper (functools.wraps) has its wrapped function's signature, so it is asked too.
    from executorkit.worker._call import _may_take_worker_id

    wrapped = _wrapping(get_worker_id)
    assert _may_take_worker_id(get_worker_id) and _may_take_worker_id(wrapped)
    assert not _may_take_worker_id(tf.inc) and not _may_take_worker_id(tf.add)

    def plain(x):
        return x

    # (deciding never creates a function's __dict__: in a forked worker, a write to the
    # function's page and a new object)
    assert not _may_take_worker_id(plain)
    assert not [r for r in gc.get_referents(plain) if type(r) is dict
                and r is not plain.__globals__ and r is not plain.__builtins__]
    with executorlib.SingleNodeExecutor(max_cores=1) as exe:
        assert exe.submit(wrapped).result(timeout=T) == 0
        assert exe.submit(tf.add, 1, 2).result(timeout=T) == 3
