"""Workers import what the driver imports: the driver's own ``sys.path`` entries reach them.

A function defined in an importable module is pickled by reference (module and name), so the
worker must be able to import that module. A fresh interpreter's ``sys.path`` is its script
directory, ``PYTHONPATH``, the standard library and site-packages (with their ``.pth``
files); the driver's often holds more: the directory of the script it runs, what a test
runner or a notebook inserted, ``sys.path.append(...)`` in user code. Without those entries
a worker fails with ``ModuleNotFoundError`` on a function the driver imported without
trouble (executorlib avoids this by pickling its caller's module by value; multiprocessing's
spawn hands the child the parent's ``sys.path``).

We hand the workers exactly the entries a fresh interpreter would miss, through
``PYTHONPATH``, which every kind of worker inherits: forked ones, mpiexec ranks, srun steps
and batch jobs. What a fresh interpreter has is asked of one, once per ``PYTHONPATH`` value
(about 50 ms); the entries it already has are left where it puts them, so nothing from a
``.pth`` file or site-packages moves ahead of the standard library (an entry the driver
appended at the end does: ``PYTHONPATH`` is searched first).
"""

from __future__ import annotations

import ast
import functools
import logging
import os
import subprocess
import sys
from collections.abc import Mapping

log = logging.getLogger("executorkit")

_PROBE = "import sys; print(repr(sys.path[1:]))"  # [0] is the probe's own directory


@functools.cache
def _fresh_path(pythonpath: str | None) -> frozenset[str] | None:
    """``sys.path`` of a fresh interpreter given this ``PYTHONPATH`` (None if it cannot say)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                             text=True, timeout=60, check=True, stdin=subprocess.DEVNULL)
        entries = ast.literal_eval(out.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError, SyntaxError) as exc:
        log.warning("could not ask %s for its sys.path (%s): workers get only PYTHONPATH",
                    sys.executable, exc)
        return None
    return frozenset(os.path.abspath(p) for p in entries)


def missing_entries(pythonpath: str | None) -> list[str]:
    """The driver's ``sys.path`` directories, in order, that a fresh worker would lack."""
    fresh = _fresh_path(pythonpath)
    if fresh is None:
        return []
    seen: set[str] = set()
    missing: list[str] = []
    for entry in sys.path:
        path = os.path.abspath(entry)  # "" (a notebook, python -c) is the driver's cwd
        if path in fresh or path in seen or not os.path.isdir(path):
            continue
        seen.add(path)
        missing.append(path)
    return missing


def worker_pythonpath(environ: Mapping[str, str] | None = None) -> str | None:
    """``PYTHONPATH`` for a worker: the given one, then the entries it would lack."""
    current = (os.environ if environ is None else environ).get("PYTHONPATH") or None
    extra = missing_entries(current)
    if not extra:
        return current
    return os.pathsep.join([*([current] if current else []), *extra])


def worker_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default ``os.environ``) with :func:`worker_pythonpath` set."""
    env = dict(os.environ if environ is None else environ)
    pythonpath = worker_pythonpath(env)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env
