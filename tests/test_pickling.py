"""Tests of executorkit._pickling: function-pickle reuse, argument pickling, worker cache.

cloudpickle pickles functions of importable modules *by reference*, so the reuse logic only
matters for functions pickled *by value* (``__main__``, notebooks). The tests define their
functions in a fresh module object that is not in ``sys.modules``, which cloudpickle treats
exactly like ``__main__``: the function, and the globals it uses, travel by value.
"""

from __future__ import annotations

import functools
import itertools
import pickle
import sys
import types
from typing import Any

import cloudpickle
import pytest

from executorkit import _pickling
from executorkit._pickling import FunctionCache, FunctionPickles, dumps_args

_counter = itertools.count()


def dynamic_module(source: str) -> types.ModuleType:
    """Execute ``source`` in a new module that cloudpickle must pickle by value."""
    name = f"executorkit_test_dynamic_{next(_counter)}"
    module = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    assert name not in sys.modules
    return module


def call(blob: bytes, *args: Any) -> Any:
    """What a worker does: unpickle the function and call it."""
    return pickle.loads(blob)(*args)


# --------------------------------------------------------------------------- reuse
def test_the_helper_really_pickles_by_value() -> None:
    # Precondition for every test below: a snapshot of the globals travels with the function.
    mod = dynamic_module("X = [1]\ndef f():\n    return X[0]\n")
    blob = cloudpickle.dumps(mod.f)
    mod.X[0] = 2
    assert call(blob) == 1


def test_immutable_globals_reuse_the_same_bytes() -> None:
    mod = dynamic_module(
        "import math\n"
        "SCALE = 2.5\n"
        "NAME = 'n'\n"
        "SHAPE = (1, (2, 'x'), frozenset({3}))\n"
        "def helper(x):\n"
        "    return x\n"
        "def f(x, k=3, *, flag=None):\n"
        "    return helper(x) * SCALE + len(NAME) + len(SHAPE) + math.floor(k)\n"
    )
    memo = FunctionPickles()
    first = memo.dumps(mod.f)
    second = memo.dumps(mod.f)
    assert second is first
    assert call(first, 2) == 2 * 2.5 + 1 + 3 + 3


def test_function_without_globals_reuses_bytes() -> None:
    mod = dynamic_module("def f(x):\n    return x + 1\n")
    memo = FunctionPickles()
    assert memo.dumps(mod.f) is memo.dumps(mod.f)


def test_memo_is_per_function_object() -> None:
    src = "def f(x):\n    return x + 1\n"
    mod_a, mod_b = dynamic_module(src), dynamic_module(src)
    memo = FunctionPickles()
    a = memo.dumps(mod_a.f)
    b = memo.dumps(mod_b.f)
    assert a is not b
    assert memo.dumps(mod_a.f) is a
    assert memo.dumps(mod_b.f) is b


def test_rebinding_an_immutable_global_repickles() -> None:
    mod = dynamic_module("SCALE = 2\ndef f(x):\n    return x * SCALE\n")
    memo = FunctionPickles()
    first = memo.dumps(mod.f)
    assert call(first, 5) == 10
    mod.SCALE = 3
    second = memo.dumps(mod.f)
    assert second is not first
    assert call(second, 5) == 15
    # ... and the new bytes are reused again while nothing changes.
    assert memo.dumps(mod.f) is second


def test_rebinding_a_global_used_by_a_nested_function_repickles() -> None:
    mod = dynamic_module(
        "OFFSET = 1\n"
        "def f(x):\n"
        "    def inner(y):\n"
        "        return y + OFFSET\n"
        "    return inner(x)\n"
    )
    memo = FunctionPickles()
    assert call(memo.dumps(mod.f), 1) == 2
    mod.OFFSET = 10
    assert call(memo.dumps(mod.f), 1) == 11


def test_defining_a_global_that_was_missing_repickles() -> None:
    mod = dynamic_module(
        "def f():\n"
        "    try:\n"
        "        return LATE\n"
        "    except NameError:\n"
        "        return 'missing'\n"
    )
    memo = FunctionPickles()
    assert call(memo.dumps(mod.f)) == "missing"
    mod.LATE = "here"
    assert call(memo.dumps(mod.f)) == "here"


