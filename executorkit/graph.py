"""Dependency edges: futures found in a call's arguments.

A Future anywhere in the arguments (directly, or nested in lists, tuples, dicts, sets,
frozensets and dataclass instances) is an input of the call. When all inputs are done their
results replace them (:func:`substitute`). Failure propagation lives with the engine, which
turns a failed or cancelled input into a :class:`~executorkit.errors.DependencyError`.

Dict *keys* are not searched: a future used as a key is hashed by identity, and replacing it
would change the dict's meaning.

Two kinds of future carry where they come from, so a dry run can draw and export them as
edges: an :class:`ItemFuture` is item ``key`` of another future's result (made by
``get_item_from_future`` and ``split_future``; :func:`item_origin` also reads executorlib's
``FutureSelector``), and a :class:`DryRunFuture` stands for a call a dry run recorded.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

__all__ = ["DryRunFuture", "ItemFuture", "find_futures", "is_dry_run", "item_origin",
           "substitute"]

# Types that never contain a future; checked by exact type, which is the fast path for the
# arguments of nearly every call.
_ATOMS = frozenset({int, float, str, bytes, bool, type(None), complex, bytearray, range})
_CONTAINERS = (list, tuple, set, frozenset, dict)


def _walk(obj: Any, found: list[Future], seen: set[int]) -> None:
    cls = type(obj)
    if cls in _ATOMS:
        return
    if isinstance(obj, Future):
        if id(obj) not in seen:
            seen.add(id(obj))
            found.append(obj)
        return
    if isinstance(obj, _CONTAINERS) or _is_dataclass_instance(obj):
        if id(obj) in seen:  # a self-referencing structure
            return
        seen.add(id(obj))
        for item in _children(obj):
            _walk(item, found, seen)


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, Mapping):
        return list(obj.values())
    if _is_dataclass_instance(obj):
        return [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return list(obj)


def find_futures(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Future]:
    """Every distinct future in ``args`` and ``kwargs``, in order of first appearance."""
    found: list[Future] = []
    seen: set[int] = set()
    for arg in args:
        if type(arg) not in _ATOMS:
            _walk(arg, found, seen)
    for arg in kwargs.values():
        if type(arg) not in _ATOMS:
            _walk(arg, found, seen)
    return found


def substitute(obj: Any, value_of: Callable[[Future], Any],
               _memo: dict[int, Any] | None = None) -> Any:
    """A copy of ``obj`` with every future replaced by ``value_of(future)``.

    Containers without futures are returned as they are (no copy); those with futures are
    rebuilt with their own type (subclasses of list/dict/tuple included). A container that
    contains itself is rebuilt once; for lists and dicts the loop is kept.
    """
    if type(obj) in _ATOMS:
        return obj
    if isinstance(obj, Future):
        return value_of(obj)
    if not (isinstance(obj, _CONTAINERS) or _is_dataclass_instance(obj)):
        return obj
    if _memo is None:
        _memo = {}
    elif id(obj) in _memo:
        return _memo[id(obj)]
    if not find_futures((obj,), {}):
        return obj
    if type(obj) is list:  # fill in place so a self-reference points at the copy
        out: list[Any] = []
        _memo[id(obj)] = out
        out.extend(substitute(v, value_of, _memo) for v in obj)
        return out
    if type(obj) is dict:
        new: dict[Any, Any] = {}
        _memo[id(obj)] = new
        new.update((k, substitute(v, value_of, _memo)) for k, v in obj.items())
        return new
    _memo[id(obj)] = obj  # a loop through an immutable container keeps the original
    if isinstance(obj, Mapping):
        result = _rebuild(obj, {k: substitute(v, value_of, _memo) for k, v in obj.items()})
    elif _is_dataclass_instance(obj):
        result = copy.copy(obj)
        _memo[id(obj)] = result
        for f in dataclasses.fields(obj):
            # object.__setattr__ also works for frozen dataclasses
            object.__setattr__(result, f.name,
                               substitute(getattr(obj, f.name), value_of, _memo))
    else:
        items = [substitute(v, value_of, _memo) for v in obj]
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            result = type(obj)(*items)
        else:
            result = _rebuild(obj, items)
    _memo[id(obj)] = result
    return result


def _rebuild(obj: Any, items: Any) -> Any:
    cls = type(obj)
    if cls in (list, tuple, set, frozenset, dict):
        return cls(items)
    try:
        return cls(items)
    except TypeError:  # a subclass with another constructor: fall back to the base type
        for base in (dict, list, tuple, frozenset, set):
            if isinstance(obj, base):
                return base(items)
        raise


def substitute_call(
    args: tuple[Any, ...], kwargs: dict[str, Any], value_of: Callable[[Future], Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments of a call with futures replaced by their results."""
    new_args = tuple(substitute(a, value_of) for a in args)
    new_kwargs = {k: substitute(v, value_of) for k, v in kwargs.items()}
    return new_args, new_kwargs


class ItemFuture(Future):
    """A future of ``source.result()[key]``."""

    def __init__(self, source: Future, key: Any) -> None:
        super().__init__()
        self.source = source
        self.key = key


class DryRunFuture(Future):
    """Stands for a call that a dry run recorded instead of running. It is done at once with
    the result ``None`` (what executorlib's dry runs return), so nothing waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.set_result(None)


def item_origin(future: Future) -> tuple[Future, Any] | None:
    """``(source, key)`` if ``future`` is item ``key`` of ``source``'s result, else None."""
    if isinstance(future, ItemFuture):
        return future.source, future.key
    # executorlib's FutureSelector keeps the same two facts; __dict__ because it forwards
    # unknown attributes to its source future.
    attributes = getattr(future, "__dict__", {})
    source = attributes.get("_future")
    if isinstance(source, Future) and "_selector" in attributes:
        return source, attributes["_selector"]
    return None


def is_dry_run(future: Future) -> bool:
    """True for a :class:`DryRunFuture` and for items taken from one."""
    seen: set[int] = set()
    while id(future) not in seen:
        seen.add(id(future))
        if isinstance(future, DryRunFuture):
            return True
        origin = item_origin(future)
        if origin is None:
            return False
        future = origin[0]
    return False
