"""``executorkit info``: what this machine offers (CPUs, GPUs, Slurm, Flux, MPI, versions)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from typing import Any


def _probe(argv: list[str]) -> tuple[bool, str]:
    """(usable, first line of output) of a short command; never raises."""
    if shutil.which(argv[0]) is None:
        return False, f"{argv[0]} not found"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"{argv[0]} failed: {exc}"
    text = (proc.stdout or proc.stderr).strip().splitlines()
    first = text[0] if text else ""
    return proc.returncode == 0, first


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def facts() -> dict[str, Any]:
    from executorkit import __version__
    from executorkit.executors._base import gpu_pool, gpu_variable
    from executorkit.launchers.local import find_mpiexec, mpi_flavor

    cpus = sorted(os.sched_getaffinity(0))
    granted = os.environ.get("EXECUTORKIT_CPUS")
    gpus = gpu_pool(None)
    slurm_ok, slurm_text = _probe(["sinfo", "--version"])
    if slurm_ok:
        slurm_ok, cluster = _probe(["sinfo", "-h", "-o", "%P %a %D %C"])
        slurm_text += f"; partitions: {cluster or 'none'}"
    if "SLURM_JOB_ID" in os.environ:
        slurm_text += f"; inside job {os.environ['SLURM_JOB_ID']}"
    flux_ok, flux_text = _probe(["flux", "getattr", "size"])
    if flux_ok:
        flux_text = f"broker reachable (size {flux_text})"
    mpiexec = find_mpiexec()
    return {
        "cpus": f"{len(cpus)} usable ({_ranges(cpus)})"
                + (f"; inside a task granted {granted}" if granted else ""),
        "gpus": f"{len(gpus)} ({gpu_variable()}={','.join(map(str, gpus)) or 'none'})",
        "slurm": ("usable: " if slurm_ok else "not usable: ") + slurm_text,
        "flux": ("usable: " if flux_ok else "not usable: ") + flux_text,
        "mpiexec": f"{mpiexec} ({mpi_flavor(mpiexec)})" if mpiexec else "not found",
        "mpi4py": _version("mpi4py") if importlib.util.find_spec("mpi4py") else "not installed",
        "python": f"{platform.python_version()} ({sys.executable})",
        "executorkit": __version__,
        **{name: _version(name) for name in
           ("cloudpickle", "h5py", "pandas", "numpy", "tqdm", "flux-python")},
    }


def _ranges(ids: list[int]) -> str:
    """``0-3,6`` for [0, 1, 2, 3, 6]."""
    parts: list[str] = []
    start = prev = None
    for i in [*ids, None]:
        if start is not None and (i is None or i != prev + 1):  # type: ignore[operator]
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ",".join(parts)


def info() -> int:
    table = facts()
    width = max(map(len, table))
    for key, value in table.items():
        print(f"{key:<{width}}  {value}")
    return 0
