"""Cache keys: stable across sessions, sensitive to code and data, canonical for containers."""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import threading
from collections import namedtuple
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from executorkit.cache import compute_key, validate_cache_key
from executorkit.errors import ResourceError, SerializationError


def no_futures(fut: Future[Any]) -> str:
    raise AssertionError("unexpected future")


def key_of(fn: Any, *args: Any, **kwargs: Any) -> str:
    return compute_key(fn, args, kwargs, future_key=no_futures)


def define(source: str, name: str = "task", **namespace: Any) -> Any:
    """Execute ``source`` as a fresh ``__main__`` (like a notebook cell) and return ``name``."""
    scope: dict[str, Any] = {"__name__": "__main__", **namespace}
    exec(compile(textwrap.dedent(source), "<cell>", "exec", dont_inherit=True), scope)
    return scope[name]


def add_one(x: int) -> int:
    return x + 1


# --------------------------------------------------------------------------------------------
# stability across interpreter sessions

SESSION_SOURCE = textwrap.dedent('''
    import dataclasses, json
    import numpy as np
    from executorkit.cache import compute_key

    OFFSET = 3
    WORDS = frozenset({"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"})

    @dataclasses.dataclass
    class Point:
        x: float
        tags: set

    def helper(value):
        return value * OFFSET

    def task(values, *, labels=None, scale=1.5):
        total = sum(helper(v) for v in values)
        return {name: total * scale for name in (labels or WORDS)}

    def emit():
        names = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
        args = (names, [1, 2.5, None], np.arange(6, dtype=np.float32).reshape(2, 3))
        kwargs = {"labels": {"x": 1, "y": 2}, "scale": Point(2.0, {"a", "b", "c", "d"})}
        key = compute_key(task, args, kwargs, future_key=lambda fut: "upstream")
        print(json.dumps({"key": key, "set_order": list(names)}))
''')


