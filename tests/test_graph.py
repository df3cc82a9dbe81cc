"""Tests of executorkit.graph: finding futures in call arguments and substituting results."""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict, namedtuple
from concurrent.futures import Future
from typing import Any, NamedTuple

import pytest

from executorkit.graph import find_futures, substitute, substitute_call


def fut() -> Future[Any]:
    return Future()


@dataclasses.dataclass
class Point:
    x: Any
    y: Any = 0


@dataclasses.dataclass(frozen=True)
class FrozenPair:
    a: Any
    b: Any


@dataclasses.dataclass(frozen=True, slots=True)
class SlottedFrozen:
    value: Any
    label: str = "s"


class Pair(NamedTuple):
    left: Any
    right: Any


Triple = namedtuple("Triple", "a b c")


class MyList(list):
    pass


class MyTuple(tuple):
    __slots__ = ()


class MyDict(dict):
    pass


class StrictDict(dict):
    """A dict subclass whose constructor does not take a mapping."""

    def __init__(self, owner: str, extra: int) -> None:
        super().__init__()
        self.owner = owner
        self.extra = extra


class StrictList(list):
    def __init__(self, a: int, b: int) -> None:
        super().__init__()


# --------------------------------------------------------------------------- find_futures
def test_finds_nothing_in_plain_data() -> None:
    assert find_futures((1, "a", 2.5, None, b"x", [1, {"k": (2, 3)}]), {"z": {1, 2}}) == []


def test_finds_direct_args_and_kwargs_in_order() -> None:
    a, b, c = fut(), fut(), fut()
    assert find_futures((a, 1, b), {"k": c}) == [a, b, c]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda f: [f],
        lambda f: (f,),
        lambda f: {"k": f},
        lambda f: {f},
        lambda f: frozenset({f}),
        lambda f: Point(f),
        lambda f: Point(0, [f]),
        lambda f: FrozenPair(1, f),
        lambda f: SlottedFrozen(f),
        lambda f: Pair(1, f),
        lambda f: Triple(0, 0, {"deep": [(f,)]}),
        lambda f: MyList([f]),
        lambda f: MyTuple((f,)),
        lambda f: MyDict(k=f),
        lambda f: OrderedDict(k=f),
        lambda f: [[[[[[[[[[f]]]]]]]]]],
        lambda f: {"a": [({"b": frozenset({(f,)})},)]},
    ],
    ids=[
        "list", "tuple", "dict-value", "set", "frozenset", "dataclass", "dataclass-nested",
        "frozen-dataclass", "slots-frozen-dataclass", "namedtuple", "namedtuple-nested",
        "list-subclass", "tuple-subclass", "dict-subclass", "ordereddict", "deep", "mixed",
    ],
)
def test_finds_nested_future(wrap: Any) -> None:
    f = fut()
    assert find_futures((wrap(f),), {}) == [f]
    assert find_futures((), {"arg": wrap(f)}) == [f]


def test_dict_keys_are_not_searched() -> None:
    key = fut()
    assert find_futures(({key: 1},), {}) == []
    value = fut()
    assert find_futures(({key: value},), {}) == [value]


def test_order_of_first_appearance_and_deduplication() -> None:
    a, b, c = fut(), fut(), fut()
    args = ([b, a], {"x": b, "y": (c, a)}, a)
    kwargs = {"k1": c, "k2": [b, Point(a, c)]}
    assert find_futures(args, kwargs) == [b, a, c]


def test_same_container_twice_is_not_a_problem() -> None:
    a = fut()
    shared = [a]
    assert find_futures((shared, shared, [shared]), {"s": shared}) == [a]


def test_self_referencing_list_terminates() -> None:
    a = fut()
    loop: list[Any] = [a]
    loop.append(loop)
    assert find_futures((loop,), {}) == [a]


def test_mutually_referencing_containers_terminate() -> None:
    a, b = fut(), fut()
    first: list[Any] = [a]
    second: dict[str, Any] = {"f": first, "b": b}
    first.append(second)
    assert find_futures((first,), {}) == [a, b]


def test_self_referencing_dataclass_terminates() -> None:
    a = fut()
    p = Point(a)
    p.y = p
    assert find_futures((p,), {}) == [a]


def test_other_objects_are_opaque() -> None:
    class Holder:
        def __init__(self, f: Future[Any]) -> None:
            self.f = f

    a = fut()
    # Only the documented container kinds are searched; arbitrary objects are not.
    assert find_futures((Holder(a),), {}) == []
    # A dataclass *class* (not an instance) is not searched either.
    assert find_futures((Point,), {}) == []


def test_future_subclass_counts() -> None:
    class MyFuture(Future):  # type: ignore[type-arg]
        pass

    f = MyFuture()
    assert find_futures(([f],), {}) == [f]


# --------------------------------------------------------------------------- substitute
def value_of(mapping: dict[Future[Any], Any]) -> Any:
    return lambda f: mapping[f]


def test_substitute_direct_future() -> None:
    a = fut()
    assert substitute(a, value_of({a: 42})) == 42


def test_substitute_rebuilds_builtin_containers_with_their_types() -> None:
    a, b = fut(), fut()
    vals = value_of({a: 1, b: 2})
    assert substitute([a, 3], vals) == [1, 3]
    out_tuple = substitute((a, b), vals)
    assert type(out_tuple) is tuple
    assert out_tuple == (1, 2)
    out_set = substitute({a, b}, vals)
    assert type(out_set) is set
    assert out_set == {1, 2}
    out_fs = substitute(frozenset({a}), vals)
    assert type(out_fs) is frozenset
    assert out_fs == frozenset({1})
    assert substitute({"x": a, "y": [b]}, vals) == {"x": 1, "y": [2]}


