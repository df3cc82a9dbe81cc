"""Functions that exported workflows call to rebuild arguments which are not plain JSON.

A function node of a Python Workflow Definition names a function; these are the ones an
export uses for what a call's arguments held besides literals and results:

- lists and ``str``-keyed dicts use the format's own helpers, written as
  ``python_workflow_definition.shared.get_list`` / ``get_dict`` (:data:`PWD_HELPERS`), so
  aiida, jobflow, pyiron and the reference runner need nothing from executorkit for them.
  :func:`get_list` and :func:`get_dict` are executorkit's equivalents, used by
  :func:`~executorkit.export.run_workflow` for those names;
- the format has no tuple, set, array or integer-index helper: :func:`get_tuple`,
  :func:`get_set`, :func:`get_frozenset`, :func:`get_array` and :func:`get_item` are named
  ``executorkit.export.helpers.<name>``. Other tools run them where executorkit is
  importable (all take keyword arguments only, as every PWD runner calls).

Element ports are ``"0"``, ``"1"``, ... for sequences and the keys for dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from executorkit.errors import WorkflowError

__all__ = [
    "PWD_HELPERS",
    "get_array",
    "get_dict",
    "get_frozenset",
    "get_item",
    "get_list",
    "get_set",
    "get_tuple",
]


def get_list(**items: Any) -> list[Any]:
    """``[items["0"], items["1"], ...]``."""
    return [items[key] for key in _index_ports(items)]


def get_dict(**items: Any) -> dict[str, Any]:
    """The dict of the ports (one per key)."""
    return dict(items)


def get_tuple(**items: Any) -> tuple[Any, ...]:
    """``(items["0"], items["1"], ...)``."""
    return tuple(get_list(**items))


def get_set(**items: Any) -> set[Any]:
    """The set of the values on ports ``"0"``, ``"1"``, ..."""
    return set(get_list(**items))


def get_frozenset(**items: Any) -> frozenset[Any]:
    """The frozenset of the values on ports ``"0"``, ``"1"``, ..."""
    return frozenset(get_list(**items))


def get_array(value: Any, dtype: str) -> Any:
    """``numpy.asarray(value, dtype=dtype)``: a numpy array argument, exported as nested
    lists and its dtype string."""
    import numpy

    return numpy.asarray(value, dtype=dtype)


def get_item(obj: Any, key: Any) -> Any:
    """``obj[key]``: an integer item of a result (a ``sourcePort`` is a string, which a
    tuple or list cannot be indexed with)."""
    return obj[key]


def _index_ports(items: Mapping[str, Any]) -> list[str]:
    keys = [str(i) for i in range(len(items))]
    if set(keys) != set(items):
        raise WorkflowError(f"element ports must be '0', '1', ... without gaps, got "
                            f"{sorted(items)}")
    return keys


#: The format's own helpers: the name written into a workflow -> executorkit's equivalent.
PWD_HELPERS: dict[str, Callable[..., Any]] = {
    "python_workflow_definition.shared.get_list": get_list,
    "python_workflow_definition.shared.get_dict": get_dict,
}
