"""Interop with the Python Workflow Definition's reference package
(``python-workflow-definition``): our exports validate against its models and its runners
compute what executorkit computes; files in the conventions of its writers run through
``run_workflow``; its executorlib loader drives our executor."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import workflow_funcs as wf
from python_workflow_definition import executorlib as pwd_executorlib
from python_workflow_definition import purepython
from python_workflow_definition.models import PythonWorkflowDefinitionWorkflow
from python_workflow_definition.shared import set_result_node, update_node_names

from executorkit import SingleNodeExecutor, get_item_from_future, split_future
from executorkit.errors import WorkflowError
from executorkit.export import WorkflowRecorder, run_workflow

T = 60
GET_LIST = "python_workflow_definition.shared.get_list"
GET_DICT = "python_workflow_definition.shared.get_dict"


def reference_result(path: Any) -> Any:
    """Validate ``path`` against the reference models, then run it with its pure-Python
    runner."""
    PythonWorkflowDefinitionWorkflow.load_json_file(path)
    return purepython.load_workflow_json(str(path))


# ---------------------------------------------------------------- workflows to export
def arithmetic(exe: Any) -> Future[Any]:
    """The format's own example: 1 * 2 and 1 / 2, summed, squared: 6.25."""
    both = exe.submit(wf.get_prod_and_div, 1, 2)
    total = exe.submit(wf.get_sum, get_item_from_future(both, "prod"),
                       get_item_from_future(both, "div"))
    return exe.submit(wf.get_square, total)


def split_items(exe: Any) -> Future[Any]:
    low, high = split_future(exe.submit(wf.min_max, [3.0, -1.0, 7.5]), 2)
    return exe.submit(wf.get_sum, x=high, y=low)


def containers(exe: Any) -> Future[Any]:
    a = exe.submit(wf.add, 1, 2)
    b = exe.submit(wf.mul, a, y=10)
    return exe.submit(wf.echo, [1, a, (b, "t"), {"k": b, "z": None}, {5, 6}, [[1.5]]])


def nested_items(exe: Any) -> Future[Any]:
    pairs = exe.submit(wf.echo, {"pair": [4, 9], "name": "n"})
    second = get_item_from_future(get_item_from_future(pairs, "pair"), 1)
    return exe.submit(wf.scale, second, factor=3)


def numpy_argument(exe: Any) -> Future[Any]:
    data = np.arange(6, dtype=np.int32).reshape(2, 3)
    first = exe.submit(wf.array_stats, data)
    return exe.submit(wf.echo, [first, exe.submit(wf.array_stats, np.array([0.5, 2.0]))])


WORKFLOWS = [arithmetic, split_items, containers, nested_items, numpy_argument]


@pytest.mark.parametrize("build", WORKFLOWS, ids=lambda f: f.__name__)
def test_export_runs_in_the_reference_runner_with_our_result(tmp_path, build):
    path = tmp_path / "wf.json"
    with SingleNodeExecutor(export_workflow_filename=str(path)) as dry:
        build(dry)
    with SingleNodeExecutor(max_workers=2) as exe:
        expected = build(exe).result(timeout=T)
        ours = run_workflow(path, exe)["result"].result(timeout=T)
    assert reference_result(path) == expected == ours


def test_arithmetic_example_gives_6_25_everywhere(tmp_path):
    path = tmp_path / "arithmetic.json"
    with SingleNodeExecutor(export_workflow_filename=str(path)) as dry:
        arithmetic(dry)
    data = json.loads(path.read_text())
    assert (len(data["nodes"]), len(data["edges"])) == (6, 6)  # no value-less inputs
    ports = sorted((e["sourcePort"], e["targetPort"]) for e in data["edges"]
                   if e["sourcePort"] is not None)
    assert ports == [("div", "y"), ("prod", "x")]
    assert reference_result(path) == 6.25
    with SingleNodeExecutor(max_workers=2) as exe:
        assert run_workflow(path, exe)["result"].result(timeout=T) == 6.25
        # the reference package's executorlib loader, handed our executor
        assert pwd_executorlib.load_workflow_json(str(path), exe).result(timeout=T) == 6.25


def test_plot_and_export_share_the_item_edges():
    rec = WorkflowRecorder()
    arithmetic(_RecorderSubmit(rec))
    graph = rec.graph()
    assert (len(graph.nodes), len(graph.edges)) == (6, 6)
    assert all(n.has_value for n in graph.nodes if n.type == "input")
    assert sorted(e.source_port for e in graph.edges if e.source_port) == ["div", "prod"]


class _RecorderSubmit:
    def __init__(self, rec: WorkflowRecorder) -> None:
        self.submit: Callable[..., Any] = lambda fn, *a, **k: rec.record(fn, a, k)


def test_integer_items_become_get_item_nodes(tmp_path):
    rec = WorkflowRecorder()
    split_items(_RecorderSubmit(rec))
    data = rec.to_dict()
    items = [n for n in data["nodes"] if n.get("value") == "executorkit.export.helpers.get_item"]
    assert len(items) == 2
    keys = sorted(next(m["value"] for m in data["nodes"] if m["id"] == e["source"])
                  for e in data["edges"] if e["targetPort"] == "key")
    assert keys == [0, 1]


