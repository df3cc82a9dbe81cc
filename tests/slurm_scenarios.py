"""Scenarios run inside a Slurm allocation by test_slurm.py: ``python slurm_scenarios.py NAME``.

Each prints one JSON line with what it observed; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import taskfuncs as tf

from executorkit import SlurmJobExecutor
from executorkit.errors import TaskTimeoutError, WorkerDiedError

T = 120


def step_info(x):
    return {"x": x, "step": os.environ.get("SLURM_STEP_ID"),
            "cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK"),
            "omp": os.environ.get("OMP_NUM_THREADS"), "ntasks": os.environ.get("SLURM_NTASKS")}


def concurrent_steps() -> dict:
    with tempfile.TemporaryDirectory() as d, SlurmJobExecutor() as exe:
        gates = [exe.submit(tf.gate_env, d, f"s{i}", "SLURM_STEP_ID") for i in range(3)]
        from conftest import wait_until

        wait_until(lambda: all(tf.started(d, f"s{i}") for i in range(3)), timeout=60)
        steps = [tf.read(os.path.join(d, f"s{i}.env")) for i in range(3)]
        for i in range(3):
            tf.release(d, f"s{i}")
        for g in gates:
            g.result(timeout=T)
        return {"pool": exe.max_cores, "steps": steps,
                "threads": exe.submit(step_info, 1,
                                      resource_dict={"threads_per_core": 2}).result(timeout=T),
                "chain": exe.submit(tf.inc, exe.submit(tf.inc, 1)).result(timeout=T)}


def mpi() -> dict:
    with SlurmJobExecutor() as exe:
        ranks = exe.submit(tf.mpi_ranks, "m", resource_dict={"cores": 2}).result(timeout=T)
        try:
            exe.submit(tf.mpi_fail_on, 1, resource_dict={"cores": 2}).result(timeout=T)
            failure = None
        except ValueError as err:
            failure = [str(err), "[rank 1 of 2]" in err.__cause__.tb]
        return {"ranks": [r[:2] for r in ranks], "failure": failure}


def errors() -> dict:
    with SlurmJobExecutor() as exe:
        out = {}
        try:
            exe.submit(tf.sleep_forever, resource_dict={"run_time_max": 2}).result(timeout=T)
        except TaskTimeoutError as err:
            out["timeout"] = str(err)
        try:
            exe.submit(tf.exit_now, 3).result(timeout=T)
        except WorkerDiedError as err:
            out["died"] = str(err)
        try:
            exe.submit(tf.fail, "boom").result(timeout=T)
        except ValueError as err:
            out["raised"] = [str(err), "in fail" in err.__cause__.tb]
        out["after"] = exe.submit(tf.inc, 1).result(timeout=T)
        return out


def block() -> dict:
    def init():
        return {"state": "warm"}

    with SlurmJobExecutor(max_workers=2, block_allocation=True, init_function=init) as exe:
        futs = [exe.submit(tf.with_state, i) for i in range(50)]
        results = [f.result(timeout=T) for f in futs]
        steps = {exe.submit(step_info, 0).result(timeout=T)["step"] for _ in range(6)}
        return {"ok": results == [(i, "warm", None) for i in range(50)], "steps": len(steps)}


def cancel() -> dict:
    with tempfile.TemporaryDirectory() as d, SlurmJobExecutor() as exe:
        fut = exe.submit(tf.gate, d, "c")
        from conftest import wait_until

        wait_until(lambda: tf.started(d, "c"), timeout=60)
        pid = int(tf.read(os.path.join(d, "c.started")))
        cancelled = fut.cancel()
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=30)
        return {"cancelled": cancelled, "after": exe.submit(tf.inc, 2).result(timeout=T)}


def nested() -> dict:
    with SlurmJobExecutor() as exe:
        outer = [exe.submit(tf.inner_job_executor, 2) for _ in range(2)]
        return {"results": [f.result(timeout=T) for f in outer]}


if __name__ == "__main__":
    print("RESULT " + json.dumps(globals()[sys.argv[1]]()), flush=True)
