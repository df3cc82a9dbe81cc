"""Scenarios run inside a Slurm allocation by test_slurm.py: ``python slurm_scenarios.py NAME``.

Each prints one JSON line with what it observed; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
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


STUBBORN = 'trap "" TERM; echo $$ > {d}/pid.$SLURM_PROCID; while true; do sleep 0.05; done'


def _gone(path: str) -> bool:
    with open(path) as fh:
        pid = int(fh.read())
    return not os.path.exists(f"/proc/{pid}")


def commands() -> dict:
    """Programs as steps: cores=1 inside its worker's step; cores=2 as ``srun -n 2 prog``."""
    from conftest import wait_until

    from executorkit import Command, CommandError

    out: dict = {}
    with tempfile.TemporaryDirectory() as d, \
            SlurmJobExecutor(cache_directory=os.path.join(d, "cache")) as exe:
        one = exe.submit(Command(["sh", "-c", "echo step $SLURM_STEP_ID tasks $SLURM_NTASKS"]),
                         resource_dict={"cwd": d}).result(timeout=T)
        out["one"] = [one.stdout.split()[0], one.stdout.split()[-1], one.args[0]]
        two = exe.submit(Command(["sh", "-c", "echo rank $SLURM_PROCID of $SLURM_NTASKS"]),
                         resource_dict={"cores": 2, "cwd": d}).result(timeout=T)
        out["two"] = sorted(two.stdout.splitlines())
        out["two_args"] = two.args[:3]
        script = 'if [ "$SLURM_PROCID" = 1 ]; then echo rank one failed >&2; exit 4; fi'
        try:
            exe.submit(Command(["sh", "-c", script]),
                       resource_dict={"cores": 2, "cwd": d}).result(timeout=T)
        except CommandError as err:
            out["rank_failed"] = [err.returncode != 0, "rank one failed" in str(err)]
        try:
            exe.submit(Command(["sh", "-c", STUBBORN.format(d=d)]),
                       resource_dict={"cores": 2, "run_time_max": 3, "cwd": d}).result(timeout=T)
        except TaskTimeoutError as err:
            out["timeout"] = str(err)
        pids = [os.path.join(d, f"pid.{r}") for r in (0, 1)]
        wait_until(lambda: all(os.path.exists(p) for p in pids), timeout=60)
        wait_until(lambda: all(_gone(p) for p in pids), timeout=60)
        out["stubborn_gone"] = True
        out["after"] = exe.submit(tf.inc, 1).result(timeout=T)
        # killed unless its step has two CPUs: succeeds only after escalation
        escalated = 'test "$SLURM_CPUS_PER_TASK" = 2 || kill -9 $$; echo fine'
        out["escalated"] = exe.submit(Command(["sh", "-c", escalated]), resource_dict={
            "max_retries": 1, "retry_escalation": {"threads_per_core": 2}, "cwd": d,
        }).result(timeout=T).stdout
        exe.shutdown(wait=True)
        from executorkit import campaign_report
        from executorkit.cli._status import read_status

        status = read_status(os.path.join(d, "cache"))
        out["status"] = [status["closed"], status["counts"]["done"], status["counts"]["failed"]]
        out["report"] = campaign_report(os.path.join(d, "cache")).counts()
    return out


def _steps() -> set[str]:
    """Step ids of this allocation that Slurm still lists."""
    out = subprocess.run(["squeue", "-h", "-s", "-j", os.environ["SLURM_JOB_ID"], "-o", "%i"],
                         capture_output=True, text=True, timeout=60).stdout
    return {line.split(".", 1)[1] for line in out.split() if "." in line}


def _boot_files(directory: str) -> list[str]:
    return [os.path.join(root, f) for root, _, files in os.walk(directory)
            for f in files if f == "boot.pkl"]


def orphan_driver(directory: str) -> None:
    """A driver with a running per-task step and a busy block-allocation step; it waits
    until it is killed."""
    per_task = SlurmJobExecutor(max_workers=1)
    block = SlurmJobExecutor(max_workers=1, block_allocation=True)
    calls = [per_task.submit(tf.gate_env, directory, "p", "SLURM_STEP_ID"),
             block.submit(tf.gate_env, directory, "b", "SLURM_STEP_ID")]
    for call in calls:
        call.result(timeout=3600)


def _driver_killed(signum: int) -> dict:
    from conftest import wait_until

    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as runs:
        env = {**os.environ, "EXECUTORKIT_TMPDIR": runs}
        driver = subprocess.Popen([sys.executable, os.path.abspath(__file__), "orphan_driver",
                                   d], env=env)
        try:
            wait_until(lambda: tf.started(d, "p") and tf.started(d, "b"), timeout=120)
            pids = [int(tf.read(os.path.join(d, f"{n}.started"))) for n in ("p", "b")]
            steps = {tf.read(os.path.join(d, f"{n}.env")) for n in ("p", "b")}
            running = steps <= _steps()
            driver.send_signal(signum)
            driver.wait(timeout=120)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), timeout=120)
        wait_until(lambda: not steps & _steps(), timeout=120)
        # (this scenario, still inside the allocation, goes on to print its result)
        return {"status": driver.returncode, "steps_were_running": running,
                "boot_files": _boot_files(runs), "run_dirs": os.listdir(runs)}


def driver_sigkilled() -> dict:
    return _driver_killed(signal.SIGKILL)


def driver_sigterm() -> dict:
    return _driver_killed(signal.SIGTERM)


def boot_files_after_exit() -> dict:
    with tempfile.TemporaryDirectory() as runs:
        os.environ["EXECUTORKIT_TMPDIR"] = runs
        with SlurmJobExecutor(max_workers=2) as exe:
            assert exe.submit(tf.inc, 1).result(timeout=T) == 2
            during = _boot_files(runs)  # the worker removed its own once it had read it
        return {"during": during, "after": os.listdir(runs)}


def syspath() -> dict:
    """Functions of a module found only through a path added at run time, in steps."""
    out = {}
    with tempfile.TemporaryDirectory() as d, SlurmJobExecutor(max_workers=2) as per_task, \
                SlurmJobExecutor(max_workers=1, block_allocation=True) as block:
        out["warm"] = block.submit(tf.inc, 1).result(timeout=T)  # worker already up
        name = f"light_{os.getpid()}"
        with open(os.path.join(d, f"{name}.py"), "w") as fh:
            fh.write("def spin(x):\n    return x * 2\n")
        sys.path.insert(0, d)
        light = __import__(name)
        out["per_task"] = per_task.submit(light.spin, 1).result(timeout=T)
        out["block"] = block.submit(light.spin, 2).result(timeout=T)
        out["mpi"] = per_task.submit(light.spin, 3,
                                     resource_dict={"cores": 2}).result(timeout=T)
    return out


if __name__ == "__main__":
    if sys.argv[1] == "orphan_driver":
        orphan_driver(sys.argv[2])
        sys.exit(0)
    print("RESULT " + json.dumps(globals()[sys.argv[1]]()), flush=True)
