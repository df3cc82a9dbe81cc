"""The engine's use of the cache: look a call up before it runs, tell the worker where to
record it.

Keys are computed in the driver, so every backend gives the same call the same key. A
Future argument contributes its upstream task's key (Merkle chaining), so a cached
downstream result is found without running, or even loading, anything upstream. When an
input is a Future without a key (from another executor, or an uncached task), the key is
computed once the inputs are known, from their values.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any, Protocol

from executorkit.cache._keys import compute_key
from executorkit.transport import CacheSpec

if TYPE_CHECKING:
    from executorkit.cache._store import CacheStore


class _CallResources(Protocol):
    cache_directory: str | None
    cache_key: str | None

    def as_dict(self) -> dict[str, Any]: ...


class _Call(Protocol):
    """What the hook reads and sets on an engine task (the engine's ``_Task`` has these)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    res: _CallResources
    future: Future
    key: str | None
    cache_spec: CacheSpec | None


class _NoKeyYet(Exception):
    """An input future has no cache key: hash its value once it is known."""


def _future_key(fut: Future) -> str:
    task = getattr(fut, "_task", None)
    key = getattr(task, "key", None)
    if key is None:
        raise _NoKeyYet
    return key


class CacheHook:
    """Per-executor cache logic; ``init_function`` (block allocation) is part of every key,
    because the functions receive what it returns."""

    def __init__(self, init_function: Any = None) -> None:
        self._init = init_function
        self._stores: dict[str, CacheStore] = {}

    def _store(self, directory: str) -> CacheStore:
        store = self._stores.get(directory)
        if store is None:
            from executorkit.cache._store import CacheStore

            store = self._stores[directory] = CacheStore(directory)
        return store

    def _key(self, task: _Call) -> str:
        kwargs = task.kwargs
        if self._init is not None:
            kwargs = {**kwargs, "\0init_function": self._init}
        return compute_key(task.fn, task.args, kwargs, future_key=_future_key)

    def prepare(self, task: _Call, deps: list[Future]) -> bool:
        """At submit. False: the future was answered from the cache (nothing to run)."""
        directory = task.res.cache_directory
        if directory is None:
            return True
        key = task.res.cache_key
        if key is None:
            try:
                key = self._key(task)
            except _NoKeyYet:
                return True  # decided in ready(), once the inputs are known
        return self._lookup(task, directory, key)

    def ready(self, task: _Call) -> bool:
        """Inputs resolved. False: answered from the cache."""
        directory = task.res.cache_directory
        if directory is None or task.key is not None:
            return True
        return self._lookup(task, directory, self._key(task))

    def _lookup(self, task: _Call, directory: str, key: str) -> bool:
        task.key = key
        hit, value = self._store(directory).lookup(key)
        if hit:
            with contextlib.suppress(InvalidStateError):  # cancelled by the user meanwhile
                task.future.set_result(value)
            return False
        if "/" in key:  # a user's "subdir/name": the worker keeps <key>.out there too
            os.makedirs(os.path.dirname(os.path.join(directory, key)), exist_ok=True)
        task.cache_spec = CacheSpec(directory, key, _name(task.fn), task.res.as_dict())
        return True


def _name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or ""
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}" if module else qualname
