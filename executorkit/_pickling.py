"""Serializing calls cheaply without ever sending a stale function.

cloudpickle pickles a ``__main__`` function *by value*, together with the globals it uses:
about 20 us per call, more than everything else on the submit path. Two shortcuts keep the
result exactly what a fresh cloudpickle would send:

* A function's bytes are reused while the function object is the same and everything its
  pickle captured is provably unchanged: each referenced global, closure cell and default
  must still be the *same object* and of an immutable type (numbers, strings, tuples of
  those, functions, classes, modules). A function that uses a mutable global (a list, a
  dict, an array) is pickled afresh on every call, because that global may have changed.
* Arguments made only of builtin data are pickled with the C pickler (plain pickle and
  cloudpickle produce equivalent bytes for them); anything else goes through cloudpickle,
  which also handles classes and lambdas defined in ``__main__``.

The worker keeps the last few unpickled functions keyed by their bytes, so a function sent
many times is rebuilt once.
"""

from __future__ import annotations

import pickle
import sys
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import cloudpickle

_ATOMS = frozenset({int, float, str, bytes, bool, type(None), complex, range})
_PLAIN_CONTAINERS = frozenset({tuple, list, dict, set, frozenset})
_SCALARS = _ATOMS | {types.ModuleType}
_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ()))  # Python >= 3.10


def _plain(obj: Any, depth: int = 0) -> bool:
    """True if ``obj`` is builtin data that plain pickle handles exactly like cloudpickle."""
    cls = type(obj)
    if cls in _ATOMS:
        return True
    if cls not in _PLAIN_CONTAINERS or depth > 3:
        return False
    if cls is dict:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in obj.items())
    return len(obj) <= 64 and all(_plain(v, depth + 1) for v in obj)


def dumps_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    data = (args, kwargs)
    if _plain(args) and (not kwargs or _plain(kwargs)):
        return pickle.dumps(data, protocol=5)
    return cloudpickle.dumps(data, protocol=5)


def dumps_result(value: Any) -> bytes:
    """A call's result, with the C pickler when it is builtin data (a worker's reply to a
    tiny call pays ~10 us for cloudpickle's pickler otherwise)."""
    if _plain(value):
        return pickle.dumps(value, protocol=5)
    return cloudpickle.dumps(value, protocol=5)


def _global_names(code: types.CodeType) -> tuple[str, ...]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return tuple(sorted(names))


def _by_reference(obj: Any) -> bool:
    """True if cloudpickle sends ``obj`` as an import path (so its bytes never go stale).

    Functions and classes of ``__main__`` or of modules registered for pickling by value
    are sent with their code and state, which may change: those are not frozen.
    """
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module_name or not qualname or module_name == "__main__" or "<locals>" in qualname:
        return False
    module = sys.modules.get(module_name)
    if module is None or module_name in _by_value_modules():
        return False
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return target is obj


def _by_value_modules() -> set[str]:
    registry: set[str] = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", set())
    return set(registry)


def pickle_by_value(module: types.ModuleType | str) -> None:
    """Send the functions and classes of ``module`` with their code, instead of by name.

    For a module that exists only where the driver runs (a helper module next to a
    notebook, say) and so cannot be imported by the workers. It must be imported already.
    This is ``cloudpickle.register_pickle_by_value``; it also applies to the submodules of a
    package. Calls submitted afterwards carry the module's code.
    """
    if isinstance(module, str):
        found = sys.modules.get(module)
        if found is None:
            raise ValueError(f"pickle_by_value({module!r}): import the module first "
                             f"(it is not in sys.modules)")
        module = found
    if not isinstance(module, types.ModuleType):
        raise TypeError(f"pickle_by_value() takes a module or its name, got "
                        f"{type(module).__name__}")
    cloudpickle.register_pickle_by_value(module)


def _sent_by_value(fn: Any) -> bool:
    """Its module is registered for pickling by value (checked on every call: a function
    memoized while sent by name must not stay so once its module is registered)."""
    registry = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", None)
    if not registry:
        return False
    name = getattr(fn, "__module__", None) or ""
    return any(name == m or name.startswith(m + ".") for m in registry)


