"""The Python Workflow Definition format: a graph to JSON, and a JSON file read and checked."""

from __future__ import annotations

import inspect
import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from executorkit.errors import WorkflowError
from executorkit.export._model import Graph, Node
from executorkit.export.helpers import PWD_HELPERS

PWD_VERSION = "0.1.0"
_PWD_NAMES = {fn: name for name, fn in PWD_HELPERS.items()}


def to_pwd(graph: Graph) -> dict[str, Any]:
    """The workflow as a PWD dict; :class:`WorkflowError` if a node cannot be written."""
    for node in graph.nodes:
        if node.problem is not None:
            raise WorkflowError(node.problem)
    names = _input_names(graph)
    return {
        "version": PWD_VERSION,
        "nodes": [_node_json(node, names) for node in graph.nodes],
        "edges": [{"source": e.source, "sourcePort": e.source_port, "target": e.target,
                   "targetPort": e.port} for e in graph.edges],
    }


def _input_names(graph: Graph) -> dict[int, str]:
    """The name of every input: the port it feeds, with ``_0``, ``_1``, ... appended where
    several inputs feed ports of that name (the reference writers' convention)."""
    inputs = [node for node in graph.nodes if node.type == "input"]
    counts = Counter(node.name for node in inputs)
    used: Counter[str | None] = Counter()
    names = {}
    for node in inputs:
        name = str(node.name)
        if counts[node.name] > 1:
            name = f"{name}_{used[node.name]}"
            used[node.name] += 1
        names[node.id] = name
    return names


def _node_json(node: Node, input_names: Mapping[int, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": node.id, "type": node.type}
    if node.type == "function":
        assert node.fn is not None
        out["value"] = _PWD_NAMES.get(node.fn) or qualified_name(node.fn)
    elif node.type == "input":
        if node.has_value:
            out["value"] = node.value
        out["name"] = input_names[node.id]
    else:
        out["name"] = node.name
    return out


def qualified_name(fn: Callable[..., Any]) -> str:
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


def write_json(filename: str | os.PathLike[str], workflow: Mapping[str, Any]) -> None:
    text = json.dumps(workflow, indent=2, allow_nan=False)
    write_atomically(os.fspath(filename), text.encode("utf-8"))


def write_atomically(filename: str, data: bytes) -> None:
    tmp = f"{filename}.tmp{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
