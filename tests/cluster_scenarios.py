"""Driver scripts for test_slurm_cluster.py: ``python cluster_scenarios.py NAME CACHE DIR``."""

from __future__ import annotations

import json
import sys

import taskfuncs as tf

from executorkit import SlurmClusterExecutor

T = 180


def start_gated(cache: str, d: str) -> dict:
    """Submit a call that waits for a release file, then leave without waiting."""
    exe = SlurmClusterExecutor(cache_directory=cache, poll_interval=0.2)
    fut = exe.submit(tf.counted_gate, d, 5)
    job = fut._job.job_id
    exe.shutdown(wait=False)
    return {"job": job}


def reattach(cache: str, d: str) -> dict:
    exe = SlurmClusterExecutor(cache_directory=cache, poll_interval=0.2)
    fut = exe.submit(tf.counted_gate, d, 5)
    job = fut._job.job_id
    tf.release(d, "cg")
    value = fut.result(timeout=T)
    exe.shutdown(wait=True)
    return {"job": job, "value": value}


if __name__ == "__main__":
    print("RESULT " + json.dumps(globals()[sys.argv[1]](*sys.argv[2:])), flush=True)
