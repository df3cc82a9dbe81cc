"""The driver's import path, handed to workers so they import what the driver imports.

A notebook that does ``sys.path.insert(0, "/home/me/project")`` and submits a function of
its own module needs the workers to find that module too. Like the stdlib's ``spawn`` start
method (``multiprocessing.spawn.get_preparation_data``), the driver sends its ``sys.path``
with ``''`` replaced by the directory the driver started in; relative entries are made
absolute against the same directory, because a worker's own directory may differ (``cwd``).

Driver side, :class:`PathTracker` numbers each distinct path: a submit compares
``sys.path`` with the last copy (a list comparison of identical strings, well under a
microsecond) and only a change makes a new version. The engine sends the path to a worker
only when the worker's version is older, so the common case sends nothing.

Worker side, :func:`merge` puts the driver's entries first, in the driver's order, and keeps
the worker's own entries after them: new entries reach workers that are already running
(block-allocation workers, the fork server and its warm spares).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Sequence

# Like multiprocessing.process.ORIGINAL_DIR: what '' meant when the driver started.
ORIGINAL_DIR = os.path.abspath(os.getcwd())


def snapshot(path: Sequence[object] | None = None) -> tuple[str, ...]:
    """``sys.path`` with ``''`` and relative entries made absolute, duplicates dropped."""
    out: list[str] = []
    seen: set[str] = set()
    for entry in sys.path if path is None else path:
        if not isinstance(entry, str):
            continue  # path hooks may accept other objects; workers cannot use them
        full = os.path.join(ORIGINAL_DIR, entry) if not os.path.isabs(entry) else entry
        full = os.path.normpath(full) if entry else ORIGINAL_DIR
        if full not in seen:
            seen.add(full)
            out.append(full)
    return tuple(out)


class PathTracker:
    """The driver's ``sys.path`` as of the latest submit, numbered by version (from 1)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._raw: list[object] = []
        # (version, resolved path) replaced as one object: the engine thread reads it
        # while caller threads may update it
        self.state: tuple[int, tuple[str, ...]] = (0, ())
        self.current()

    def current(self) -> int:
        """The version of ``sys.path`` now (a new one if it changed since the last call)."""
        if sys.path == self._raw:
            return self.state[0]
        with self._lock:
            raw = list(sys.path)
            if raw != self._raw:
                self._raw = raw
                self.state = (self.state[0] + 1, snapshot(raw))
            return self.state[0]


def merge(path: Sequence[str]) -> None:
    """Worker side: the driver's entries first, then the worker's own that it lacks."""
    wanted = list(path)
    known = set(wanted)
    merged = wanted + [p for p in sys.path if p not in known]
    if merged != sys.path:
        sys.path[:] = merged
        # a directory listed before may have gained the module since a finder cached it
        importlib.invalidate_caches()