@pytest.mark.parametrize(
    ("setup", "mutate"),
    [
        ("DATA = [1]", "DATA[0] = 2"),
        ("DATA = {'v': 1}", "DATA['v'] = 2"),
        ("DATA = ([1],)", "DATA[0][0] = 2"),
        ("DATA = bytearray(b'\\x01')", "DATA[0] = 2"),
    ],
    ids=["list", "dict", "tuple-of-list", "bytearray"],
)
def test_mutable_global_gives_fresh_bytes_reflecting_mutation(setup: str, mutate: str) -> None:
    getter = {
        "DATA = [1]": "DATA[0]",
        "DATA = {'v': 1}": "DATA['v']",
        "DATA = ([1],)": "DATA[0][0]",
        "DATA = bytearray(b'\\x01')": "DATA[0]",
    }[setup]
    mod = dynamic_module(f"{setup}\ndef f():\n    return {getter}\n")
    memo = FunctionPickles()
    first = memo.dumps(mod.f)
    assert call(first) == 1
    exec(mutate, mod.__dict__)
    second = memo.dumps(mod.f)
    assert second is not first
    assert call(second) == 2


def test_numpy_array_global_is_never_stale() -> None:
    np = pytest.importorskip("numpy")
    mod = dynamic_module("def f():\n    return float(ARR.sum())\n")
    mod.ARR = np.zeros(3)
    memo = FunctionPickles()
    assert call(memo.dumps(mod.f)) == 0.0
    mod.ARR[1] = 4.0
    assert call(memo.dumps(mod.f)) == 4.0


def test_mutable_default_repickles() -> None:
    mod = dynamic_module("def f(acc=[1]):\n    return sum(acc)\n")
    memo = FunctionPickles()
    first = memo.dumps(mod.f)
    assert call(first) == 1
    mod.f.__defaults__[0].append(5)
    second = memo.dumps(mod.f)
    assert second is not first
    assert call(second) == 6


def test_mutable_kwdefault_repickles() -> None:
    mod = dynamic_module("def f(*, opts={'n': 1}):\n    return opts['n']\n")
    memo = FunctionPickles()
    assert call(memo.dumps(mod.f)) == 1
    mod.f.__kwdefaults__["opts"]["n"] = 7
    assert call(memo.dumps(mod.f)) == 7


def test_replaced_defaults_repickle() -> None:
    mod = dynamic_module("def f(k=1):\n    return k\n")
    memo = FunctionPickles()
    first = memo.dumps(mod.f)
    assert memo.dumps(mod.f) is first  # immutable default: reused
    mod.f.__defaults__ = (9,)
    assert call(memo.dumps(mod.f)) == 9


def test_closure_over_mutable_value_repickles() -> None:
    mod = dynamic_module(
        "def make():\n"
        "    state = [1]\n"
        "    def f():\n"
        "        return state[0]\n"
        "    return f, state\n"
    )
    f, state = mod.make()
    memo = FunctionPickles()
    first = memo.dumps(f)
    assert call(first) == 1
    state[0] = 3
    second = memo.dumps(f)
    assert second is not first
    assert call(second) == 3


def test_closure_over_immutable_value_reuses_and_tracks_rebinding() -> None:
    mod = dynamic_module(
        "def make():\n"
        "    n = 1\n"
        "    def f():\n"
        "        return n\n"
        "    def set_n(v):\n"
        "        nonlocal n\n"
        "        n = v\n"
        "    return f, set_n\n"
    )
    f, set_n = mod.make()
    memo = FunctionPickles()
    first = memo.dumps(f)
    assert memo.dumps(f) is first
    set_n(4)
    second = memo.dumps(f)
    assert second is not first
    assert call(second) == 4


def test_non_function_callables_are_pickled_each_time() -> None:
    memo = FunctionPickles()
    partial = functools.partial(pow, 2)
    assert call(memo.dumps(partial), 3) == 8
    assert call(memo.dumps(len), [1, 2]) == 2
    mod = dynamic_module(
        "class Adder:\n"
        "    def __init__(self):\n"
        "        self.n = 1\n"
        "    def __call__(self, x):\n"
        "        return x + self.n\n"
    )
    adder = mod.Adder()
    assert call(memo.dumps(adder), 1) == 2
    adder.n = 10
    assert call(memo.dumps(adder), 1) == 11


