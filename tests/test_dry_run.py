"""Dry runs of an executor: plot_dependency_graph and export_workflow_filename."""

from __future__ import annotations

import concurrent.futures as cf
import json

import numpy as np
import pytest
import workflow_funcs as wf

from executorkit import SingleNodeExecutor, get_item_from_future, split_future
from executorkit.errors import ResourceError
from executorkit.export import run_workflow

T = 60


def build(exe):
    a = exe.submit(wf.add, 1, 2)
    b = exe.submit(wf.add, a, 10)
    return exe.submit(wf.collect, [a, 5, b], scale=2)


def test_export_runs_nothing_and_round_trips(tmp_path):
    path = tmp_path / "workflow.json"
    with SingleNodeExecutor(max_workers=1, export_workflow_filename=str(path)) as exe:
        sink = build(exe)
    assert sink.result(timeout=0) is None  # a dry run's futures are done with None
    assert exe._engine.launcher.process is None  # no process was started
    doc = json.loads(path.read_text())
    assert doc["version"] == "0.1.0"
    (output,) = [n for n in doc["nodes"] if n["type"] == "output"]
    (edge,) = [e for e in doc["edges"] if e["target"] == output["id"]]
    sink_node = next(n for n in doc["nodes"] if n["id"] == edge["source"])
    assert sink_node["value"].endswith("collect")  # the output is wired to the real sink
    with SingleNodeExecutor(max_workers=2) as real:
        outputs = run_workflow(str(path), real)
        with SingleNodeExecutor(max_workers=2) as direct:
            expected = build(direct).result(timeout=T)
        assert outputs["result"].result(timeout=T) == expected


def test_plot_writes_png_and_svg(tmp_path):
    for ext, magic in ((".png", b"\x89PNG"), (".svg", b"<svg")):
        path = tmp_path / f"graph{ext}"
        with SingleNodeExecutor(plot_dependency_graph=True,
                                plot_dependency_graph_filename=str(path)) as exe:
            build(exe)
        assert magic in path.read_bytes()[:400]


def test_bad_plot_filename_is_rejected_at_construction(tmp_path):
    with pytest.raises(ResourceError, match=r"\.png or \.svg"):
        SingleNodeExecutor(plot_dependency_graph=True,
                           plot_dependency_graph_filename=str(tmp_path / "g.pdf"))


def test_plot_outside_jupyter_without_filename_warns():
    with pytest.warns(UserWarning, match="plot_dependency_graph_filename"), \
            SingleNodeExecutor(plot_dependency_graph=True) as exe:
        build(exe)


def test_dry_run_futures_are_real_futures(tmp_path):
    with SingleNodeExecutor(export_workflow_filename=str(tmp_path / "w.json")) as exe:
        fut = exe.submit(wf.add, 1, 2)
        assert isinstance(fut, cf.Future)


@pytest.mark.parametrize("option", ["export", "plot"])
def test_dry_run_result_returns_none_at_once(tmp_path, option):
    kwargs = ({"export_workflow_filename": str(tmp_path / "w.json")} if option == "export"
              else {"plot_dependency_graph_filename": str(tmp_path / "g.svg")})
    with SingleNodeExecutor(**kwargs) as exe:
        both = exe.submit(wf.get_prod_and_div, 1, 2)
        prod = get_item_from_future(both, "prod")
        first, second = split_future(exe.submit(wf.min_max, [1, 2]), 2)
        total = exe.submit(wf.get_sum, prod, first)
        # timeout=0: raises TimeoutError unless already done (executorlib returns None)
        assert [f.result(timeout=0) for f in (both, prod, first, second, total)] == [None] * 5
    assert total.result(timeout=0) is None


def test_dry_run_exports_numpy_arguments(tmp_path):
    path = tmp_path / "w.json"
    with SingleNodeExecutor(export_workflow_filename=str(path)) as exe:
        exe.submit(wf.array_stats, np.linspace(0.0, 1.0, 3))
    with SingleNodeExecutor(max_workers=1) as real:
        assert run_workflow(str(path), real)["result"].result(timeout=T) == \
            ["ndarray", "float64", [3], 1.5]
