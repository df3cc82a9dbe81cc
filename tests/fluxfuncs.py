"""Task functions of the Flux tests (workers import them by name)."""

from __future__ import annotations

import os
import subprocess
import sys


def where():
    """(broker rank of the node this runs on, CPUs it may use, its Flux job id)."""
    import flux

    rank = int(flux.Flux().attr_get("rank"))
    return rank, len(os.sched_getaffinity(0)), os.environ.get("FLUX_JOB_ID")


def mpi_where():
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), where()


def job_id_to(path):
    """Write this call's Flux job id to ``path``, then wait to be stopped."""
    import time

    with open(path + ".tmp", "w") as fh:
        fh.write(os.environ["FLUX_JOB_ID"])
    os.replace(path + ".tmp", path)
    while True:
        time.sleep(1)


def job_field(field):
    """A field of this call's own Flux job (``flux jobs -o {field}``)."""
    out = subprocess.run(["flux", "jobs", "-n", "-o", "{" + field + "}",
                          os.environ["FLUX_JOB_ID"]], capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip()


def shout_and_exit(code):
    print("to stdout before dying", flush=True)
    print("the last words on stderr", file=sys.stderr, flush=True)
    os._exit(code)


def inner_flux(n, nest_again=False):
    """Open a FluxJobExecutor inside the call (a nested instance) and run n calls there."""
    from executorkit import FluxJobExecutor

    with FluxJobExecutor(flux_executor_nesting=nest_again) as inner:
        if nest_again:
            deeper = inner.submit(inner_flux, 1, resource_dict={"cores": 1})
            return inner.max_cores, deeper.result(timeout=240)
        futs = [inner.submit(where) for _ in range(n)]
        return inner.max_cores, [f.result(timeout=120) for f in futs]


def instance_size():
    import flux
    import flux.resource

    up = flux.resource.resource_list(flux.Flux()).get().up
    return up.ncores, up.nnodes