def test_substitute_keeps_subclass_types() -> None:
    a = fut()
    vals = value_of({a: 7})
    out_list = substitute(MyList([a, 1]), vals)
    assert type(out_list) is MyList
    assert out_list == [7, 1]
    out_tuple = substitute(MyTuple((a,)), vals)
    assert type(out_tuple) is MyTuple
    assert out_tuple == (7,)
    out_dict = substitute(MyDict(k=a), vals)
    assert type(out_dict) is MyDict
    assert out_dict == {"k": 7}
    ordered = substitute(OrderedDict([("z", a), ("a", 1)]), vals)
    assert type(ordered) is OrderedDict
    assert list(ordered.items()) == [("z", 7), ("a", 1)]


def test_substitute_namedtuple() -> None:
    a, b = fut(), fut()
    vals = value_of({a: "L", b: "C"})
    out = substitute(Pair(a, 2), vals)
    assert type(out) is Pair
    assert out == Pair("L", 2)
    assert out.left == "L"
    nested = substitute(Triple(1, [a], Pair(b, b)), vals)
    assert type(nested) is Triple
    assert nested == Triple(1, ["L"], Pair("C", "C"))
    assert type(nested.c) is Pair


def test_substitute_dataclass_fields() -> None:
    a, b = fut(), fut()
    vals = value_of({a: 10, b: 20})
    p = Point(a, [b])
    out = substitute(p, vals)
    assert type(out) is Point
    assert out == Point(10, [20])
    assert p.x is a  # the input is untouched
    assert p.y[0] is b


def test_substitute_frozen_dataclasses() -> None:
    a = fut()
    vals = value_of({a: 3})
    frozen = FrozenPair(a, "keep")
    out = substitute(frozen, vals)
    assert type(out) is FrozenPair
    assert out == FrozenPair(3, "keep")
    assert frozen.a is a
    slotted = SlottedFrozen(a, "lbl")
    out2 = substitute(slotted, vals)
    assert type(out2) is SlottedFrozen
    assert out2 == SlottedFrozen(3, "lbl")
    assert slotted.value is a


def test_substitute_dict_subclass_with_other_constructor_falls_back_to_dict() -> None:
    a = fut()
    d = StrictDict("me", 1)
    d["k"] = a
    out = substitute(d, value_of({a: 5}))
    assert type(out) is dict
    assert out == {"k": 5}
    assert d["k"] is a


def test_substitute_list_subclass_with_other_constructor_falls_back_to_list() -> None:
    a = fut()
    items = StrictList(0, 0)
    items.append(a)
    out = substitute(items, value_of({a: 5}))
    assert type(out) is list
    assert out == [5]


def test_substitute_keeps_dict_keys() -> None:
    key, val = fut(), fut()
    d = {key: val}
    out = substitute(d, value_of({val: "v"}))
    assert list(out.keys()) == [key]
    assert out[key] == "v"


def test_containers_without_futures_are_returned_as_is() -> None:
    inner = [1, 2]
    outer_dict = {"a": (3,)}
    point = Point(1, 2)
    a = fut()
    for obj in (inner, outer_dict, point, (1, [2]), {1, 2}, frozenset({3}), Pair(1, 2)):
        assert substitute(obj, value_of({})) is obj
    # Unchanged branches of a container that has a future elsewhere are shared, not copied.
    mixed = [inner, a, outer_dict]
    out = substitute(mixed, value_of({a: 0}))
    assert out is not mixed
    assert out[0] is inner
    assert out[2] is outer_dict
    assert out[1] == 0


def test_substitute_does_not_mutate_the_input() -> None:
    a, b = fut(), fut()
    args = {"l": [a, {"b": b}], "t": (a,), "s": {b}, "p": Point(a, [b])}
    snapshot = copy.copy(args)
    inner_list = args["l"]
    inner_dict = args["l"][1]
    point = args["p"]
    out = substitute(args, value_of({a: 1, b: 2}))
    assert out == {"l": [1, {"b": 2}], "t": (1,), "s": {2}, "p": Point(1, [2])}
    assert args == snapshot
    assert args["l"] is inner_list
    assert inner_list[0] is a
    assert inner_dict["b"] is b
    assert args["s"] == {b}
    assert point.x is a
    assert point.y[0] is b


def test_value_of_called_for_each_occurrence() -> None:
    a = fut()
    calls: list[Future[Any]] = []

    def lookup(f: Future[Any]) -> int:
        calls.append(f)
        return 9

    assert substitute([a, (a,), {"k": a}], lookup) == [9, (9,), {"k": 9}]
    assert calls == [a, a, a]


def test_substitute_call() -> None:
    a, b = fut(), fut()
    const = [1, 2]
    args, kwargs = substitute_call((a, const), {"k": [b], "c": const}, value_of({a: 1, b: 2}))
    assert args == (1, [1, 2])
    assert args[1] is const
    assert kwargs == {"k": [2], "c": [1, 2]}
    assert kwargs["c"] is const


def test_substitute_self_referencing_list_with_future() -> None:
    a = fut()
    loop: list[Any] = [a]
    loop.append(loop)
    out = substitute(loop, value_of({a: 1}))
    assert out[0] == 1
    assert out[1] is out  # the cycle is preserved in the copy
    assert loop[0] is a
