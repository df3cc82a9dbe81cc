"""Workers import what the driver imports from a path added at run time (issue 14).

Each test writes a module into a fresh temporary directory, puts that directory on the
driver's ``sys.path`` *after* the executor's processes are up (as a notebook does), imports
the module and submits one of its functions.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import uuid
from contextlib import contextmanager

import cloudpickle
import pytest
import taskfuncs as tf
from test_mpi import HAVE_MPI

import executorkit
from executorkit import SingleNodeExecutor
from executorkit._syspath import ORIGINAL_DIR, merge, snapshot
from executorkit.cache._keys import compute_key
from executorkit.errors import WorkerImportError

T = 120
SOURCE = "def spin(x):\n    return x * 2\n\n\nclass Light:\n    watts = 60\n"


@contextmanager
def module_on_new_path(directory: str, name: str | None = None):
    """A module found only through ``directory``, added to sys.path now."""
    name = name or f"light_{uuid.uuid4().hex[:12]}"
    source = SOURCE
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.py"), "w") as fh:
        fh.write(source)
    sys.path.insert(0, directory)
    try:
        yield importlib.import_module(name)
    finally:
        if directory in sys.path:
            sys.path.remove(directory)
        sys.modules.pop(name, None)


def test_per_call_and_block_workers_see_new_entries(make_executor, tmp_path):
    exe = make_executor(max_workers=1)
    assert exe.submit(tf.inc, 1).result(timeout=T) == 2  # fork server / worker already up
    with module_on_new_path(str(tmp_path / "project")) as light:
        assert exe.submit(light.spin, 21).result(timeout=T) == 42
        assert exe.submit(tf.identity, light.Light()).result(timeout=T).watts == 60
    # a second directory added later reaches the same (block) worker too
    with module_on_new_path(str(tmp_path / "other")) as other:
        assert exe.submit(other.spin, 2).result(timeout=T) == 4


@pytest.mark.mpi
@pytest.mark.skipif(not HAVE_MPI, reason="needs mpiexec and mpi4py")
@pytest.mark.parametrize("block", [False, True])
def test_mpi_ranks_see_new_entries(tmp_path, block):
    kwargs = {"max_cores": 2}
    per_call = {"cores": 2}
    if block:
        kwargs.update(block_allocation=True, resource_dict={"cores": 2})
        per_call = None
    with SingleNodeExecutor(**kwargs) as exe:
        assert len(exe.submit(tf.mpi_ranks, 0, resource_dict=per_call).result(timeout=T)) == 2
        with module_on_new_path(str(tmp_path / "project")) as light:
            out = exe.submit(light.spin, 5, resource_dict=per_call).result(timeout=T)
    assert out == [10, 10]


def _driver_only(tmp_path):
    """A module the driver imported whose file is gone: no worker can import it."""
    directory = str(tmp_path / "gone")
    cm = module_on_new_path(directory)
    light = cm.__enter__()
    shutil.rmtree(directory)
    importlib.invalidate_caches()
    return cm, light


def test_a_module_only_the_driver_has_is_named_with_the_ways_out(make_executor, tmp_path):
    exe = make_executor(max_workers=1)
    cm, light = _driver_only(tmp_path)
    try:
        with pytest.raises(WorkerImportError) as info:
            exe.submit(light.spin, 1).result(timeout=T)
        err = info.value
        assert err.module == light.__name__
        assert err.worker_path and all(isinstance(p, str) for p in err.worker_path)
        text = str(err)
        assert f"module {light.__name__!r}" in text and "spin" in text
        assert "sys.path is [" in text
        assert "install the module" in text and "pickle_by_value" in text
        assert "the driver imported it from" in text
        # the documented way out: send the module's code with the call
        executorkit.pickle_by_value(light)
        try:
            assert exe.submit(light.spin, 4).result(timeout=T) == 8
        finally:
            cloudpickle.unregister_pickle_by_value(light)
    finally:
        cm.__exit__(None, None, None)


def test_pickle_by_value_refuses_what_is_not_a_module():
    with pytest.raises(ValueError, match="import the module first"):
        executorkit.pickle_by_value("no_such_module_anywhere")
    with pytest.raises(TypeError, match="module or its name"):
        executorkit.pickle_by_value(42)


def test_cache_keys_do_not_depend_on_the_path(tmp_path):
    """The same module found in two different directories gives the same keys."""
    name = f"light_{uuid.uuid4().hex[:12]}"
    keys = []
    for where in ("a", "b"):
        with module_on_new_path(str(tmp_path / where), name) as light:
            keys.append(compute_key(light.spin, (3,), {}, future_key=None))
    assert keys[0] == keys[1]


def test_snapshot_and_merge():
    """'' and relative entries mean the driver's starting directory (as for spawn)."""
    assert snapshot(["", "rel", "/abs/x/../y", "/abs/y", 3]) == (
        ORIGINAL_DIR, os.path.join(ORIGINAL_DIR, "rel"), "/abs/y")
    saved = list(sys.path)
    try:
        sys.path[:] = ["/mine", "/shared"]
        merge(("/new", "/shared"))
        assert sys.path == ["/new", "/shared", "/mine"]
    finally:
        sys.path[:] = saved


def test_the_fork_server_is_sent_the_path_only_when_it_changed():
    # It keeps (and merges) the path it was sent; a Spawn with the same path leaves it out,
    # and the call's Resources (which only schedulers need) never travel to it.
    from executorkit.launchers.local import LocalLauncher
    from executorkit.resources import Resources
    from executorkit.transport import Spawn

    launcher = LocalLauncher(forward_output=False)
    first = ("/a", "/b")
    spawn = Spawn(1, (), None, None, False, path=first, res=Resources())
    sent = launcher._plain(spawn)
    assert sent.path == first and sent.res is None
    assert launcher._plain(Spawn(2, (), None, None, False, path=first)).path is None
    changed = launcher._plain(Spawn(3, (), None, None, False, path=("/c", *first)))
    assert changed.path == ("/c", *first)
