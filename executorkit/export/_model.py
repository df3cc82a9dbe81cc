"""The graph model of a dry run: recorded calls -> nodes and edges (shared by the plot and
the export; the rules are in the package docstring)."""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from executorkit.export import helpers
from executorkit.graph import find_futures, item_origin

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_LABEL_CHARS = 28
_ARRAY_KINDS = "biuU"  # numpy dtype kinds JSON holds exactly (float: when finite)
_SUPPORTED = ("None, bool, int, finite float, str, futures, numpy arrays of numbers, bools "
              "or strings, and lists, tuples, sets and str-keyed dicts of these")


@dataclass
class Node:
    id: int
    type: str  # "function", "input" or "output"
    label: str  # text shown in the plot
    fn: Callable[..., Any] | None = None  # function nodes
    value: Any = None  # input nodes
    has_value: bool = True  # False for a placeholder input
    name: str | None = None  # input and output nodes
    helper: bool = False  # rebuilds an argument, not a recorded call
    problem: str | None = None  # why the node cannot be exported


@dataclass(frozen=True)
class Edge:
    source: int
    target: int
    port: str | None  # targetPort
    source_port: str | None = None  # an item of the source's result


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)


@dataclass(frozen=True)
class Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: Future[Any]


Source = tuple[int, "str | None"]  # (node id, sourcePort)


class GraphBuilder:
    """Turns recorded calls into nodes and edges."""

    def __init__(self, producers: Mapping[int, int]) -> None:
        self.graph = Graph()
        self._producers = producers  # id(future) -> index of the call that returns it
        self._call_nodes: list[int] = []  # node id of each recorded call
        self._where = ""  # the call being added, for error messages

    def build(self, calls: Iterable[Call]) -> Graph:
        for call in calls:
            self._call_nodes.append(self._add_call(call))
        self._add_outputs()
        return self.graph

    def _new(self, kind: str, label: str, **fields: Any) -> Node:
        node = Node(len(self.graph.nodes), kind, ascii_text(label), **fields)
        self.graph.nodes.append(node)
        return node

    def _input(self, value: Any, port: str, **fields: Any) -> Source:
        return self._new("input", short_repr(value), value=value, name=port, **fields).id, None

    def _function(self, fn: Callable[..., Any] | None, label: str,
                  sources: list[tuple[str, Source]], **fields: Any) -> Source:
        node = self._new("function", label, fn=fn, **fields)
        self.graph.edges.extend(Edge(source, node.id, port, source_port)
                                for port, (source, source_port) in sources)
        return node.id, None

    def _add_call(self, call: Call) -> int:
        self._where = f"{label_of(call.fn)} (call #{len(self._call_nodes)})"
        ports = call_ports(call.fn, call.args, call.kwargs)
        sources = [(port, self._source(value, port, port)) for port, value in ports]
        return self._function(call.fn, label_of(call.fn), sources)[0]

    def _source(self, value: Any, port: str, path: str,
                active: frozenset[int] = frozenset()) -> Source:
        """The node (and port) that provides ``value``, creating the nodes it needs."""
        if isinstance(value, Future):
            return self._future_source(value, port, path, active)
        if is_json_literal(value):
            return self._input(value, port)
        if _is_array(value):
            return self._array(value, port, path)
        container = _container_helper(value)
        if container is not None and id(value) not in active:
            return self._container(value, container, path, active | {id(value)})
        return self._opaque(value, port, path)

    def _future_source(self, future: Future[Any], port: str, path: str,
                       active: frozenset[int] = frozenset()) -> Source:
        index = self._producers.get(id(future))
        if index is not None:
            return self._call_nodes[index], None
        origin = item_origin(future)
        if origin is not None and id(future) not in active:
            return self._item(origin, port, path, active | {id(future)})
        if future.done() and not future.cancelled() and future.exception() is None:
            return self._source(future.result(), port, path, active)
        label = "<cancelled future>" if future.cancelled() else (
            "<failed future>" if future.done() else "<pending future>")
        return self._new("input", label, name=port, has_value=False).id, None

    def _item(self, origin: tuple[Future[Any], Any], port: str, path: str,
              active: frozenset[int]) -> Source:
        """Item ``key`` of a future's result: an edge with ``sourcePort`` = the key when the
        key is a string taken from a call's whole result, else a :func:`get_item` node."""
        source, key = origin
        upstream = self._future_source(source, port, f"{path}<source>", active)
        if isinstance(key, str) and upstream[1] is None \
                and self.graph.nodes[upstream[0]].type == "function":
            return upstream[0], key
        key_source = self._source(key, "key", f"{path}<key>")
        return self._function(helpers.get_item, "item", [("obj", upstream),
                                                         ("key", key_source)], helper=True)

    def _array(self, value: Any, port: str, path: str) -> Source:
        kind = value.dtype.kind
        exportable = kind in _ARRAY_KINDS or (kind == "f" and bool(abs(value).max(
            initial=0.0) < math.inf))  # nan and inf compare False
        if not exportable:
            return self._opaque(value, port, path)
        data = self._input(value.tolist(), "value")
        dtype = self._input(value.dtype.str, "dtype")
        return self._function(helpers.get_array, "array", [("value", data), ("dtype", dtype)],
                              helper=True)

    def _container(self, value: Any, fn: Callable[..., Any], path: str,
                   active: frozenset[int]) -> Source:
        sources = []
        for port, item in _container_items(value):
            suffix = f"[{port!r}]" if isinstance(value, dict) else f"[{port}]"
            sources.append((port, self._source(item, port, path + suffix, active)))
        return self._function(fn, type(value).__name__, sources, helper=True)

    def _opaque(self, value: Any, port: str, path: str) -> Source:
        problem = (f"argument {path!r} of {self._where} is a {type(value).__qualname__} "
                   f"({short_repr(value)}), which JSON cannot represent; a workflow can hold "
                   + _SUPPORTED)
        inner = find_futures((value,), {})
        if not inner:
            return self._input(value, port, problem=problem)
        sources = [(str(i), self._future_source(f, str(i), f"{path}<future {i}>"))
                   for i, f in enumerate(inner)]
        return self._function(None, type(value).__name__, sources, helper=True,
                              problem=problem)

    def _add_outputs(self) -> None:
        used = {edge.source for edge in self.graph.edges}
        sinks = [node_id for node_id in self._call_nodes if node_id not in used]
        for sink in sinks:
            name = "result" if len(sinks) == 1 else f"result_{sink}"
            output = self._new("output", name, name=name)
            self.graph.edges.append(Edge(sink, output.id, None))


