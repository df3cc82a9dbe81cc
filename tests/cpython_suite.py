"""Find and load CPython 3.11's own ``Lib/test/test_concurrent_futures.py``.

The conformance suite (``test_stdlib_conformance.py``) runs that file's executor-generic test
classes against our executors, so the upstream assertions stay verbatim. The file is part of
CPython's test package, which many builds leave out; we look for it, in order:

1. ``test.test_concurrent_futures`` importable by the running interpreter;
2. ``$EXECUTORKIT_CPYTHON_TESTS`` (a path to the file);
3. Debian's ``libpython3.X-testsuite`` (``/usr/lib/python3.X/test/``), which
   ``.ci_support/setup.sh`` installs when it runs as root.

A file found by path is loaded as a top-level module and registered with cloudpickle for
pickling by value, so worker processes never need to import it themselves.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

MODULE = "test.test_concurrent_futures"
VERSION = (3, 11)


def _candidates() -> list[str]:
    paths = []
    env = os.environ.get("EXECUTORKIT_CPYTHON_TESTS")
    if env:
        paths.append(env)
    major, minor = sys.version_info[:2]
    paths.append(f"/usr/lib/python{major}.{minor}/test/test_concurrent_futures.py")
    return paths


def _load_file(path: str) -> ModuleType:
    name = "cpython_test_concurrent_futures"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load() -> tuple[ModuleType | None, str]:
    """(the upstream module, "") or (None, why it is not available)."""
    if sys.version_info[:2] != VERSION:
        # 3.12 split the file into a package of modules with other class names.
        return None, (f"the adapter targets CPython {VERSION[0]}.{VERSION[1]}'s "
                      f"test_concurrent_futures; this is {sys.version.split()[0]}")
    try:
        importlib.import_module("test.support")
    except ImportError:
        return None, "the interpreter has no test.support package (CPython's test package)"
    try:
        module = importlib.import_module(MODULE)
    except ImportError:
        module = None
        for path in _candidates():
            if os.path.isfile(path):
                module = _load_file(path)
                break
    if module is None:
        return None, ("CPython's test_concurrent_futures.py is not installed: "
                      f"apt-get install libpython{VERSION[0]}.{VERSION[1]}-testsuite (setup.sh "
                      "does it as root) or set EXECUTORKIT_CPYTHON_TESTS=/path/to/the/file")
    import cloudpickle

    cloudpickle.register_pickle_by_value(module)
    return module, ""