def test_executorlib_style_selectors_are_items():
    class FutureSelector(Future):  # the shape of executorlib's: _future and _selector
        def __init__(self, future: Future[Any], selector: Any) -> None:
            super().__init__()
            self._future = future
            self._selector = selector

    rec = WorkflowRecorder()
    both = rec.record(wf.get_prod_and_div, (1, 2))
    rec.record(wf.get_sum, (FutureSelector(both, "prod"), FutureSelector(both, "div")))
    edges = rec.to_dict()["edges"]
    assert sorted(e["sourcePort"] for e in edges if e["sourcePort"]) == ["div", "prod"]


def test_numpy_arrays_keep_dtype_and_shape(tmp_path):
    rec = WorkflowRecorder()
    rec.record(wf.echo, (np.array([[1, 2]], dtype=np.uint8),))
    path = tmp_path / "wf.json"
    data = rec.export(path)
    assert {n["name"]: n["value"] for n in data["nodes"] if n["type"] == "input"} == {
        "value": [[1, 2]], "dtype": "|u1"}
    for result in (reference_result(path), _run_on_threads(path)):
        assert result.dtype == np.uint8 and result.tolist() == [[1, 2]]


@pytest.mark.parametrize("array", [np.array([1.0, np.nan]), np.array([object()]),
                                   np.array([1j])], ids=["nan", "object", "complex"])
def test_arrays_json_cannot_hold_are_a_clear_error(tmp_path, array):
    rec = WorkflowRecorder()
    rec.record(wf.echo, (array,))
    with pytest.raises(WorkflowError, match=r"ndarray.*numpy arrays of numbers"):
        rec.export(tmp_path / "wf.json")
    assert not (tmp_path / "wf.json").exists()


def _run_on_threads(path: Any) -> Any:
    with ThreadPoolExecutor(max_workers=2) as exe:
        return run_workflow(path, exe)["result"].result(timeout=T)


# ---------------------------------------------------------------- files other tools write
def write_like_reference_writers(path: Any, nodes: list[dict[str, Any]],
                                 edges: list[dict[str, Any]]) -> None:
    """The last steps of the reference package's jobflow and pyiron_base writers
    (``write_workflow_json``): input names from their ports, the result node on the first
    node no edge leaves, validated and dumped by its model."""
    workflow = set_result_node(update_node_names(
        {"version": "0.1.0", "nodes": nodes, "edges": edges}))
    PythonWorkflowDefinitionWorkflow(**workflow).dump_json_file(file_name=str(path))


def edge(source: int, target: int, port: str, source_port: str | None = None) -> dict:
    return {"source": source, "sourcePort": source_port, "target": target, "targetPort": port}


def test_runs_a_file_in_the_jobflow_writers_convention(tmp_path):
    # jobflow's writer: jobs first, then one input node per distinct literal (shared by
    # every port that uses it), get_list/get_dict nodes of the format, output keys as ports.
    nodes = [
        {"id": 0, "type": "function", "value": "workflow_funcs.get_prod_and_div"},
        {"id": 1, "type": "function", "value": "workflow_funcs.get_sum"},
        {"id": 2, "type": "function", "value": "workflow_funcs.collect"},
        {"id": 3, "type": "input", "value": 2},
        {"id": 4, "type": "function", "value": GET_LIST},
        {"id": 5, "type": "function", "value": GET_DICT},
        {"id": 6, "type": "function", "value": "workflow_funcs.echo"},
    ]
    edges = [
        edge(3, 0, "x"), edge(3, 0, "y"),  # one input node feeds two ports
        edge(0, 1, "x", "prod"), edge(0, 1, "y", "div"),
        edge(1, 4, "0"), edge(3, 4, "1"), edge(0, 4, "2", "prod"),
        edge(4, 2, "values"), edge(3, 2, "scale"),
        edge(2, 5, "scaled"), edge(1, 5, "total"),
        edge(5, 6, "value"),
    ]
    path = tmp_path / "jobflow.json"
    write_like_reference_writers(path, nodes, edges)
    expected = {"scaled": [10.0, 4, 8], "total": 5.0}
    assert reference_result(path) == expected
    assert _run_on_threads(path) == expected
    with SingleNodeExecutor(max_workers=2) as exe:
        assert run_workflow(path, exe)["result"].result(timeout=T) == expected


def test_runs_a_file_in_the_pyiron_base_writers_convention(tmp_path):
    # pyiron_base's writer numbers nodes from the last call backwards and names the items
    # of a list result "s_<index>".
    nodes = [
        {"id": 0, "type": "function", "value": "workflow_funcs.get_sum"},
        {"id": 1, "type": "function", "value": "workflow_funcs.min_max"},
        {"id": 2, "type": "function", "value": GET_LIST},
        {"id": 3, "type": "input", "value": 4.0},
        {"id": 4, "type": "input", "value": -2.0},
    ]
    edges = [edge(3, 2, "0"), edge(4, 2, "1"), edge(2, 1, "values"),
             edge(1, 0, "x", "s_0"), edge(1, 0, "y", "s_1")]
    path = tmp_path / "pyiron.json"
    write_like_reference_writers(path, nodes, edges)
    PythonWorkflowDefinitionWorkflow.load_json_file(path)
    assert _run_on_threads(path) == 2.0  # min + max
    with SingleNodeExecutor(max_workers=2) as exe:
        assert run_workflow(path, exe)["result"].result(timeout=T) == 2.0
