"""The recorder of a dry run: what ``submit`` does when an executor only draws or exports."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Any

from executorkit.export._model import Call, Graph, GraphBuilder
from executorkit.export._plot import plot_graph
from executorkit.export._pwd import to_pwd, write_json
from executorkit.graph import DryRunFuture


class WorkflowRecorder:
    """Records the calls of a dry run; draws them (:meth:`plot`) or exports them
    (:meth:`export`) as a Python Workflow Definition. Safe to use from several threads."""

    def __init__(self) -> None:
        self._calls: list[Call] = []
        self._producers: dict[int, int] = {}  # id(future) -> index in _calls
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._calls)

    def record(self, fn: Callable[..., Any], args: Iterable[Any] = (),
               kwargs: Mapping[str, Any] | None = None) -> Future[Any]:
        """Record ``fn(*args, **kwargs)``; the returned :class:`~executorkit.graph.DryRunFuture`
        stands for its result (done at once with ``None``). Futures in the arguments (also
        nested, and items taken from them) are the inputs."""
        if not callable(fn):
            raise TypeError(f"record() needs a callable, got {type(fn).__name__}")
        future = DryRunFuture()
        call = Call(fn, tuple(args), dict(kwargs or {}), future)
        with self._lock:
            self._producers[id(future)] = len(self._calls)
            self._calls.append(call)
        return future

    def graph(self) -> Graph:
        """The nodes and edges of what was recorded so far."""
        with self._lock:
            calls = list(self._calls)
            producers = dict(self._producers)
        return GraphBuilder(producers).build(calls)

    def to_dict(self) -> dict[str, Any]:
        """The workflow as a Python Workflow Definition dict (raises
        :class:`~executorkit.errors.WorkflowError` if a function or literal cannot be
        written)."""
        return to_pwd(self.graph())

    def export(self, filename: str | os.PathLike[str]) -> dict[str, Any]:
        """Write the workflow as Python Workflow Definition JSON to ``filename``; returns
        the dict written. Nothing is written if the workflow cannot be exported."""
        workflow = self.to_dict()
        write_json(filename, workflow)
        return workflow

    def plot(self, filename: str | os.PathLike[str] | None = None) -> Any:
        """Draw the dependency graph (networkx layout, matplotlib drawing; no graphviz).

        ``filename`` ending in ``.png`` or ``.svg`` writes that file. Returns an object
        that displays inline in Jupyter (``IPython.display.SVG``/``Image`` when IPython is
        importable, else a :class:`GraphImage`), also when a file is written.
        """
        return plot_graph(self.graph(), filename)
