"""Dependency graph plot and Python Workflow Definition export of a dry run.

With ``plot_dependency_graph=True`` or ``export_workflow_filename=...`` an executor runs
nothing: each ``submit`` goes to :meth:`WorkflowRecorder.record`, which returns a future
that never completes, and at shutdown the executor calls :meth:`WorkflowRecorder.plot`
and/or :meth:`WorkflowRecorder.export`. :func:`run_workflow` reads an exported file back
and submits it to any executor.

Graph model (shared by the plot and the export):

- every recorded call is a ``function`` node whose ``value`` is ``"module.qualname"`` of
  the function;
- every argument is an edge into that node whose ``targetPort`` is the parameter name
  (from ``inspect.signature(fn).bind``). Extra positional arguments taken by ``*args``,
  and positional arguments of a callable without a signature, get the ports
  ``"arg<i>"`` (``i`` = position in the call); extra keyword arguments keep their keyword;
- a future returned by :meth:`WorkflowRecorder.record` is an edge from the node that
  produces it (``sourcePort`` null);
- a literal is an ``input`` node whose ``name`` is the port it feeds. A literal is written
  as is when JSON represents it exactly: ``None``, ``bool``, ``int``, finite ``float``,
  ``str``, and lists and dicts with ``str`` keys made of those;
- any other list, tuple, set, frozenset or ``str``-keyed dict (one holding a future, a
  tuple, a set, ...) becomes a helper ``function`` node :func:`build_list`,
  :func:`build_tuple`, :func:`build_set`, :func:`build_frozenset` or :func:`build_dict`,
  whose ports are the element positions ``"0"``, ``"1"``, ... or the dict keys, applied
  recursively. Running the workflow therefore reproduces the exact call: tuples stay
  tuples, literals next to futures inside a container are kept;
- a future that :meth:`WorkflowRecorder.record` did not produce is an ``input`` node with
  its result when it finished successfully, otherwise an input without ``value`` (a
  placeholder: the plot shows it, :func:`run_workflow` refuses it);
- one ``output`` node per sink (a recorded call whose result no other recorded call
  uses), named ``"result"`` if there is one sink and ``"result_<node id>"`` otherwise.

Nodes are numbered in topological order (the inputs of a node come before it). Anything
else (a ``numpy`` array, a dataclass, a dict with non-``str`` keys, ``nan``) cannot be
written as JSON: the plot shows it, the export raises :class:`WorkflowError` naming the
argument. Input ``name`` values are the ports they feed, so they are not unique; node ids
are.
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import math
import os
import re
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

from executorkit.errors import DependencyError, ExecutorkitError, ResourceError
from executorkit.graph import find_futures, substitute_call

__all__ = [
    "PWD_VERSION",
    "GraphImage",
    "WorkflowError",
    "WorkflowRecorder",
    "build_dict",
    "build_frozenset",
    "build_list",
    "build_set",
    "build_tuple",
    "load_workflow",
    "run_workflow",
]

PWD_VERSION = "0.1.0"
PLOT_EXTENSIONS = (".png", ".svg")
_ARG_PORT = re.compile(r"arg(\d+)")
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_LABEL_CHARS = 28


class WorkflowError(ExecutorkitError, ValueError):
    """A workflow cannot be exported, read or run; the message says which node or argument."""


# ---------------------------------------------------------------- container helpers
def build_list(**items: Any) -> list[Any]:
    """``[items["0"], items["1"], ...]``: a list argument rebuilt when a workflow runs."""
    return [items[key] for key in _index_ports(items)]


def build_tuple(**items: Any) -> tuple[Any, ...]:
    """``(items["0"], items["1"], ...)``: a tuple argument rebuilt when a workflow runs."""
    return tuple(build_list(**items))


def build_set(**items: Any) -> set[Any]:
    """The set of the values of ``items`` (ports ``"0"``, ``"1"``, ...)."""
    return set(build_list(**items))


def build_frozenset(**items: Any) -> frozenset[Any]:
    """The frozenset of the values of ``items`` (ports ``"0"``, ``"1"``, ...)."""
    return frozenset(build_list(**items))


def build_dict(**items: Any) -> dict[str, Any]:
    """The dict argument ``items`` (one port per key) rebuilt when a workflow runs."""
    return dict(items)


def _index_ports(items: Mapping[str, Any]) -> list[str]:
    keys = [str(i) for i in range(len(items))]
    if set(keys) != set(items):
        raise WorkflowError(f"element ports must be '0', '1', ... without gaps, got "
                            f"{sorted(items)}")
    return keys


_BUILDERS: dict[type, Callable[..., Any]] = {
    list: build_list, tuple: build_tuple, set: build_set, frozenset: build_frozenset,
    dict: build_dict,
}


# ---------------------------------------------------------------- the graph model
@dataclass
class _Node:
    id: int
    type: str  # "function", "input" or "output"
    label: str  # text shown in the plot
    fn: Callable[..., Any] | None = None  # function nodes
    value: Any = None  # input nodes
    has_value: bool = True  # False for a placeholder input
    name: str | None = None  # input and output nodes
    helper: bool = False  # a container node, not a recorded call
    problem: str | None = None  # why the node cannot be exported


@dataclass(frozen=True)
class _Edge:
    source: int
    target: int
    port: str | None


@dataclass
class _Graph:
    nodes: list[_Node] = field(default_factory=list)
    edges: list[_Edge] = field(default_factory=list)


@dataclass(frozen=True)
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: Future[Any]


class _GraphBuilder:
    """Turns recorded calls into nodes and edges (see the module docstring)."""

    def __init__(self, producers: Mapping[int, int]) -> None:
        self.graph = _Graph()
        self._producers = producers  # id(future) -> index of the call that returns it
        self._call_nodes: list[int] = []  # node id of each recorded call
        self._where = ""  # the call being added, for error messages

    def build(self, calls: Iterable[_Call]) -> _Graph:
        for call in calls:
            self._call_nodes.append(self._add_call(call))
        self._add_outputs()
        return self.graph

    def _new(self, kind: str, label: str, **fields: Any) -> _Node:
        node = _Node(len(self.graph.nodes), kind, _ascii(label), **fields)
        self.graph.nodes.append(node)
        return node

    def _connect(self, sources: list[tuple[str, int]], target: int) -> None:
        self.graph.edges.extend(_Edge(source, target, port) for port, source in sources)

    def _add_call(self, call: _Call) -> int:
        self._where = f"{_label_of(call.fn)} (call #{len(self._call_nodes)})"
        ports = _call_ports(call.fn, call.args, call.kwargs)
        sources = [(port, self._source(value, port, port)) for port, value in ports]
        node = self._new("function", _label_of(call.fn), fn=call.fn)
        self._connect(sources, node.id)
        return node.id

    def _source(self, value: Any, port: str, path: str,
                active: frozenset[int] = frozenset()) -> int:
        """The id of the node that provides ``value`` (creating the nodes it needs)."""
        if isinstance(value, Future):
            return self._future_source(value, port, path)
        if _is_json_literal(value):
            return self._new("input", _short_repr(value), value=value, name=port).id
        builder = _builder_for(value)
        if builder is not None and id(value) not in active:
            return self._container(value, builder, path, active | {id(value)})
        return self._opaque(value, port, path)

    def _future_source(self, future: Future[Any], port: str, path: str) -> int:
        index = self._producers.get(id(future))
        if index is not None:
            return self._call_nodes[index]
        if future.done() and not future.cancelled() and future.exception() is None:
            return self._source(future.result(), port, path)
        label = "<cancelled future>" if future.cancelled() else (
            "<failed future>" if future.done() else "<pending future>")
        return self._new("input", label, name=port, has_value=False).id

    def _container(self, value: Any, builder: Callable[..., Any], path: str,
                   active: frozenset[int]) -> int:
        sources = []
        for port, item in _container_items(value):
            suffix = f"[{port!r}]" if isinstance(value, dict) else f"[{port}]"
            sources.append((port, self._source(item, port, path + suffix, active)))
        node = self._new("function", type(value).__name__, fn=builder, helper=True)
        self._connect(sources, node.id)
        return node.id

    def _opaque(self, value: Any, port: str, path: str) -> int:
        problem = (f"argument {path!r} of {self._where} is a {type(value).__qualname__} "
                   f"({_short_repr(value)}), which JSON cannot represent; a workflow can "
                   "hold None, bool, int, finite float, str, futures, and lists, tuples, "
                   "sets and str-keyed dicts of these")
        inner = find_futures((value,), {})
        if not inner:
            return self._new("input", _short_repr(value), value=value, name=port,
                             problem=problem).id
        sources = [(str(i), self._future_source(f, str(i), f"{path}<future {i}>"))
                   for i, f in enumerate(inner)]
        node = self._new("function", type(value).__name__, helper=True, problem=problem)
        self._connect(sources, node.id)
        return node.id

    def _add_outputs(self) -> None:
        used = {edge.source for edge in self.graph.edges}
        sinks = [node_id for node_id in self._call_nodes if node_id not in used]
        for sink in sinks:
            name = "result" if len(sinks) == 1 else f"result_{sink}"
            output = self._new("output", name, name=name)
            self.graph.edges.append(_Edge(sink, output.id, None))


def _call_ports(fn: Callable[..., Any], args: tuple[Any, ...],
                kwargs: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(port, value)`` for every argument of ``fn(*args, **kwargs)``, in call order."""
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