def run_session(argv: list[str], seed: str, cwd: pathlib.Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_key_is_identical_across_sessions_and_hash_seeds(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "task_script.py"
    script.write_text(SESSION_SOURCE + "\nemit()\n")
    from_file = run_session([str(script)], "1", tmp_path)
    from_c = run_session(["-c", SESSION_SOURCE + "\nemit()\n"], "2", tmp_path)
    # The sets really are iterated in different orders in the two sessions...
    assert from_file["set_order"] != from_c["set_order"]
    # ...yet the key is the same: from a module file and from -c.
    assert from_file["key"] == from_c["key"]
    assert re.fullmatch(r"task_[0-9a-f]{64}", from_file["key"])
    # And the same again when the source runs as a notebook cell in this process.
    scope: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(SESSION_SOURCE, "<notebook cell>", "exec", dont_inherit=True), scope)
    names = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    args = (names, [1, 2.5, None], np.arange(6, dtype=np.float32).reshape(2, 3))
    kwargs = {"labels": {"x": 1, "y": 2}, "scale": scope["Point"](2.0, {"a", "b", "c", "d"})}
    in_process = compute_key(scope["task"], args, kwargs, future_key=lambda fut: "upstream")
    assert in_process == from_file["key"]


# --------------------------------------------------------------------------------------------
# the function's identity

def test_key_has_readable_prefix_and_full_digest() -> None:
    assert re.fullmatch(r"add_one_[0-9a-f]{64}", key_of(add_one, 1))
    assert re.fullmatch(r"lambda_[0-9a-f]{64}", key_of(lambda x: x, 1))
    long_name = define("def " + "a" * 60 + "(x):\n    return x\n", "a" * 60)
    assert re.fullmatch(r"a{40}_[0-9a-f]{64}", key_of(long_name, 1))


def test_same_source_same_key_regardless_of_position_and_file() -> None:
    first = define("def task(x):\n    return x + 1\n")
    shifted = define("\n\n\n# comment\ndef task(x):\n    return x + 1\n")
    assert first is not shifted
    assert first.__code__.co_firstlineno != shifted.__code__.co_firstlineno
    assert key_of(first, 1) == key_of(shifted, 1)


def test_editing_the_body_changes_the_key() -> None:
    original = define("def task(x):\n    return x + 1\n")
    edited = define("def task(x):\n    return x + 2\n")
    renamed_local = define("def task(x):\n    y = x\n    return y + 1\n")
    assert key_of(original, 1) != key_of(edited, 1)
    assert key_of(original, 1) != key_of(renamed_local, 1)


def test_editing_a_nested_function_changes_the_key() -> None:
    template = "def task(xs):\n    return [v * {} for v in xs]\n"
    assert key_of(define(template.format(2)), [1]) != key_of(define(template.format(3)), [1])


def test_default_arguments_change_the_key() -> None:
    assert key_of(define("def task(x, y=1):\n    return x + y\n"), 1) != key_of(
        define("def task(x, y=2):\n    return x + y\n"), 1
    )
    assert key_of(define("def task(x, *, y=1):\n    return x + y\n"), 1) != key_of(
        define("def task(x, *, y=2):\n    return x + y\n"), 1
    )


def test_referenced_global_constant_changes_the_key() -> None:
    source = "def task(x):\n    return x * SCALE\n"
    assert key_of(define(source, SCALE=2), 1) == key_of(define(source, SCALE=2), 1)
    assert key_of(define(source, SCALE=2), 1) != key_of(define(source, SCALE=3), 1)
    assert key_of(define(source, SCALE=[1, 2]), 1) != key_of(define(source, SCALE=[1, 3]), 1)


def test_unreferenced_global_does_not_change_the_key() -> None:
    source = "def task(x):\n    return x\n"
    assert key_of(define(source, OTHER=1), 1) == key_of(define(source, OTHER=2), 1)


def test_referenced_helper_function_contributes_its_code() -> None:
    source = "def helper(x):\n    return x + {}\n\ndef task(x):\n    return helper(x)\n"
    assert key_of(define(source.format(1)), 1) == key_of(define(source.format(1)), 1)
    assert key_of(define(source.format(1)), 1) != key_of(define(source.format(2)), 1)


def test_mutual_recursion_terminates_and_is_stable() -> None:
    source = (
        "def even(n):\n    return True if n == 0 else odd(n - 1)\n\n"
        "def odd(n):\n    return False if n == 0 else even(n - 1)\n"
    )
    assert key_of(define(source, "even"), 4) == key_of(define(source, "even"), 4)
    assert key_of(define(source, "even"), 4) != key_of(define(source, "odd"), 4)


def test_globals_that_are_not_plain_data_contribute_their_type_only() -> None:
    source = "import math\n\ndef task(x):\n    return math.sqrt(x) + LOCK_HOLDER.n\n"

    class Holder:
        def __init__(self, n: int):
            self.n = n
            self.lock = threading.Lock()

    # Not plain data (and not even picklable): no error, the key ignores the state.
    assert key_of(define(source, LOCK_HOLDER=Holder(1)), 1) == key_of(
        define(source, LOCK_HOLDER=Holder(2)), 1
    )


def test_closure_contents_change_the_key() -> None:
    def make(scale: float) -> Any:
        def task(x: float) -> float:
            return x * scale

        return task

    assert key_of(make(2.0), 1) == key_of(make(2.0), 1)
    assert key_of(make(2.0), 1) != key_of(make(3.0), 1)


def test_partial_contributes_bound_arguments() -> None:
    assert key_of(functools.partial(add_one), 1) == key_of(functools.partial(add_one), 1)
    assert key_of(functools.partial(pow, 2), 3) != key_of(functools.partial(pow, 3), 3)
    assert key_of(functools.partial(pow, 2), 3).startswith("pow_")


def test_builtins_and_callable_instances() -> None:
    assert key_of(len, [1]) != key_of(sum, [1])
    assert key_of(len, [1]) == key_of(len, [1])

    class Multiply:
        def __init__(self, factor: int):
            self.factor = factor

        def __call__(self, x: int) -> int:
            return x * self.factor

    assert key_of(Multiply(2), 1) == key_of(Multiply(2), 1)
    assert key_of(Multiply(2), 1) != key_of(Multiply(3), 1)


def test_not_callable_is_rejected() -> None:
    with pytest.raises(TypeError, match="callable"):
        compute_key(42, (), {}, future_key=no_futures)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the arguments

def test_numbers_of_different_types_give_different_keys() -> None:
    ones: list[Any] = [1, 1.0, True, 1 + 0j, np.int64(1), np.float64(1.0), "1", b"1"]
    assert len({key_of(add_one, value) for value in ones}) == len(ones)
    empties: list[Any] = [0, 0.0, False, None, "", b"", (), []]
    assert len({key_of(add_one, value) for value in empties}) == len(empties)


def test_large_and_negative_integers() -> None:
    assert key_of(add_one, 2**100) != key_of(add_one, 2**100 + 1)
    assert key_of(add_one, -1) != key_of(add_one, 255)


def test_dict_order_is_part_of_the_key_but_keyword_order_is_not() -> None:
    """list(d) differs between the two dicts, so a function may return different results:
    sharing a key would be a wrong hit. Keyword arguments bind by name: order is moot."""
    assert key_of(add_one, {"a": 1, "b": 2}) != key_of(add_one, {"b": 2, "a": 1})
    assert key_of(add_one, {"a": 1, "b": 2}) == key_of(add_one, dict([("a", 1), ("b", 2)]))
    assert key_of(add_one, {"a": 1, "b": 2}) != key_of(add_one, {"a": 2, "b": 1})
    assert key_of(add_one, x={"a": 1}, y=2) == key_of(add_one, y=2, x={"a": 1})


def test_sets_are_order_independent() -> None:
    words = [f"word{i}" for i in range(50)]
    assert key_of(add_one, set(words)) == key_of(add_one, set(reversed(words)))
    assert key_of(add_one, set(words)) != key_of(add_one, frozenset(words))
    assert key_of(add_one, set(words)) != key_of(add_one, set(words[1:]))


def test_containers_are_type_tagged_and_positional() -> None:
    assert key_of(add_one, [1, 2]) != key_of(add_one, (1, 2))
    assert key_of(add_one, [1, 2]) != key_of(add_one, [2, 1])
    assert key_of(add_one, [[1], 2]) != key_of(add_one, [1, [2]])
    assert key_of(add_one, (1, 2)) != key_of(add_one, 1, 2)
    assert key_of(add_one, b"ab") != key_of(add_one, bytearray(b"ab"))
    assert key_of(add_one, range(3)) != key_of(add_one, range(4))
    point = namedtuple("point", "x y")
    assert key_of(add_one, point(1, 2)) != key_of(add_one, (1, 2))
    assert key_of(add_one, point(1, 2)) == key_of(add_one, point(1, 2))


def test_numpy_arrays() -> None:
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    assert key_of(add_one, base) == key_of(add_one, base.copy())
    assert key_of(add_one, base.T) == key_of(add_one, np.ascontiguousarray(base.T))
    assert key_of(add_one, base) != key_of(add_one, base.astype(np.float32))
    assert key_of(add_one, base) != key_of(add_one, base.reshape(4, 3))
    changed = base.copy()
    changed[2, 3] = -1
    assert key_of(add_one, base) != key_of(add_one, changed)
    objects = np.array([{"a": 1}, [1, 2], None], dtype=object)
    assert key_of(add_one, objects) == key_of(add_one, objects.copy())
    assert key_of(add_one, objects) != key_of(add_one, objects[::-1].copy())
    assert key_of(add_one, np.zeros(0)) != key_of(add_one, np.zeros((0, 2)))


def test_dataclasses() -> None:
    @dataclasses.dataclass
    class Params:
        alpha: float
        names: list[str]

    @dataclasses.dataclass
    class Other:
        alpha: float
        names: list[str]

    assert key_of(add_one, Params(1.0, ["a"])) == key_of(add_one, Params(1.0, ["a"]))
    assert key_of(add_one, Params(1.0, ["a"])) != key_of(add_one, Params(1.0, ["b"]))
    assert key_of(add_one, Params(1.0, ["a"])) != key_of(add_one, Other(1.0, ["a"]))


def test_enums_and_paths() -> None:
    class Color(enum.Enum):
        RED = 1
        BLUE = 2

    assert key_of(add_one, Color.RED) != key_of(add_one, Color.BLUE)
    assert key_of(add_one, Color.RED) != key_of(add_one, 1)
    assert key_of(add_one, pathlib.Path("/a/b")) == key_of(add_one, pathlib.Path("/a//b"))
    assert key_of(add_one, pathlib.Path("/a/b")) != key_of(add_one, "/a/b")
    assert key_of(add_one, pathlib.PurePosixPath("/a")) != key_of(add_one, pathlib.Path("/a"))


class Opaque:
    """Encoded through the pickle fallback."""

    def __init__(self, value: Any):
        self.value = value


def test_pickle_fallback_distinguishes_state() -> None:
    assert key_of(add_one, Opaque([1, 2])) == key_of(add_one, Opaque([1, 2]))
    assert key_of(add_one, Opaque([1, 2])) != key_of(add_one, Opaque([1, 3]))


def test_functions_as_arguments_use_their_identity() -> None:
    assert key_of(map, add_one, [1]) == key_of(map, add_one, [1])
    first = define("def g(x):\n    return x + 1\n", "g")
    second = define("def g(x):\n    return x - 1\n", "g")
    assert key_of(map, first, [1]) != key_of(map, second, [1])


def test_futures_contribute_their_future_key() -> None:
    upstream: dict[int, str] = {}
    first, second, third = Future(), Future(), Future()  # type: ignore[var-annotated]
    upstream.update({id(first): "up_a", id(second): "up_a", id(third): "up_b"})
    seen: list[Future[Any]] = []

    def future_key(fut: Future[Any]) -> str:
        seen.append(fut)
        return upstream[id(fut)]

    def key(*args: Any, **kwargs: Any) -> str:
        return compute_key(add_one, args, kwargs, future_key=future_key)

    assert key(first) == key(second)
    assert key(first) != key(third)
    assert key([first, 1]) != key([third, 1])
    assert key(x=first) == key(x=second)
    assert key(first) != key("up_a")  # a future is not its key string
    assert first in seen and third in seen


def test_unpicklable_argument_raises_serialization_error_naming_it() -> None:
    with pytest.raises(SerializationError, match=r"positional argument 1 .*lock"):
        key_of(add_one, 1, threading.Lock())
    with pytest.raises(SerializationError, match=r"keyword argument 'guard'.*list.*lock"):
        key_of(add_one, guard=[1, threading.Lock()])


def test_self_containing_argument_raises_a_clear_error() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(SerializationError, match=r"positional argument 0 .*contains itself"):
        key_of(add_one, loop)
    mapping: dict[str, Any] = {}
    mapping["self"] = mapping
    with pytest.raises(SerializationError, match="contains itself"):
        key_of(add_one, data=mapping)


def test_shared_but_acyclic_references_are_fine() -> None:
    shared = [1, 2]
    assert key_of(add_one, [shared, shared]) == key_of(add_one, [[1, 2], [1, 2]])


def test_deeply_nested_argument_raises_serialization_error() -> None:
    nested: list[Any] = []
    for _ in range(sys.getrecursionlimit() * 2):
        nested = [nested]
    with pytest.raises(SerializationError, match="nested too deeply"):
        key_of(add_one, nested)


# --------------------------------------------------------------------------------------------
# user-given keys

@pytest.mark.parametrize("key", ["a", "A1", "run-3.final_v2", "0abc", "x" * 200])
def test_validate_cache_key_accepts(key: str) -> None:
    assert validate_cache_key(key) == key


@pytest.mark.parametrize(
    "key", ["", ".hidden", "-dash", "_under", "a//b", "/abs", "a/../b", "a/", "a b", "a\\b",
            "ü", "x" * 201, "a\n", None]
)
def test_validate_cache_key_rejects(key: Any) -> None:
    with pytest.raises(ResourceError, match=r"cache_key.*A-Z, a-z, 0-9") as info:
        validate_cache_key(key)
    assert info.value.key == "cache_key"


# --------------------------------------------------------------------------------------------
# what a function reads from user modules (docs/cache.md, "Keys")

HELPER_V1 = "SCALE = 2\n\ndef g(x):\n    return x * SCALE\n"
HELPER_V2 = "SCALE = 2\n\ndef g(x):\n    return x * SCALE + 1\n"
TASKS = textwrap.dedent('''
    import {helper}

    def through_module(x):
        return {helper}.g(x)

    def imports_in_body(x):
        import {helper}
        return {helper}.g(x)

    def from_import_in_body(x):
        from {helper} import g
        return g(x)
''')


@pytest.fixture
def user_modules(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, request):
    """A helper module and a task module in a temporary directory (user code, importable)."""
    import importlib

    helper = f"ek_helper_{request.node.name.replace('[', '_').replace(']', '_')}"
    tasks = helper.replace("helper", "tasks")
    (tmp_path / f"{helper}.py").write_text(HELPER_V1)
    (tmp_path / f"{tasks}.py").write_text(TASKS.format(helper=helper))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()

    def edit_helper(source: str) -> None:
        (tmp_path / f"{helper}.py").write_text(source)
        importlib.invalidate_caches()
        importlib.reload(sys.modules[helper])

    yield importlib.import_module(tasks), edit_helper
    for name in (helper, tasks):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("task", ["through_module", "imports_in_body", "from_import_in_body"])
def test_editing_a_helper_read_through_a_module_changes_the_key(user_modules, task) -> None:
    tasks, edit_helper = user_modules
    fn = getattr(tasks, task)
    fn(1)  # an import in the body happens when the function runs (and so before it is keyed)
    before = key_of(fn, 3)
    assert key_of(fn, 3) == before  # the memo answers while nothing changed
    edit_helper(HELPER_V2)
    assert key_of(fn, 3) != before
    edit_helper(HELPER_V1)
    assert key_of(fn, 3) == before


def test_a_helper_modules_data_read_by_the_function_is_keyed(user_modules) -> None:
    tasks, edit_helper = user_modules
    before = key_of(tasks.through_module, 3)
    edit_helper(HELPER_V1.replace("SCALE = 2", "SCALE = 3"))
    # g reads SCALE: g's own globals are part of g's identity
    assert key_of(tasks.through_module, 3) != before


class Settings:
    def __init__(self, factor: float):
        self.factor = factor


SETTINGS = Settings(2.0)


def uses_module_level_instance(x: float) -> float:
    return x * SETTINGS.factor


def test_a_module_level_instance_of_a_plain_class_is_keyed_by_its_state() -> None:
    global SETTINGS
    before = key_of(uses_module_level_instance, 1.0)
    SETTINGS.factor = 3.0
    try:
        assert key_of(uses_module_level_instance, 1.0) != before
        SETTINGS = Settings(2.0)  # a new object in the same state: the same key
        assert key_of(uses_module_level_instance, 1.0) == before
    finally:
        SETTINGS = Settings(2.0)


def test_installed_modules_are_not_walked() -> None:
    from executorkit.cache._keys import module_attributes_read

    def uses_os(path: str) -> str:
        return os.path.join(path, "x")

    assert module_attributes_read(uses_os) == []
