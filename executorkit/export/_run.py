"""Running a Python Workflow Definition file on any ``concurrent.futures`` executor."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future
from typing import Any

from executorkit.errors import DependencyError, WorkflowError
from executorkit.export._model import label_of
from executorkit.export._pwd import load_workflow
from executorkit.export.helpers import PWD_HELPERS
from executorkit.graph import find_futures, substitute_call

_ARG_PORT = re.compile(r"arg(\d+)")
# A sequence item as a sourcePort: "3" (ours, jobflow) or "s_3" (pyiron_base).
_INDEX_PORT = re.compile(r"(?:s_)?(\d+)")


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
    # By module name: the export is imported by the executors, never the reverse.
    return any(cls.__module__.startswith("executorkit.") for cls in type(executor).__mro__)


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
        calls = [(node, _function(node["value"])) for node in functions]
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


def _function(path: str) -> Callable[..., Any]:
    """The function a node names; the format's own helpers without importing its package."""
    return PWD_HELPERS.get(path) or _import_function(path)


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
    (the inverse of :func:`~executorkit.export._model.call_ports`)."""
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
    """``value[port]`` for a ``sourcePort``; ``"3"`` or ``"s_3"`` also index a sequence."""
    match = _INDEX_PORT.fullmatch(port)
    if not isinstance(value, Mapping) and match:
        return value[int(match[1])]
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
    exc = DependencyError(f"an input of {label_of(fn)} failed: {type(error).__name__}: "
                          f"{error}", upstream=upstream)
    exc.__cause__ = error
    return exc


def _submit_when_ready(executor: Any, fn: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Future[Any]:
    inputs = find_futures(args, kwargs)
    if not inputs:
        return executor.submit(fn, *args, **kwargs)
    return _WhenReady(executor, fn, args, kwargs, inputs).start()