def test_memo_does_not_keep_functions_alive() -> None:
    import gc
    import weakref

    mod = dynamic_module("def f():\n    return 1\n")
    memo = FunctionPickles()
    memo.dumps(mod.f)
    ref = weakref.ref(mod.f)
    del mod
    gc.collect()
    assert ref() is None


# Everything a by-value function pickle captures must be unchanged for its bytes to be
# reused. These cases reach mutable state through an object that _frozen() treats as
# immutable without looking inside.
_SHALLOW_CASES = {
    "helper-function-global": (
        "DATA = [1]\n"
        "def helper():\n"
        "    return DATA[0]\n"
        "def f():\n"
        "    return helper()\n",
        "DATA[0] = 2",
    ),
    "bound-builtin-method": (
        "CONF = {'a': 1}\n"
        "get = CONF.get\n"
        "def f():\n"
        "    return get('a')\n",
        "CONF['a'] = 2",
    ),
    "frozenset-of-mutable-objects": (
        "class Box:\n"
        "    def __init__(self, v):\n"
        "        self.v = v\n"
        "    def __hash__(self):\n"
        "        return 0\n"
        "BOX = Box(1)\n"
        "ITEMS = frozenset({BOX})\n"
        "def f():\n"
        "    return next(iter(ITEMS)).v\n",
        "BOX.v = 2",
    ),
    "class-attribute": (
        "class Cfg:\n"
        "    value = 1\n"
        "def f():\n"
        "    return Cfg.value\n",
        "Cfg.value = 2",
    ),
}


@pytest.mark.parametrize("case", sorted(_SHALLOW_CASES))
def test_mutable_state_behind_immutable_looking_global(case: str) -> None:
    source, mutate = _SHALLOW_CASES[case]
    mod = dynamic_module(source)
    memo = FunctionPickles()
    first = memo.dumps(mod.f)
    exec(mutate, mod.__dict__)
    second = memo.dumps(mod.f)
    # Checked before unpickling: cloudpickle may reset a tracked class when it loads.
    fresh_value = call(cloudpickle.dumps(mod.f, protocol=5))
    assert fresh_value == 2
    assert call(second) == 2, "stale function bytes were reused"
    assert second is not first


def test_rebinding_to_a_new_object_at_a_reused_address() -> None:
    mod = dynamic_module("S = float('1.5')\ndef f():\n    return S\n")
    memo = FunctionPickles()
    first = memo.dumps(mod.f)
    cached_id = id(mod.S)
    # Rebind without calling dumps() in between until CPython hands the freed address
    # of the cached float to a new one (normally on the second rebinding).
    for _ in range(1000):
        mod.S = mod.S * 2
        if id(mod.S) == cached_id:
            break
    else:
        pytest.skip("no address reuse observed")
    assert mod.S != 1.5
    assert call(memo.dumps(mod.f)) == mod.S
    assert memo.dumps(mod.f) is not first


