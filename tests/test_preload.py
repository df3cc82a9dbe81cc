"""The fork server imports what submitted functions need, so per-task workers start warm."""

from __future__ import annotations

import os
import sys
import textwrap
import uuid

import pytest

from executorkit import SingleNodeExecutor
from executorkit._pickling import imports_of
from executorkit.errors import ResourceError

T = 60


@pytest.fixture
def heavy(tmp_path, monkeypatch):
    """A module that appends its importer's pid to a marker file when imported."""
    name = f"heavy_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imports.txt"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import os

        with open({str(marker)!r}, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")


        def work(x):
            return os.getpid(), x + 1


    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    module = __import__(name)
    yield module, marker
    sys.modules.pop(name, None)


def importers(marker) -> list[int]:
    """Pids that imported the module, other than this test process."""
    return [int(p) for p in marker.read_text().split() if int(p) != os.getpid()]


def test_imports_of_names_the_module_and_what_its_code_uses(heavy):
    module, _ = heavy
    import numpy

    assert imports_of(module.work) == (module.__name__,)  # os: standard library, skipped
    namespace = {"__name__": "__main__", "np": numpy, "os": os}
    exec("def f():\n    return np.zeros(os.getpid())\n", namespace)
    assert imports_of(namespace["f"]) == ("numpy",)


def test_imports_of_never_names_main():
    namespace = {"__name__": "__main__"}
    exec("def f():\n    return 1\n", namespace)
    assert imports_of(namespace["f"]) == ()


def test_module_is_imported_once_in_the_fork_server_after_the_first_call(heavy):
    module, marker = heavy
    with SingleNodeExecutor(max_workers=2) as exe:
        first_pid, value = exe.submit(module.work, 1).result(timeout=T)
        assert value == 2
        later = [exe.submit(module.work, i) for i in range(12)]
        pids = {f.result(timeout=T)[0] for f in later}
        server = exe._engine.launcher.process.pid
    seen = importers(marker)
    assert server in seen
    # the first call's worker was forked before the function was known; no later one
    # imported the module itself
    assert set(seen) <= {server, first_pid}
    assert not pids & set(seen)


def test_preload_parameter_spares_the_first_call(heavy):
    module, marker = heavy
    with SingleNodeExecutor(max_workers=2, preload=[module.__name__]) as exe:
        results = [exe.submit(module.work, i).result(timeout=T) for i in range(3)]
        server = exe._engine.launcher.process.pid
    assert [v for _, v in results] == [1, 2, 3]
    assert importers(marker) == [server]


def test_other_thread_counts_start_a_fresh_interpreter(heavy):
    # Libraries imported in the fork server sized their thread pools for one thread per
    # core: a call with threads_per_core=2 must import them again, in a new interpreter.
    module, marker = heavy
    with SingleNodeExecutor(max_cores=2, preload=[module.__name__]) as exe:
        pid, _ = exe.submit(module.work, 1, resource_dict={"threads_per_core": 2}).result(
            timeout=T)
        default_pid, _ = exe.submit(module.work, 1).result(timeout=T)
        server = exe._engine.launcher.process.pid
    assert set(importers(marker)) == {server, pid}
    assert default_pid != pid


@pytest.mark.parametrize("bad", ["numpy", [""], ["__main__"], [3], 5])
def test_bad_preload_is_refused(bad):
    with pytest.raises(ResourceError, match="preload") as info:
        SingleNodeExecutor(max_workers=1, preload=bad)
    assert info.value.key == "preload"


def test_numpy_random_state_is_fresh_in_every_worker():
    # numpy, imported once in the fork server, seeded its global random state there: every
    # worker forked from it must draw its own numbers, as a new process would.
    pytest.importorskip("numpy")
    with SingleNodeExecutor(max_workers=2, preload=["numpy"]) as exe:
        draws = [exe.submit(_numpy_draw).result(timeout=T) for _ in range(4)]
    assert len(set(draws)) == 4


def _numpy_draw():
    import numpy as np

    return float(np.random.random())
