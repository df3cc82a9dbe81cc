"""executorlib code with only the import changed (``import executorkit as executorlib``).

One test (or a few) per point of the drop-in issue: what a migrating user wrote against
executorlib must work here, or hit a documented, deliberate difference (docs/migration.md).
"""

from __future__ import annotations

import os
import pickle

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
def test_max_workers_reads_and_refuses_resizing(block):
    exe = executorlib.SingleNodeExecutor(max_workers=2, block_allocation=block)
    try:
        assert exe.max_workers == 2
        with pytest.raises(NotImplementedError, match="max_workers"):
            exe.max_workers = 1
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
    assert sorted(os.listdir(os.path.join(cache_directory, "same"))) == \
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