def _frozen(value: Any) -> bool:
    """Immutable *and* sent by reference or as plain data: its pickle cannot go stale."""
    cls = type(value)
    if cls in _SCALARS:
        return True
    if cls is tuple or cls is frozenset:
        return all(_frozen(v) for v in value)
    if cls is types.BuiltinFunctionType:
        # module-level builtins only; a bound method like CONF.get carries its object
        return isinstance(value.__self__, types.ModuleType) or value.__self__ is None
    if cls is types.FunctionType or isinstance(value, type):
        return _by_reference(value)
    return False


class FunctionMemo:
    """Something derived from a function (its pickle, its cache digest), reused while the
    function provably cannot have changed: same object, and every object its pickle
    captured is the same and immutable (see the module docstring)."""

    def __init__(
        self, also_captured: Callable[[types.FunctionType], list[Any]] | None = None
    ) -> None:
        # fn -> (the objects its pickle captured, value). Holding the objects (not their
        # ids) keeps them alive, so an id can never be reused by a new object.
        self._memo: weakref.WeakKeyDictionary[Callable[..., Any], tuple[tuple[Any, ...], Any]]
        self._memo = weakref.WeakKeyDictionary()
        # also_captured(fn): more objects the value depends on (a cache key reads the module
        # attributes a function uses; a pickle does not), checked like its globals.
        self._pickles = FunctionPickles(also_captured)

    def get(self, fn: Callable[..., Any], make: Callable[[Callable[..., Any]], Any]) -> Any:
        if type(fn) is not types.FunctionType:
            return make(fn)
        fingerprint = self._pickles._fingerprint(fn)
        if fingerprint is not None:
            memo = self._memo.get(fn)
            if memo is not None and _same(memo[0], fingerprint):
                return memo[1]
        value = make(fn)
        if fingerprint is not None:
            self._memo[fn] = (fingerprint, value)
        return value


class FunctionPickles:
    """Per-executor memo of function bytes, valid while the function cannot have changed."""

    def __init__(
        self, also_captured: Callable[[types.FunctionType], list[Any]] | None = None
    ) -> None:
        self._also_captured = also_captured
        # fn -> (the objects its pickle captured, bytes). Holding the objects (not their
        # ids) keeps them alive, so an id can never be reused by a new object.
        self._memo: weakref.WeakKeyDictionary[Callable[..., Any], tuple[tuple[Any, ...], bytes]]
        self._memo = weakref.WeakKeyDictionary()
        self._names: dict[types.CodeType, tuple[str, ...]] = {}

    def _fingerprint(self, fn: types.FunctionType) -> tuple[Any, ...] | None:
        """Everything the pickle of ``fn`` captured, or None if any of it may change."""
        captured: list[Any] = []
        return tuple(captured) if self._capture(fn, captured, 0) else None

    def _capture(self, fn: types.FunctionType, captured: list[Any], depth: int) -> bool:
        code = fn.__code__
        names = self._names.get(code)
        if names is None:
            names = self._names[code] = _global_names(code)
        captured.append(code)  # (fn itself is the memo's weak key: never hold it here)
        values: list[Any] = []
        glob = fn.__globals__
        values.extend(glob[name] for name in names if name in glob)
        for extra in (fn.__defaults__, fn.__kwdefaults__):
            if extra:
                captured.append(extra)
                values.extend(extra.values() if isinstance(extra, dict) else extra)
        for cell in fn.__closure__ or ():
            try:
                values.append(cell.cell_contents)
            except ValueError:  # empty cell
                return False
        if self._also_captured is not None:
            values.extend(self._also_captured(fn))
        for value in values:
            captured.append(value)
            if _frozen(value):
                continue
            # a helper function sent by value: frozen if everything *it* captured is
            if type(value) is not types.FunctionType or depth >= 3 or value is fn:
                return False
            if not self._capture(value, captured, depth + 1):
                return False
        return True

    def dumps(self, fn: Callable[..., Any]) -> bytes:
        if type(fn) is not types.FunctionType or _sent_by_value(fn):
            return cloudpickle.dumps(fn, protocol=5)
        fingerprint = self._fingerprint(fn)
        if fingerprint is not None:
            memo = self._memo.get(fn)
            if memo is not None and _same(memo[0], fingerprint):
                return memo[1]
        blob = cloudpickle.dumps(fn, protocol=5)
        if fingerprint is not None:
            self._memo[fn] = (fingerprint, blob)
        return blob


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class FunctionCache:
    """Worker side: unpickled functions by their bytes (a small LRU)."""

    def __init__(self, size: int = 32) -> None:
        self._size = size
        self._items: OrderedDict[bytes, Any] = OrderedDict()

    def loads(self, blob: bytes) -> Any:
        fn = self._items.get(blob)
        if fn is None:
            fn = pickle.loads(blob)
            self._items[blob] = fn
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(blob)
        return fn