# --------------------------------------------------------------------------- dumps_args
def _no_cloudpickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("cloudpickle used for builtin data")

    monkeypatch.setattr(_pickling, "cloudpickle", types.SimpleNamespace(dumps=refuse))


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        ((1, 2.5, "s", b"b", None, True, 3j, range(3)), {}),
        (([1, 2], (3, (4,)), {"k": [5]}, {6}, frozenset({7})), {"x": 1, "y": [2, 3]}),
        ((list(range(64)),), {}),
    ],
    ids=["empty", "atoms", "containers", "64-items"],
)
def test_dumps_args_uses_plain_pickle_for_builtin_data(
    args: tuple[Any, ...], kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_cloudpickle(monkeypatch)
    blob = dumps_args(args, kwargs)
    assert blob == pickle.dumps((args, kwargs), protocol=5)
    assert pickle.loads(blob) == (args, kwargs)


def test_dumps_args_lambda_goes_through_cloudpickle() -> None:
    blob = dumps_args((lambda x: x * 3, 4), {"g": lambda: "kw"})
    (fn, four), kwargs = pickle.loads(blob)
    assert fn(four) == 12
    assert kwargs["g"]() == "kw"


def test_dumps_args_dynamic_class_instances() -> None:
    mod = dynamic_module(
        "class Point:\n"
        "    def __init__(self, x):\n"
        "        self.x = x\n"
        "    def double(self):\n"
        "        return self.x * 2\n"
    )
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(mod.Point(1))  # plain pickle cannot do this
    blob = dumps_args(([mod.Point(21)],), {"p": mod.Point(1)})
    (points,), kwargs = pickle.loads(blob)
    assert points[0].double() == 42
    assert kwargs["p"].x == 1


def test_dumps_args_falls_back_when_data_is_large_or_deep() -> None:
    deep = [[[[[[1]]]]]]
    long = list(range(100))
    blob = dumps_args((deep, long), {"nested": {"a": {"b": {"c": {"d": [1]}}}}})
    assert pickle.loads(blob) == ((deep, long), {"nested": {"a": {"b": {"c": {"d": [1]}}}}})


def test_dumps_args_non_plain_kwargs_only() -> None:
    blob = dumps_args((1,), {"f": lambda: 5})
    args, kwargs = pickle.loads(blob)
    assert args == (1,)
    assert kwargs["f"]() == 5


def test_dumps_args_self_referencing_list() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    (out,), _ = pickle.loads(dumps_args((loop,), {}))
    assert out[0] == 1
    assert out[1] is out


def test_dumps_args_subclass_of_builtin_is_not_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = dynamic_module("class MyInt(int):\n    pass\n")
    calls: list[Any] = []
    real = cloudpickle.dumps

    def spy(obj: Any, *args: Any, **kwargs: Any) -> bytes:
        calls.append(obj)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(_pickling, "cloudpickle", types.SimpleNamespace(dumps=spy))
    blob = dumps_args((mod.MyInt(5),), {})
    assert len(calls) == 1
    ((value,), _) = pickle.loads(blob)
    assert value == 5
    assert type(value).__name__ == "MyInt"


# --------------------------------------------------------------------------- FunctionCache
def test_function_cache_returns_the_same_object_for_the_same_bytes() -> None:
    cache = FunctionCache()
    blob = cloudpickle.dumps(lambda x: x + 1)
    fn = cache.loads(blob)
    assert fn(1) == 2
    assert cache.loads(blob) is fn
    # Keyed by content, not by the bytes object.
    assert cache.loads(bytes(bytearray(blob))) is fn


def test_function_cache_different_bytes_different_objects() -> None:
    cache = FunctionCache()
    a = cache.loads(pickle.dumps([1]))
    b = cache.loads(pickle.dumps([2]))
    assert a == [1]
    assert b == [2]
    assert a is not b


def test_function_cache_evicts_beyond_its_size() -> None:
    cache = FunctionCache(size=2)
    blobs = [pickle.dumps([i]) for i in range(3)]
    first = cache.loads(blobs[0])
    second = cache.loads(blobs[1])
    cache.loads(blobs[2])  # evicts the least recently used: blobs[0]
    assert cache.loads(blobs[1]) is second
    reloaded = cache.loads(blobs[0])
    assert reloaded == first
    assert reloaded is not first


def test_function_cache_is_lru() -> None:
    cache = FunctionCache(size=2)
    a_blob, b_blob, c_blob = (pickle.dumps({k: 1}) for k in "abc")
    a = cache.loads(a_blob)
    b = cache.loads(b_blob)
    assert cache.loads(a_blob) is a  # a is now the most recently used
    cache.loads(c_blob)  # evicts b, not a
    assert cache.loads(a_blob) is a
    assert cache.loads(b_blob) is not b


def test_results_of_builtin_data_take_the_c_pickler_and_others_cloudpickle():
    plain = [1, 2.5, "s", b"b", None, (1, [2, {"k": {3}}]), frozenset({1}), range(3)]
    for value in plain:
        assert _pickling.dumps_result(value) == pickle.dumps(value, protocol=5)
        assert pickle.loads(_pickling.dumps_result(value)) == value
    local = lambda x: x * 3  # noqa: E731  (only cloudpickle can send it)
    assert pickle.loads(_pickling.dumps_result(local))(2) == 6
    assert pickle.loads(_pickling.dumps_result([local]))[0](3) == 9
