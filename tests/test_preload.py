"""The fork server imports what submitted functions need, so per-task workers start warm."""

from __future__ import annotations

import os
import sys

import pytest

from executorkit import SingleNodeExecutor
from executorkit._pickling import imports_of
from executorkit.errors import ResourceError

T = 60


@pytest.fixture
def heavy(tmp_path, module_for_workers):
    """A module that appends its importer's pid to a marker file when imported."""
    marker = tmp_path / "imports.txt"
    module = module_for_workers("heavy", f"""
        import os

        with open({str(marker)!r}, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")


        def work(x):
            return os.getpid(), x + 1
    """)
    return module, marker


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


@pytest.mark.parametrize("bad", ["numpy", "", [""], ["__main__"], [3], 5])
def test_bad_preload_is_refused(bad):
    with pytest.raises(ResourceError, match="preload") as info:
        SingleNodeExecutor(max_workers=1, preload=bad)
    assert info.value.key == "preload"


def test_driver_imports_are_the_modules_the_script_names(heavy):
    module, _ = heavy
    import json

    import numpy

    from executorkit import _pickling

    main = type(sys)("__main__")
    namespace = {"np": numpy, "json": json, "work": module.work, "pytest": pytest,
                 "SingleNodeExecutor": SingleNodeExecutor, "value": 3}
    exec("def local():\n    return 1\n", main.__dict__)
    main.__dict__.update(namespace)
    # numpy by its alias, the heavy module through a function imported from it; not the
    # standard library, the test runner, executorkit or the script's own functions
    assert _pickling.driver_imports(main) == ("numpy", module.__name__)


def test_driver_imports_leave_out_fork_unsafe_and_by_value_modules(heavy, monkeypatch):
    import cloudpickle
    import mpi4py

    from executorkit import _pickling

    module, _ = heavy
    fake_mpi = type(sys)("mpi4py.MPI")
    fake_mpi.__spec__ = mpi4py.__spec__  # a module with a real origin, named mpi4py.MPI
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", fake_mpi)
    main = type(sys)("__main__")
    main.__dict__.update({"MPI": fake_mpi, "mod": module})
    assert _pickling.driver_imports(main) == (module.__name__,)
    cloudpickle.register_pickle_by_value(module)
    try:
        assert _pickling.driver_imports(main) == ()
    finally:
        cloudpickle.unregister_pickle_by_value(module)


SCRIPT = """
import os, sys
from {name} import work
from executorkit import SingleNodeExecutor

with SingleNodeExecutor(max_workers=2, block_allocation={block}, preload={preload}) as exe:
    # the workers start with a call that needs nothing, before the module's function is seen
    assert [f.result(timeout=60) for f in [exe.submit(pow, 2, 3) for _ in range(2)]] == [8, 8]
    pids = {{f.result(timeout=60)[0] for f in [exe.submit(work, i) for i in range(8)]}}
    server = exe._engine.launcher.process.pid
print("PIDS", os.getpid(), server, *sorted(pids))
"""


def _run_script(tmp_path, marker, name: str, block: bool,
                preload: str) -> tuple[int, set[int], set[int]]:
    """Run a driver script; its fork server's pid, its workers' pids, and the pids other
    than the driver's that imported the module."""
    import subprocess

    script = tmp_path / "driver.py"
    script.write_text(SCRIPT.format(name=name, block=block, preload=preload))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PIDS"))
    driver, server, *pids = (int(x) for x in line.split()[1:])
    seen = {int(p) for p in marker.read_text().split()} - {driver, os.getpid()}
    return server, set(pids), seen


@pytest.mark.parametrize("block", [False, True], ids=["per-task", "block"])
def test_the_driver_scripts_imports_are_preloaded_by_default(heavy, tmp_path, block):
    # The script imports the module at its top: the fork server imports it before it forks
    # anything, so no worker does, not even the first (block workers included).
    module, marker = heavy
    server, pids, seen = _run_script(tmp_path, marker, module.__name__, block, '"auto"')
    assert seen == {server}
    assert server not in pids


def test_preload_none_leaves_the_first_workers_to_import(heavy, tmp_path):
    module, marker = heavy
    _, pids, seen = _run_script(tmp_path, marker, module.__name__, True, "[]")
    # both block workers started before the function was known: each imported it itself
    assert seen == pids and len(pids) == 2


def test_a_module_that_imports_mpi4py_mpi_is_not_preloaded(tmp_path, module_for_workers):
    # mpi4py.MPI initialises MPI when imported: a fork server must never do that (its
    # children would inherit an initialised MPI), so such a module is left to the workers.
    marker = tmp_path / "imports.txt"
    name = module_for_workers("mpiuser", f"""
        import os
        from mpi4py import MPI

        with open({str(marker)!r}, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")


        def work(x):
            return os.getpid(), MPI.COMM_WORLD.Get_size()
    """, imported=False)
    server, pids, seen = _run_script(tmp_path, marker, name, False, '"auto"')
    assert server not in seen
    assert seen and seen <= pids


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


@pytest.mark.parametrize("when", ["at start", "learned later"])
def test_numpy_state_is_fresh_after_an_import_drew_from_it(module_for_workers, when):
    # A module that draws a normal deviate at import leaves the second of the pair cached
    # in numpy's global state; imported in the fork server (at its start, or learned from
    # the calls once numpy's state was in use there), every worker would return that
    # cached value first.
    pytest.importorskip("numpy")
    source = """
        import numpy as np

        AT_IMPORT = np.random.standard_normal()


        def draw():
            return float(np.random.standard_normal())
    """
    if when == "at start":
        module = module_for_workers("drawsatimport", source)
        preload = ["numpy.random", module.__name__]
    else:
        preload = ["numpy.random"]  # (numpy itself imports it only when first used)
    with SingleNodeExecutor(max_workers=2, preload=preload) as exe:
        exe.submit(_numpy_draw).result(timeout=T)  # (the fork server has reseeded)
        if when != "at start":
            module = module_for_workers("drawsatimport", source)
        draws = [exe.submit(module.draw).result(timeout=T) for _ in range(12)]
    assert len(set(draws)) == 12


def test_numpy_reseeding_writes_the_generator_state_in_place():
    # Before each fork the fork server gives numpy's global MT19937 a new state from the
    # kernel, in place (numpy's own seeding wrote some 80 pages of the fork server per
    # call); the documented seeding runs once per generator and after imports, dropping a
    # cached normal deviate.
    np = pytest.importorskip("numpy")
    pytest.importorskip("numpy.random")  # (numpy 2 imports it only when first used)
    if not hasattr(np.random, "get_bit_generator"):
        pytest.skip("numpy before 1.25 has no get_bit_generator: always seed()")
    from executorkit.worker.forkserver import _NumpyEntropy

    entropy = _NumpyEntropy()
    entropy.refill()  # (the first: the documented way, and the fast one set up)
    assert entropy.key == np.random.get_bit_generator().ctypes.state_address

    def documented_seeding(random):
        raise AssertionError("seeded the documented way, not in place")

    entropy._seed = documented_seeding  # (an error would pass silently: see the states)
    states = []
    for _ in range(3):
        entropy.refill()
        name, key, pos, has_gauss, _ = np.random.get_state()
        assert name == "MT19937" and pos == 624 and has_gauss == 0
        states.append(key.tobytes())
    assert len(set(states)) == 3
    assert 0.0 <= np.random.random() < 1.0  # (a draw regenerates from the new key)
    np.random.standard_normal()
    assert np.random.get_state()[3] == 1  # a deviate cached
    del entropy._seed
    entropy.reset()
    entropy.refill()
    assert np.random.get_state()[3] == 0