def call_ports(fn: Callable[..., Any], args: tuple[Any, ...],
               kwargs: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(port, value)`` for every argument of ``fn(*args, **kwargs)``, in call order:
    the parameter name; ``"arg<i>"`` for a value taken by ``*args`` (or when ``fn`` has no
    signature); the keyword for one taken by ``**kwargs``."""
    try:
        signature = inspect.signature(fn)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):  # no signature, or a call that does not fit it
        return [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    ports: list[tuple[str, Any]] = []
    position = 0
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            ports.extend((f"arg{position + i}", v) for i, v in enumerate(value))
        elif kind is inspect.Parameter.VAR_KEYWORD:
            ports.extend(value.items())
        else:
            ports.append((name, value))
            position += kind in _POSITIONAL
    return ports


def is_json_literal(value: Any, active: frozenset[int] = frozenset()) -> bool:
    """True if JSON writes ``value`` and reads it back equal and of the same type."""
    if isinstance(value, float):
        return math.isfinite(value)
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if id(value) in active:  # a container that contains itself
        return False
    inner = active | {id(value)}
    if type(value) is list:
        return all(is_json_literal(item, inner) for item in value)
    if type(value) is dict:
        return all(type(k) is str and is_json_literal(v, inner) for k, v in value.items())
    return False


def _is_array(value: Any) -> bool:
    # Only a program that made an array has numpy loaded: never import it here.
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


_CONTAINERS: dict[type, Callable[..., Any]] = {
    list: helpers.get_list, tuple: helpers.get_tuple, set: helpers.get_set,
    frozenset: helpers.get_frozenset, dict: helpers.get_dict,
}


def _container_helper(value: Any) -> Callable[..., Any] | None:
    fn = _CONTAINERS.get(type(value))
    if fn is helpers.get_dict and not all(type(key) is str for key in value):
        return None
    return fn


def _container_items(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return list(value.items())
    items = list(value)
    if isinstance(value, (set, frozenset)):
        try:  # a stable order, so exports do not depend on hash seeds
            items = sorted(items)
        except TypeError:
            pass
    return [(str(i), item) for i, item in enumerate(items)]


def label_of(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


def ascii_text(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")


def short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not break the plot
        text = f"<{type(value).__qualname__}>"
    text = " ".join(text.split())
    return text if len(text) <= _LABEL_CHARS else text[:_LABEL_CHARS - 3] + "..."
