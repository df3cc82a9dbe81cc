"""What every executorkit executor adds to ``concurrent.futures.Executor`` for executorlib
users: ``map`` over a future of an iterable, ``bool(exe)`` always true (``len(exe)`` counts
unfinished calls, and an idle executor is still an executor), and the refusal of a function
that takes a ``resource_dict`` parameter of its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from typing import Any

from executorkit.errors import ResourceError

__all__ = ["ExecutorkitExecutor", "check_function"]


class ExecutorkitExecutor(Executor):
    """Mixin of the public executors (documented on each public class)."""

    def map(self, fn: Callable[..., Any], *iterables: Any, timeout: float | None = None,
            chunksize: int = 1, **kwargs: Any) -> Iterator[Any]:
        """Like ``Executor.map``; an iterable given as a Future (say, the result of another
        call) is waited for first, counted against ``timeout``, as executorlib does.
        ``chunksize`` is accepted as ProcessPoolExecutor does (each call is its own task
        here) and, as there, must be >= 1."""
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize!r}")
        if any(isinstance(it, Future) for it in iterables):
            iterables = tuple(it.result(timeout=timeout) if isinstance(it, Future) else it
                              for it in iterables)
        return super().map(fn, *iterables, timeout=timeout, chunksize=chunksize, **kwargs)

    def __bool__(self) -> bool:
        # __len__ counts unfinished calls; without this an idle executor would be falsy.
        return True


def check_function(fn: Callable[..., Any]) -> None:
    """Refuse a function that has a parameter named ``resource_dict``.

    ``submit(fn, resource_dict=...)`` is the call's resources, so the function could never
    receive its own argument of that name: the call would be ambiguous (executorlib refuses
    it too).
    """
    if _takes_resource_dict(fn):
        name = getattr(fn, "__qualname__", None) or repr(fn)
        raise ResourceError(
            f"{name} has a parameter named 'resource_dict', which submit() reserves for the "
            "call's resources; rename the parameter (or wrap the function)",
            key="resource_dict", allowed="functions without a 'resource_dict' parameter")


def _takes_resource_dict(fn: Callable[..., Any]) -> bool:
    code = getattr(fn, "__code__", None)
    if code is not None:  # plain functions: no signature object needed (fast, per submit)
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        return "resource_dict" in names
    try:
        return "resource_dict" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
