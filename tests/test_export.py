"""Dry-run recording: the Python Workflow Definition export, its round trip through
run_workflow, and the dependency graph plot."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import pytest
import workflow_funcs as wf

from executorkit.errors import DependencyError, ExecutorkitError, ResourceError
from executorkit.export import (
    GraphImage,
    WorkflowError,
    WorkflowRecorder,
    load_workflow,
    run_workflow,
)
from executorkit.export._plot import layout
from executorkit.export.helpers import get_dict, get_list, get_tuple

TIMEOUT = 30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- helpers
def node(data: dict[str, Any], node_id: int) -> dict[str, Any]:
    return next(n for n in data["nodes"] if n["id"] == node_id)


def of_type(data: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [n for n in data["nodes"] if n["type"] == kind]


def function_id(data: dict[str, Any], value: str) -> int:
    (found,) = [n["id"] for n in of_type(data, "function") if n["value"] == value]
    return found


def inputs_of(data: dict[str, Any], target: int) -> dict[str, dict[str, Any]]:
    """targetPort -> source node of every edge into ``target``."""
    return {e["targetPort"]: node(data, e["source"]) for e in data["edges"]
            if e["target"] == target}


def outputs(data: dict[str, Any]) -> dict[str, int]:
    """output name -> id of the node feeding it."""
    return {n["name"]: next(e["source"] for e in data["edges"] if e["target"] == n["id"])
            for n in of_type(data, "output")}


def recorder_submit(rec: WorkflowRecorder) -> Callable[..., Any]:
    return lambda fn, *args, **kwargs: rec.record(fn, args, kwargs)


def direct_submit(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def scenario(submit: Callable[..., Any]) -> dict[str, Any]:
    """A DAG using positional, keyword, positional-only and *args/**kwargs arguments and
    literals inside containers, with three sinks (echo, combine, scale)."""
    a = submit(wf.add, 1, 2)
    b = submit(wf.mul, a, y=10)
    c = submit(wf.echo, [1, a, (b, "t"), {"k": b, "z": None}, [[1.5], {"q": "w"}], ()])
    d = submit(wf.combine, a, b, 7, (8, {9}), flag=True)
    e = submit(wf.scale, b, factor=0.5)
    return {"workflow_funcs.echo": c, "workflow_funcs.combine": d, "workflow_funcs.scale": e}


# ---------------------------------------------------------------- export
def test_small_dag_exports_nodes_and_edges(tmp_path):
    rec = WorkflowRecorder()
    a = rec.record(wf.add, (1, 2))
    rec.record(wf.mul, (a,), {"y": 3})
    path = tmp_path / "wf.json"
    data = rec.export(path)

    assert json.loads(path.read_text()) == data
    assert data["version"] == "0.1.0"
    assert len(data["nodes"]) == 6 and len(data["edges"]) == 5
    add_id = function_id(data, "workflow_funcs.add")
    mul_id = function_id(data, "workflow_funcs.mul")
    add_in = inputs_of(data, add_id)
    assert {p: (n["type"], n["value"], n["name"]) for p, n in add_in.items()} == {
        "x": ("input", 1, "x"), "y": ("input", 2, "y_0")}  # names repeated ports: _0, _1
    mul_in = inputs_of(data, mul_id)
    assert mul_in["x"]["id"] == add_id
    assert (mul_in["y"]["type"], mul_in["y"]["value"], mul_in["y"]["name"]) == \
        ("input", 3, "y_1")
    edge = next(e for e in data["edges"] if e["source"] == add_id)
    assert edge == {"source": add_id, "sourcePort": None, "target": mul_id, "targetPort": "x"}


def test_output_node_is_on_the_real_sink():
    rec = WorkflowRecorder()
    a = rec.record(wf.add, (1, 2))
    b = rec.record(wf.mul, (a, 2))
    c = rec.record(wf.add, (a, 5))
    rec.record(wf.add, (b, c))  # the only sink, recorded last
    data = rec.to_dict()

    (output,) = of_type(data, "output")
    assert output["name"] == "result"
    functions = of_type(data, "function")
    sink = outputs(data)["result"]
    assert sink == functions[-1]["id"] != functions[0]["id"]
    assert {p: n["value"] for p, n in inputs_of(data, sink).items()} == {
        "x": "workflow_funcs.mul", "y": "workflow_funcs.add"}


def test_one_output_per_sink():
    rec = WorkflowRecorder()
    a = rec.record(wf.add, (1, 2))
    rec.record(wf.mul, (a, 2))
    rec.record(wf.scale, (a,), {"factor": 3})
    rec.record(wf.echo, ("alone",))
    data = rec.to_dict()

    sinks = outputs(data)
    expected = {function_id(data, f"workflow_funcs.{name}") for name in ("mul", "scale", "echo")}
    assert set(sinks.values()) == expected
    assert set(sinks) == {f"result_{i}" for i in expected}
    assert function_id(data, "workflow_funcs.add") not in sinks.values()


def test_literals_inside_containers_are_kept():
    rec = WorkflowRecorder()
    fut = rec.record(wf.add, (1, 2))
    rec.record(wf.echo, ([1, fut, 3],))
    rec.record(wf.echo, ({"a": fut, "b": 2},))
    rec.record(wf.echo, ((fut, 4),))
    rec.record(wf.echo, ([[1, 2], {"k": [3]}],))
    data = rec.to_dict()
    add_id = function_id(data, "workflow_funcs.add")

    def container(value: str) -> dict[str, dict[str, Any]]:
        (helper,) = [n for n in of_type(data, "function") if n["value"] == value]
        return inputs_of(data, helper["id"])

    as_list = container("python_workflow_definition.shared.get_list")
    assert as_list["1"]["id"] == add_id
    assert (as_list["0"]["value"], as_list["2"]["value"]) == (1, 3)
    as_dict = container("python_workflow_definition.shared.get_dict")
    assert as_dict["a"]["id"] == add_id and as_dict["b"]["value"] == 2
    as_tuple = container("executorkit.export.helpers.get_tuple")
    assert as_tuple["0"]["id"] == add_id and as_tuple["1"]["value"] == 4
    plain = [n for n in of_type(data, "input") if n["name"] == "value"]
    assert [n["value"] for n in plain] == [[[1, 2], {"k": [3]}]]


def test_keyword_arguments_use_parameter_names():
    rec = WorkflowRecorder()
    a = rec.record(wf.add, (), {"y": 1, "x": 2})
    rec.record(wf.scale, (a,), {"factor": 5})
    data = rec.to_dict()

    add_in = inputs_of(data, function_id(data, "workflow_funcs.add"))
    assert {p: n["value"] for p, n in add_in.items()} == {"x": 2, "y": 1}
    scale_in = inputs_of(data, function_id(data, "workflow_funcs.scale"))
    assert scale_in["x"]["id"] == function_id(data, "workflow_funcs.add")
    assert (scale_in["factor"]["value"], scale_in["factor"]["name"]) == (5, "factor")


def test_futures_from_elsewhere_become_inputs():
    done: Future[int] = Future()
    done.set_result(5)
    pending: Future[int] = Future()
    rec = WorkflowRecorder()
    rec.record(wf.add, (done, pending))
    data = rec.to_dict()

    ports = inputs_of(data, function_id(data, "workflow_funcs.add"))
    assert ports["x"]["value"] == 5
    assert ports["y"]["type"] == "input" and "value" not in ports["y"]


@pytest.mark.parametrize(("value", "path"), [
    (object(), "'value'"),
    ({"a": [1, float("nan")]}, "\"value['a'][1]\""),
    ({1: "int key"}, "'value'"),
])
def test_literal_json_cannot_hold_is_a_clear_error(tmp_path, value, path):
    rec = WorkflowRecorder()
    rec.record(wf.echo, (value,))
    target = tmp_path / "wf.json"
    with pytest.raises(WorkflowError, match=re.escape(f"argument {path} of echo")) as info:
        rec.export(target)
    assert isinstance(info.value, ExecutorkitError) and isinstance(info.value, ValueError)
    assert not target.exists()


def test_unimportable_callable_is_a_clear_error():
    class Scaler:
        def __call__(self, x: float) -> float:
            return x

    rec = WorkflowRecorder()
    rec.record(Scaler(), (1,))
    with pytest.raises(WorkflowError, match="plain function"):
        rec.to_dict()


# ---------------------------------------------------------------- round trip
def test_round_trip_on_thread_pool_matches_direct_calls(tmp_path):
    expected = scenario(direct_submit)
    rec = WorkflowRecorder()
    scenario(recorder_submit(rec))
    path = tmp_path / "wf.json"
    data = rec.export(path)
    assert load_workflow(path) == data

    with ThreadPoolExecutor(max_workers=2) as exe:
        futures = run_workflow(path, exe)
        results = {name: f.result(timeout=TIMEOUT) for name, f in futures.items()}
    by_function = {node(data, source)["value"]: results[name]
                   for name, source in outputs(data).items()}
    assert by_function == expected
    assert type(by_function["workflow_funcs.echo"][2]) is tuple
    assert by_function["workflow_funcs.combine"][2] == (7, (8, {9}))


def test_positional_only_and_varargs_validate_against_the_reference_models(tmp_path):
    # The reference runners call every function by keyword, so they cannot run calls that
    # use positional-only or *args parameters (scenario's combine); the file is still valid
    # PWD, and run_workflow runs it (test above).
    from python_workflow_definition.models import PythonWorkflowDefinitionWorkflow

    rec = WorkflowRecorder()
    scenario(recorder_submit(rec))
    rec.export(tmp_path / "wf.json")
    PythonWorkflowDefinitionWorkflow.load_json_file(tmp_path / "wf.json")


def test_round_trip_single_sink_is_named_result(tmp_path):
    rec = WorkflowRecorder()
    a = rec.record(wf.add, (1, 2))
    rec.record(wf.mul, (a, a))
    rec.export(tmp_path / "wf.json")
    with ThreadPoolExecutor(max_workers=1) as exe:
        futures = run_workflow(tmp_path / "wf.json", exe)
        assert list(futures) == ["result"]
        assert futures["result"].result(timeout=TIMEOUT) == 9


def test_failed_node_fails_its_dependents(tmp_path):
    rec = WorkflowRecorder()
    a = rec.record(wf.fail, ("boom",))
    rec.record(wf.add, (a, 1))
    rec.export(tmp_path / "wf.json")
    with ThreadPoolExecutor(max_workers=2) as exe:
        future = run_workflow(tmp_path / "wf.json", exe)["result"]
        with pytest.raises(DependencyError) as info:
            future.result(timeout=TIMEOUT)
    assert isinstance(info.value.__cause__, ValueError)
    assert "boom" in str(info.value.__cause__)


def test_native_executor_receives_upstream_futures(tmp_path):
    class Recording(Executor):
        def __init__(self) -> None:
            self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any], Future[Any]]] = []

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
            future: Future[Any] = Future()
            self.calls.append((fn, args, kwargs, future))
            return future

    rec = WorkflowRecorder()
    a = rec.record(wf.add, (1, 2))
    rec.record(wf.scale, (a,), {"factor": 3})
    rec.export(tmp_path / "wf.json")
    exe = Recording()
    futures = run_workflow(tmp_path / "wf.json", exe, native_dependencies=True)

    (add_fn, add_args, add_kwargs, add_future), (scale_fn, scale_args, scale_kwargs, last) = \
        exe.calls
    assert (add_fn, add_args, add_kwargs) == (wf.add, (), {"x": 1, "y": 2})
    assert scale_fn is wf.scale and scale_args == ()
    assert scale_kwargs == {"x": add_future, "factor": 3}
    assert futures == {"result": last}


def test_source_ports_of_other_tools_are_followed(tmp_path):
    workflow = {
        "version": "0.1.0",
        "nodes": [
            {"id": 0, "type": "function", "value": "workflow_funcs.split"},
            {"id": 1, "type": "function", "value": "workflow_funcs.add"},
            {"id": 2, "type": "input", "value": 8, "name": "x"},
            {"id": 3, "type": "output", "name": "result"},
        ],
        "edges": [
            {"source": 2, "sourcePort": None, "target": 0, "targetPort": "x"},
            {"source": 0, "sourcePort": "half", "target": 1, "targetPort": "x"},
            {"source": 0, "sourcePort": "double", "target": 1, "targetPort": "y"},
            {"source": 1, "sourcePort": None, "target": 3, "targetPort": None},
        ],
    }
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(workflow))
    with ThreadPoolExecutor(max_workers=2) as exe:
        assert run_workflow(path, exe)["result"].result(timeout=TIMEOUT) == 20


def test_unresolvable_functions_and_placeholders_are_clear_errors(tmp_path):
    def local(x: int) -> int:
        return x

    rec = WorkflowRecorder()
    rec.record(local, (1,))
    data = rec.export(tmp_path / "local.json")
    assert function_value(data).endswith("<locals>.local")
    rec2 = WorkflowRecorder()
    rec2.record(wf.echo, (Future(),))
    rec2.export(tmp_path / "placeholder.json")
    missing = {**data, "nodes": [{**n, "value": "no_such_module_xyz.f"}
                                 if n["type"] == "function" else n for n in data["nodes"]]}
    (tmp_path / "missing.json").write_text(json.dumps(missing))

    with ThreadPoolExecutor(max_workers=1) as exe:
        with pytest.raises(WorkflowError, match="inside a function"):
            run_workflow(tmp_path / "local.json", exe)
        with pytest.raises(WorkflowError, match=re.escape("no_such_module_xyz.f")):
            run_workflow(tmp_path / "missing.json", exe)
        with pytest.raises(WorkflowError, match="no value"):
            run_workflow(tmp_path / "placeholder.json", exe)


def function_value(data: dict[str, Any]) -> str:
    (function,) = of_type(data, "function")
    return function["value"]


def test_malformed_files_are_rejected(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"version": "0.1.0", "nodes": [{"id": 0, "type": "input"}],
                                "edges": [{"source": 0, "target": 7}]}))
    with pytest.raises(WorkflowError, match="does not connect"):
        load_workflow(path)
    path.write_text("{not json")
    with pytest.raises(WorkflowError, match="not JSON"):
        load_workflow(path)


def test_container_helpers():
    assert get_list(**{"1": "b", "0": "a"}) == ["a", "b"]
    assert get_tuple(**{"0": 1}) == (1,)
    assert get_tuple() == ()
    assert get_dict(a=1, b=[2]) == {"a": 1, "b": [2]}
    with pytest.raises(WorkflowError, match="without gaps"):
        get_list(**{"0": 1, "2": 3})


# ---------------------------------------------------------------- plot
def small_recorder() -> WorkflowRecorder:
    rec = WorkflowRecorder()
    a = rec.record(wf.add, (1, 2))
    b = rec.record(wf.mul, (a,), {"y": "$x$ not math"})
    rec.record(wf.echo, ([b, a, (4, 5)],))
    return rec


def test_plot_writes_png(tmp_path):
    path = tmp_path / "graph.png"
    shown = small_recorder().plot(path)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert shown.data == data  # displays inline in Jupyter


def test_plot_writes_svg_with_labels(tmp_path):
    path = tmp_path / "graph.svg"
    shown = small_recorder().plot(str(path))
    text = path.read_text()
    assert "<svg" in text
    for label in ("add", "mul", "echo", "list", "tuple", "result"):  # text kept as comments
        assert f"<!-- {label} -->" in text
    assert "<svg" in shown._repr_svg_()


def test_plot_inline_without_file(tmp_path):
    rec = WorkflowRecorder()
    rec.record(wf.add, (Future(), 1))  # a placeholder input is drawn too
    shown = rec.plot()
    assert "<svg" in shown._repr_svg_()
    assert "<svg" in WorkflowRecorder().plot()._repr_svg_()  # nothing recorded
    assert list(tmp_path.iterdir()) == []


def test_plot_rejects_other_extensions(tmp_path):
    with pytest.raises(ResourceError, match=r"\.png or \.svg") as info:
        small_recorder().plot(tmp_path / "graph.pdf")
    assert info.value.key == "plot_dependency_graph_filename"
    assert info.value.allowed == ".png or .svg"
    assert list(tmp_path.iterdir()) == []


def test_layout_layers_follow_dependencies():
    rec = small_recorder()
    graph = rec.graph()
    positions = layout(graph)
    depth = {n.id: -positions[n.id][1] for n in graph.nodes}
    for edge in graph.edges:
        assert depth[edge.source] < depth[edge.target]
    by_label = {n.label: depth[n.id] for n in graph.nodes if n.type == "function"}
    assert by_label["add"] < by_label["mul"] < by_label["list"] < by_label["echo"]
    assert by_label["tuple"] == by_label["list"] - 1


def test_plot_without_ipython_returns_displayable_bytes(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "IPython.display", None)  # import now fails
    path = tmp_path / "graph.svg"
    shown = small_recorder().plot(path)
    assert isinstance(shown, GraphImage)
    assert shown.data == path.read_bytes() and shown._repr_png_() is None
    assert "<svg" in shown._repr_svg_()