def imports_of(fn: Any) -> tuple[str, ...]:
    """Modules a worker imports to run ``fn``: the module it is pickled by reference from,
    and the modules of what its code uses by a global name (``np`` in ``np.sum``, or a
    function imported from another module). ``__main__`` and modules sent by value are
    never named: they cannot be imported elsewhere."""
    found: list[str] = []
    by_value = _by_value_modules()

    def add(name: Any) -> None:
        # (the standard library is skipped: small, and mostly imported by any worker)
        if (isinstance(name, str) and name and name != "__main__" and name not in by_value
                and name not in found and name.partition(".")[0] not in _STDLIB
                and getattr(sys.modules.get(name), "__spec__", None)):
            found.append(name)

    target = getattr(fn, "__func__", fn)  # a bound method: its function
    if _by_reference(target):
        add(target.__module__)
    if type(target) is types.FunctionType:
        glob = target.__globals__
        for name in _global_names(target.__code__):
            value = glob.get(name)
            if isinstance(value, types.ModuleType):
                add(value.__name__)
            elif isinstance(value, (types.FunctionType, type)) and _by_reference(value):
                add(value.__module__)
    return tuple(found)


# Packages never mirrored from the driver into the fork server: a notebook kernel's and a
# test runner's own machinery (nothing a call needs), plotting (pyplot picks the kernel's
# display backend), and imports that are unsafe to fork after (mpi4py.MPI initialises MPI
# when imported; jax and tensorflow start thread pools that a forked child cannot use).
# A worker that needs one imports it itself.
_NOT_MIRRORED = frozenset({
    "IPython", "ipykernel", "ipywidgets", "jupyter_client", "jupyter_core", "zmq", "tornado",
    "traitlets", "debugpy", "matplotlib_inline", "comm", "_pytest", "pytest", "pluggy",
    "executorkit", "matplotlib", "jax", "jaxlib", "tensorflow",
})
FORK_UNSAFE = frozenset({"mpi4py.MPI"})  # never imported in a process that forks workers


def driver_imports(main: types.ModuleType | None = None) -> tuple[str, ...]:
    """Modules the driver script itself imported, by the names in its namespace: ``np``
    for ``import numpy as np``, ``mymod`` for ``from mymod import simulate``. The fork
    server imports them before it forks, as a worker forked from the driver would have them
    (the stdlib's fork server likewise imports the main script). The script itself, the
    standard library, modules sent by value and :data:`_NOT_MIRRORED` are left out."""
    main = sys.modules.get("__main__") if main is None else main
    if main is None:
        return ()
    by_value = _by_value_modules()
    found: dict[str, None] = {}
    for value in list(vars(main).values()):
        if isinstance(value, types.ModuleType):
            name = value.__name__
        elif isinstance(value, (types.FunctionType, type)):
            name = getattr(value, "__module__", None)
        else:
            continue
        if not isinstance(name, str) or name in found or name in FORK_UNSAFE:
            continue
        top = name.partition(".")[0]
        if (name in ("__main__", "__mp_main__") or top in _STDLIB or top in _NOT_MIRRORED
                or top.startswith("_") or name in by_value or top in by_value):
            continue
        spec = getattr(sys.modules.get(name), "__spec__", None)
        if spec is not None and spec.origin not in (None, "built-in", "frozen"):
            found[name] = None
    return tuple(found)
