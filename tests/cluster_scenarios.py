"""Driver scripts for the cluster executor tests:
``python cluster_scenarios.py NAME CACHE DIR [slurm|flux [FLUX_URI]]``."""

from __future__ import annotations

import json
import sys
import threading

import taskfuncs as tf

T = 180


def _executor(cache: str, backend: str, uri: str | None):
    if backend == "flux":
        from executorkit import FluxClusterExecutor

        return FluxClusterExecutor(cache_directory=cache, flux_uri=uri)
    from executorkit import SlurmClusterExecutor

    return SlurmClusterExecutor(cache_directory=cache, poll_interval=0.2)


def start_gated(cache: str, d: str, backend: str = "slurm", uri: str | None = None) -> dict:
    """Submit a call that waits for a release file, then leave without waiting."""
    exe = _executor(cache, backend, uri)
    fut = exe.submit(tf.counted_gate, d, 5)
    job = fut._job.job_id
    exe.shutdown(wait=False)
    return {"job": job}


def start_and_hang(cache: str, d: str, backend: str = "slurm", uri: str | None = None) -> None:
    """Submit the gated call, say its job id, then wait to be killed."""
    exe = _executor(cache, backend, uri)
    fut = exe.submit(tf.counted_gate, d, 5)
    print("JOB " + json.dumps(fut._job.job_id), flush=True)
    threading.Event().wait()


def reattach(cache: str, d: str, backend: str = "slurm", uri: str | None = None) -> dict:
    exe = _executor(cache, backend, uri)
    fut = exe.submit(tf.counted_gate, d, 5)
    job = fut._job.job_id
    tf.release(d, "cg")
    value = fut.result(timeout=T)
    exe.shutdown(wait=True)
    return {"job": job, "value": value}


if __name__ == "__main__":
    print("RESULT " + json.dumps(globals()[sys.argv[1]](*sys.argv[2:])), flush=True)