def _is_json_literal(value: Any, active: frozenset[int] = frozenset()) -> bool:
    """True if JSON writes ``value`` and reads it back equal and of the same type."""
    if isinstance(value, float):
        return math.isfinite(value)
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if id(value) in active:  # a container that contains itself
        return False
    inner = active | {id(value)}
    if type(value) is list:
        return all(_is_json_literal(item, inner) for item in value)
    if type(value) is dict:
        return all(type(k) is str and _is_json_literal(v, inner) for k, v in value.items())
    return False


def _builder_for(value: Any) -> Callable[..., Any] | None:
    builder = _BUILDERS.get(type(value))
    if builder is build_dict and not all(type(key) is str for key in value):
        return None
    return builder


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


def _label_of(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


def _ascii(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not break the plot
        text = f"<{type(value).__qualname__}>"
    text = " ".join(text.split())
    return text if len(text) <= _LABEL_CHARS else text[:_LABEL_CHARS - 3] + "..."


# ---------------------------------------------------------------- the recorder
class WorkflowRecorder:
    """Records the calls of a dry run; draws them (:meth:`plot`) or exports them
    (:meth:`export`) as a Python Workflow Definition. Safe to use from several threads."""

    def __init__(self) -> None:
        self._calls: list[_Call] = []
        self._producers: dict[int, int] = {}  # id(future) -> index in _calls
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._calls)

    def record(self, fn: Callable[..., Any], args: Iterable[Any] = (),
               kwargs: Mapping[str, Any] | None = None) -> Future[Any]:
        """Record ``fn(*args, **kwargs)``; the returned future stands for its result and
        never completes. Futures in the arguments (also nested) are the inputs."""
        if not callable(fn):
            raise TypeError(f"record() needs a callable, got {type(fn).__name__}")
        future: Future[Any] = Future()
        call = _Call(fn, tuple(args), dict(kwargs or {}), future)
        with self._lock:
            self._producers[id(future)] = len(self._calls)
            self._calls.append(call)
        return future

    def cancel_all(self) -> None:
        """Cancel every recorded future (the dry run is over: nothing will compute them)."""
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.future.cancel()

    def _graph(self) -> _Graph:
        with self._lock:
            calls = list(self._calls)
            producers = dict(self._producers)
        return _GraphBuilder(producers).build(calls)

    def to_dict(self) -> dict[str, Any]:
        """The workflow as a Python Workflow Definition dict (raises :class:`WorkflowError`
        if a function or literal cannot be written)."""
        return _to_pwd(self._graph())

    def export(self, filename: str | os.PathLike[str]) -> dict[str, Any]:
        """Write the workflow as Python Workflow Definition JSON to ``filename``; returns
        the dict written. Nothing is written if the workflow cannot be exported."""
        workflow = self.to_dict()
        text = json.dumps(workflow, indent=2, allow_nan=False)
        _write_atomically(os.fspath(filename), text.encode("utf-8"))
        return workflow

    def plot(self, filename: str | os.PathLike[str] | None = None) -> Any:
        """Draw the dependency graph with matplotlib (no graphviz needed).

        ``filename`` ending in ``.png`` or ``.svg`` writes that file. Returns an object
        that displays inline in Jupyter (``IPython.display.SVG``/``Image`` when IPython is
        importable, else a :class:`GraphImage`), also when a file is written.
        """
        fmt = _plot_format(filename)
        data = _render(self._graph(), fmt)
        if filename is not None:
            _write_atomically(os.fspath(filename), data)
        return _display_object(data, fmt)


# ---------------------------------------------------------------- export
def _to_pwd(graph: _Graph) -> dict[str, Any]:
    for node in graph.nodes:
        if node.problem is not None:
            raise WorkflowError(node.problem)
    return {
        "version": PWD_VERSION,
        "nodes": [_node_json(node) for node in graph.nodes],
        "edges": [{"source": e.source, "sourcePort": None, "target": e.target,
                   "targetPort": e.port} for e in graph.edges],
    }


def _node_json(node: _Node) -> dict[str, Any]:
    out: dict[str, Any] = {"id": node.id, "type": node.type}
    if node.type == "function":
        assert node.fn is not None
        out["value"] = _qualified_name(node.fn)
    elif node.type == "input" and node.has_value:
        out["value"] = node.value
    if node.type != "function":
        out["name"] = node.name
    return out


def _qualified_name(fn: Callable[..., Any]) -> str:
    """``"module.qualname"`` of ``fn``, or :class:`WorkflowError` if it has none."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    owner = getattr(fn, "__self__", None)
    bound = owner is not None and not inspect.ismodule(owner) and not inspect.isclass(owner)
    if not isinstance(module, str) or not isinstance(qualname, str) or bound:
        raise WorkflowError(
            f"cannot export {fn!r}: a workflow names functions by module and qualified "
            "name; use a plain function (not a partial, a bound method or a callable "
            "object)")
    return f"{module}.{qualname}"


def _write_atomically(filename: str, data: bytes) -> None:
    tmp = f"{filename}.tmp{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- plot
class GraphImage:
    """Image bytes that Jupyter displays (used when IPython is not importable)."""

    def __init__(self, data: bytes, fmt: str) -> None:
        self.data = data
        self.format = fmt

    def _repr_svg_(self) -> str | None:
        return self.data.decode("utf-8") if self.format == "svg" else None

    def _repr_png_(self) -> bytes | None:
        return self.data if self.format == "png" else None


def check_plot_filename(filename: str | os.PathLike[str]) -> str:
    """The plot format (``"png"`` or ``"svg"``) of ``filename``, or a ResourceError."""
    return _plot_format(filename)


def _plot_format(filename: str | os.PathLike[str] | None) -> str:
    if filename is None:
        return "svg"
    extension = os.path.splitext(os.fspath(filename))[1].lower()
    if extension not in PLOT_EXTENSIONS:
        raise ResourceError(
            f"plot_dependency_graph_filename must end in .png or .svg, got "
            f"{os.fspath(filename)!r}", key="plot_dependency_graph_filename",
            allowed=".png or .svg")
    return extension[1:]


def _display_object(data: bytes, fmt: str) -> Any:
    try:
        from IPython.display import SVG, Image
    except ImportError:
        return GraphImage(data, fmt)
    return SVG(data=data.decode("utf-8")) if fmt == "svg" else Image(data=data, format="png")


def _layers(graph: _Graph) -> dict[int, int]:
    """Longest-path layers: a function one below its deepest function input, a literal or
    a container just above its consumer, an output just below its source."""
    preds: dict[int, list[int]] = {node.id: [] for node in graph.nodes}
    consumer: dict[int, int] = {}
    for edge in graph.edges:
        preds[edge.target].append(edge.source)
        consumer.setdefault(edge.source, edge.target)
    kinds = {node.id: node.type for node in graph.nodes}
    layer: dict[int, int] = {}
    for node in graph.nodes:  # nodes are in topological order
        if node.type == "function":
            layer[node.id] = max((layer[p] + 1 if kinds[p] == "function" else 1
                                  for p in preds[node.id]), default=1)
    for node in reversed(graph.nodes):  # a container sits just above its consumer
        if node.helper and node.id in consumer:
            layer[node.id] = layer[consumer[node.id]] - 1
    for node in graph.nodes:
        if node.type == "input":
            layer[node.id] = max(layer.get(consumer.get(node.id, -1), 1) - 1, 0)
        elif node.type == "output":
            layer[node.id] = layer[preds[node.id][0]] + 1
    return layer


def _layout(graph: _Graph) -> dict[int, tuple[float, float]]:
    """``(x, y)`` per node: layers top to bottom, crossings reduced by barycenters."""
    layer = _layers(graph)
    rows: dict[int, list[int]] = {}
    for node in graph.nodes:
        rows.setdefault(layer[node.id], []).append(node.id)
    up: dict[int, list[int]] = {node.id: [] for node in graph.nodes}
    down: dict[int, list[int]] = {node.id: [] for node in graph.nodes}
    for edge in graph.edges:
        up[edge.target].append(edge.source)
        down[edge.source].append(edge.target)
    x = _row_positions(rows)
    order = sorted(rows)
    for depths, neighbours in ((order, up), (order[::-1], down), (order, up)):
        for depth in depths:
            _reorder(rows[depth], neighbours, x)
    return {n: (x[n], -float(layer[n])) for n in x}


def _reorder(row: list[int], neighbours: Mapping[int, list[int]], x: dict[int, float]) -> None:
    """Sort one layer by the mean position of each node's neighbours; update ``x``."""
    row.sort(key=lambda n: _barycenter(n, neighbours[n], x))
    x.update(_row_positions({0: row}))


def _row_positions(rows: Mapping[int, list[int]]) -> dict[int, float]:
    return {n: i - (len(row) - 1) / 2 for row in rows.values() for i, n in enumerate(row)}


def _barycenter(node: int, neighbours: list[int], x: Mapping[int, float]) -> float:
    if not neighbours:
        return x[node]
    return sum(x[n] for n in neighbours) / len(neighbours)


_STYLES = {  # node kind -> (font size, face colour)
    "function": (9, "#cfe2f3"),
    "helper": (8, "#e6e6e6"),
    "input": (7, "#fff2cc"),
    "output": (8, "#d9ead3"),
}


def _render(graph: _Graph, fmt: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    positions = _layout(graph)
    width = max(Counter(y for _, y in positions.values()).values(), default=1)
    depth = 1 - min((y for _, y in positions.values()), default=0.0)
    fig = Figure(figsize=(min(max(3.0, 1.6 * width), 150.0), min(max(2.0, depth), 150.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    ax.set_xlim(-width / 2, width / 2)
    ax.set_ylim(-depth + 0.5, 0.5)
    if not graph.nodes:
        ax.text(0, 0, "(no tasks)", ha="center", va="center", parse_math=False)
    artists = {node.id: _draw_node(ax, node, positions[node.id]) for node in graph.nodes}
    for edge in graph.edges:
        _draw_edge(ax, edge, artists, positions)
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else None
    fig.savefig(buffer, format=fmt, bbox_inches="tight", dpi=100, metadata=metadata)
    return buffer.getvalue()


def _draw_node(ax: Any, node: _Node, xy: tuple[float, float]) -> Any:
    kind = "helper" if node.helper else node.type
    size, colour = _STYLES[kind]
    return ax.text(xy[0], xy[1], node.label, ha="center", va="center", fontsize=size,
                   parse_math=False, zorder=3,
                   bbox={"boxstyle": "round,pad=0.3", "facecolor": colour,
                         "edgecolor": "#555555", "linewidth": 0.8})


def _draw_edge(ax: Any, edge: _Edge, artists: Mapping[int, Any],
               positions: Mapping[int, tuple[float, float]]) -> None:
    ax.annotate("", xy=(0.5, 1.0), xycoords=artists[edge.target], xytext=(0.5, 0.0),
                textcoords=artists[edge.source], zorder=1,
                arrowprops={"arrowstyle": "-|>", "color": "#555555", "linewidth": 0.8,
                            "shrinkA": 4, "shrinkB": 4})
    if edge.port is None:
        return
    (x0, y0), (x1, y1) = positions[edge.source], positions[edge.target]
    ax.text((x0 + x1) / 2, (y0 + y1) / 2, _ascii(edge.port), ha="center", va="center",
            fontsize=6, color="#7f3f00", parse_math=False, zorder=2,
            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none",
                  "alpha": 0.8})


# ---------------------------------------------------------------- import and run
def load_workflow(filename: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a Python Workflow Definition JSON file and check its structure."""
    with open(filename, encoding="utf-8") as handle:
        try:
            workflow = json.load(handle)
        except json.JSONDecodeError as exc:
            raise WorkflowError(f"{os.fspath(filename)!r} is not JSON: {exc}") from exc
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list) \
            or not isinstance(workflow.get("edges"), list):
        raise WorkflowError(f"{os.fspath(filename)!r} is not a workflow: it needs "
                            "'version', 'nodes' and 'edges'")
    _check_nodes(workflow["nodes"])
    _check_edges(workflow["edges"], {node["id"]: node["type"] for node in workflow["nodes"]})
    return workflow


def _check_nodes(nodes: list[Any]) -> None:
    seen: set[int] = set()
    for node in nodes:
        if not isinstance(node, dict) or not isinstance(node.get("id"), int) \
                or node.get("type") not in ("function", "input", "output"):
            raise WorkflowError(f"malformed node {node!r}: needs an int 'id' and a 'type' "
                                "of function, input or output")
        if node["id"] in seen:
            raise WorkflowError(f"duplicate node id {node['id']}")
        seen.add(node["id"])
        if node["type"] == "function" and not isinstance(node.get("value"), str):
            raise WorkflowError(f"function node {node['id']} needs a 'value' string "
                                "'module.qualname'")
        if node["type"] == "output" and not isinstance(node.get("name"), str):
            raise WorkflowError(f"output node {node['id']} needs a 'name' string")


def _check_edges(edges: list[Any], kinds: Mapping[int, str]) -> None:
    for edge in edges:
        if not isinstance(edge, dict) or edge.get("source") not in kinds \
                or edge.get("target") not in kinds:
            raise WorkflowError(f"edge {edge!r} does not connect two nodes of the workflow")
        if kinds[edge["source"]] == "output" or kinds[edge["target"]] == "input":
            raise WorkflowError(f"edge {edge!r} leaves an output or enters an input node")


def run_workflow(filename: str | os.PathLike[str], executor: Any, *,
                 native_dependencies: bool | None = None) -> dict[str, Future[Any]]:
    """Submit the workflow in ``filename`` to ``executor``; the futures of its outputs by
    output name.

    Function nodes are submitted in topological order. With ``native_dependencies`` the
    upstream futures are passed as arguments, for executors that resolve them
    (executorkit's); otherwise (``concurrent.futures`` pools) each node is submitted once
    its inputs are done, with their results, and a failed input fails it with a
    :class:`~executorkit.errors.DependencyError`. ``None`` picks ``True`` for executorkit
    executors. Raises :class:`WorkflowError` for a function that cannot be imported, an
    input without a value, a cycle or a call its function's signature cannot take.
    """
    if native_dependencies is None:
        native_dependencies = _is_executorkit_executor(executor)
    return _WorkflowRun(load_workflow(filename), executor, native_dependencies).run()


def _is_executorkit_executor(executor: Any) -> bool:
    # A class attribute, not isinstance(BaseExecutor): export sits below the executors and
    # never imports them (tests/test_layering.py).
    return getattr(type(executor), "resolves_future_arguments", False) is True


class _WorkflowRun:
    def __init__(self, workflow: Mapping[str, Any], executor: Any, native: bool) -> None:
        self._nodes = {node["id"]: node for node in workflow["nodes"]}
        self._edges: list[dict[str, Any]] = workflow["edges"]
        self._incoming: dict[int, list[dict[str, Any]]] = {n: [] for n in self._nodes}
        for edge in self._edges:
            self._incoming[edge["target"]].append(edge)
        self._executor = executor
        self._native = native
        self._futures: dict[int, Future[Any]] = {}

    def run(self) -> dict[str, Future[Any]]:
        order = _topological_order(list(self._nodes), self._edges)
        functions = [self._nodes[n] for n in order if self._nodes[n]["type"] == "function"]
        calls = [(node, _import_function(node["value"])) for node in functions]
        for node, fn in calls:
            args, kwargs = _split_ports(fn, self._ports_of(node), node)
            if self._native:
                self._futures[node["id"]] = self._executor.submit(fn, *args, **kwargs)
            else:
                self._futures[node["id"]] = _submit_when_ready(self._executor, fn, args,
                                                               kwargs)
        return self._outputs()

    def _ports_of(self, node: Mapping[str, Any]) -> dict[str, Any]:
        ports: dict[str, Any] = {}
        for edge in self._incoming[node["id"]]:
            port = edge.get("targetPort")
            if not isinstance(port, str) or port in ports:
                raise WorkflowError(f"node {node['id']} ({node['value']}) has a missing or "
                                    f"repeated targetPort {port!r}")
            ports[port] = self._upstream(edge)
        return ports

    def _upstream(self, edge: Mapping[str, Any]) -> Any:
        source = self._nodes[edge["source"]]
        if source["type"] == "input":
            if "value" not in source:
                raise WorkflowError(f"input node {source['id']} ({source.get('name')!r}) has "
                                    "no value (it stood for a future that never finished)")
            value = source["value"]
        else:
            value = self._futures[source["id"]]
        port = edge.get("sourcePort")
        if port is None:
            return value
        if isinstance(value, Future):
            return _derived(value, port)
        return _pick(value, port)

    def _outputs(self) -> dict[str, Future[Any]]:
        outputs: dict[str, Future[Any]] = {}
        for node in self._nodes.values():
            if node["type"] != "output":
                continue
            edges = self._incoming[node["id"]]
            if len(edges) != 1 or node["name"] in outputs:
                raise WorkflowError(f"output node {node['id']} ({node['name']!r}) needs "
                                    "exactly one incoming edge and a unique name")
            outputs[node["name"]] = _as_future(self._upstream(edges[0]))
        return outputs


def _topological_order(nodes: list[int], edges: list[dict[str, Any]]) -> list[int]:
    indegree = dict.fromkeys(nodes, 0)
    after: dict[int, list[int]] = {n: [] for n in nodes}
    for edge in edges:
        indegree[edge["target"]] += 1
        after[edge["source"]].append(edge["target"])
    ready = deque(sorted(n for n, d in indegree.items() if d == 0))
    order: list[int] = []
    while ready:
        node = ready.popleft()
        order.append(node)
        for nxt in after[node]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
    if len(order) != len(nodes):
        stuck = sorted(n for n, d in indegree.items() if d > 0)
        raise WorkflowError(f"the workflow has a cycle through nodes {stuck}")
    return order


def _import_function(path: str) -> Callable[..., Any]:
    """The object named ``"module.qualname"``, imported; :class:`WorkflowError` if not."""
    parts = path.split(".")
    if "<locals>" in parts or any(p.startswith("<") for p in parts):
        raise WorkflowError(f"cannot import {path!r}: it was defined inside a function or "
                            "is a lambda; move it to module level")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name + ".").startswith(exc.name + "."):
                continue  # not this prefix: try a shorter one
            raise WorkflowError(f"importing {module_name!r} for {path!r} failed: {exc}") \
                from exc
        except Exception as exc:
            raise WorkflowError(f"importing {module_name!r} for {path!r} failed: "
                                f"{type(exc).__name__}: {exc}") from exc
        return _attribute_path(module, parts[cut:], path)
    raise WorkflowError(f"cannot import {path!r}: no module of that name is importable "
                        "(is it on sys.path / PYTHONPATH?)")


def _attribute_path(obj: Any, names: list[str], path: str) -> Callable[..., Any]:
    for name in names:
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise WorkflowError(f"cannot import {path!r}: {name!r} not found") from None
    if not callable(obj):
        raise WorkflowError(f"{path!r} is not callable")
    return obj


def _split_ports(fn: Callable[..., Any], ports: Mapping[str, Any],
                 node: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments for ``fn`` from the ports of a function node
    (the inverse of :func:`_call_ports`)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = None
    named = {p.name: (i, p.kind) for i, p in enumerate(params or [])}
    varargs = params is None or any(p.kind is p.VAR_POSITIONAL for p in params)
    positional: dict[int, Any] = {}
    keywords: dict[str, Any] = {}
    for port, value in ports.items():
        index, kind = named.get(port, (None, None))
        match = _ARG_PORT.fullmatch(port)
        if kind is inspect.Parameter.POSITIONAL_ONLY and index is not None:
            positional[index] = value
        elif kind is None and match and varargs:
            positional[int(match[1])] = value
        else:
            keywords[port] = value
    _move_before_varargs(positional, keywords, named)
    if sorted(positional) != list(range(len(positional))):
        raise WorkflowError(f"node {node['id']} ({node['value']}): positional arguments "
                            f"{sorted(positional)} have gaps")
    return tuple(positional[i] for i in range(len(positional))), keywords


def _move_before_varargs(positional: dict[int, Any], keywords: dict[str, Any],
                         named: Mapping[str, tuple[int, Any]]) -> None:
    """Parameters in front of positional values must be passed by position too."""
    if not positional:
        return
    last = max(positional)
    for name, (index, kind) in named.items():
        if kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and index < last \
                and name in keywords:
            positional[index] = keywords.pop(name)


def _pick(value: Any, port: str) -> Any:
    """``value[port]`` for a ``sourcePort``; a digit port also indexes a sequence."""
    if not isinstance(value, Mapping) and port.isdigit():
        return value[int(port)]
    return value[port]


def _as_future(value: Any) -> Future[Any]:
    if isinstance(value, Future):
        return value
    done: Future[Any] = Future()
    done.set_result(value)
    return done


def _derived(source: Future[Any], port: str) -> Future[Any]:
    """A future of ``source.result()[port]``."""
    out: Future[Any] = Future()

    def settle(done: Future[Any]) -> None:
        try:
            out.set_result(_pick(done.result(), port))
        except BaseException as exc:  # the upstream error, or a bad key
            out.set_exception(exc)

    source.add_done_callback(settle)
    return out


class _WhenReady:
    """Submits a call once the futures in its arguments are done (for executors that do
    not resolve futures themselves); ``out`` mirrors the submitted future."""

    def __init__(self, executor: Any, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], inputs: list[Future[Any]]) -> None:
        self.out: Future[Any] = Future()
        self._call = (executor, fn, args, kwargs)
        self._inputs = inputs
        self._left = len(inputs)
        self._lock = threading.Lock()

    def start(self) -> Future[Any]:
        for future in self._inputs:
            future.add_done_callback(self._input_done)
        return self.out

    def _input_done(self, _future: Future[Any]) -> None:
        with self._lock:
            self._left -= 1
            if self._left:
                return
        if not self.out.set_running_or_notify_cancel():
            return  # cancelled by the user while waiting
        try:
            self._submit()
        except BaseException as exc:
            self.out.set_exception(exc)

    def _submit(self) -> None:
        executor, fn, args, kwargs = self._call
        for future in self._inputs:
            error = CancelledError() if future.cancelled() else future.exception()
            if error is not None:
                raise _dependency_error(fn, error, future)
        args, kwargs = substitute_call(args, kwargs, lambda f: f.result(timeout=0))
        executor.submit(fn, *args, **kwargs).add_done_callback(self._copy)

    def _copy(self, done: Future[Any]) -> None:
        if done.cancelled():
            self.out.set_exception(CancelledError())
        elif done.exception() is not None:
            self.out.set_exception(done.exception())
        else:
            self.out.set_result(done.result())


def _dependency_error(fn: Callable[..., Any], error: BaseException,
                      upstream: Future[Any]) -> DependencyError:
    exc = DependencyError(f"an input of {_label_of(fn)} failed: {type(error).__name__}: "
                          f"{error}", upstream=upstream)
    exc.__cause__ = error
    return exc


def _submit_when_ready(executor: Any, fn: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Future[Any]:
    inputs = find_futures(args, kwargs)
    if not inputs:
        return executor.submit(fn, *args, **kwargs)
    return _WhenReady(executor, fn, args, kwargs, inputs).start()
