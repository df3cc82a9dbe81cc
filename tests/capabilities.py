"""What the test suite needs from the machine, probed once, in one list.

Each capability has a probe that returns ``None`` when it is there, else why it is missing.
Tests that need one skip through :func:`skip_unless` (a mark) or :func:`require` (inside a
test), so every such skip reason starts with ``needs <name>:``.

On a developer's laptop a missing backend is a skip. Under CI (``CI`` set in the environment,
as ``bash .ci/run`` does) every capability in :data:`REQUIRED_IN_CI` must be there: a CI
machine that lacks one would otherwise report green while whole suites never ran. Two
guards enforce that, from this one list:

* ``python tests/capabilities.py`` (run by ``.ci_support/test.sh``) names every missing
  capability and, under CI, exits non-zero before pytest starts;
* ``conftest.py`` turns, under CI, any skip of a required capability (by reason, by a
  ``mpi``/``slurm``/... marker, or a failed ``importorskip``) into a failure.

Adding a backend is one probe in :data:`PROBES` and its name in REQUIRED_IN_CI.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest


def _missing_modules(*names: str) -> str | None:
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    return f"module(s) {', '.join(missing)} not installed" if missing else None


def _probe_mpi() -> str | None:
    from executorkit.launchers.local import find_mpiexec

    if find_mpiexec() is None:
        return "no mpiexec beside the interpreter or on PATH (pip install mpich)"
    return _missing_modules("mpi4py")


def _probe_slurm() -> str | None:
    if shutil.which("salloc") is None:
        return "salloc not found (Slurm not installed; .ci_support/start-slurm.sh sets it up)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s in ("idle", "mix", "alloc") for s in states):
        return f"no usable Slurm node (sinfo: {out.stdout.strip() or out.stderr.strip()})"
    return None


def _probe_flux() -> str | None:
    """A Flux installation: ``flux`` on PATH and its Python bindings importable. The Flux
    tests also need a running broker; .ci_support/test.sh runs them inside ``flux start``
    (and the main run, outside any instance, leaves them out)."""
    if shutil.which("flux") is None:
        return "no flux on PATH (.ci_support/install-flux.sh builds flux-core)"
    try:
        from executorkit.launchers.flux import import_flux

        import_flux()
    except Exception as exc:
        return f"the flux Python bindings do not import: {exc}"
    return None


def _probe_cache() -> str | None:
    return _missing_modules("h5py", "pandas")


def _probe_numpy() -> str | None:
    return _missing_modules("numpy")


# name -> probe. A name that is also a pytest marker (mpi, slurm, flux) makes every test
# with that marker required under CI as well.
PROBES: dict[str, Callable[[], str | None]] = {
    "mpi": _probe_mpi,
    "slurm": _probe_slurm,
    "flux": _probe_flux,
    "cache": _probe_cache,
    "numpy": _probe_numpy,
}
REQUIRED_IN_CI: tuple[str, ...] = ("mpi", "slurm", "flux", "cache", "numpy")


@functools.cache
def missing(name: str) -> str | None:
    """Why capability ``name`` is missing on this machine, or None if it is there."""
    return PROBES[name]()


def reason(name: str) -> str:
    return f"needs {name}: {missing(name)}"


def skip_unless(name: str) -> pytest.MarkDecorator:
    """A mark that skips a test (or a module, as ``pytestmark``) without ``name``."""
    return pytest.mark.skipif(missing(name) is not None, reason=reason(name))


def require(name: str) -> None:
    """Skip the running test when ``name`` is missing."""
    if missing(name) is not None:
        pytest.skip(reason(name))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def required_skip(skip_reason: str, markers: set[str]) -> str | None:
    """The required capability a skip stands for (under CI that is a failure), or None."""
    for name in REQUIRED_IN_CI:
        if skip_reason.startswith(f"needs {name}:") or name in markers:
            return name
    if "could not import" in skip_reason:  # pytest.importorskip
        return "an importable module"
    return None


def main() -> int:
    """Name every missing capability; under CI that is an error, elsewhere a notice."""
    absent = {name: missing(name) for name in REQUIRED_IN_CI}
    absent = {name: why for name, why in absent.items() if why is not None}
    verdict = "prerequisite missing" if in_ci() else "not here (its tests will skip)"
    for name, why in absent.items():
        print(f"{verdict}: {name}: {why}", file=sys.stderr)
    if not absent:
        print(f"prerequisites: all present ({', '.join(REQUIRED_IN_CI)})")
    return 1 if absent and in_ci() else 0


if __name__ == "__main__":
    sys.exit(main())
