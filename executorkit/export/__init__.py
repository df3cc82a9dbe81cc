"""Dependency graph plot and Python Workflow Definition (PWD) export of a dry run.

With ``plot_dependency_graph=True`` or ``export_workflow_filename=...`` an executor runs
nothing: each ``submit`` goes to :meth:`WorkflowRecorder.record`, which returns a future
done at once with ``None``, and at shutdown the executor calls
:meth:`WorkflowRecorder.plot` and/or :meth:`WorkflowRecorder.export`. :func:`run_workflow`
runs a PWD file (ours, or one written by aiida, jobflow, pyiron or the reference package)
on any executor.

One room per concern: ``_model`` (recorded calls -> graph), ``_pwd`` (graph <-> JSON),
``_plot`` (layout and drawing), ``_run`` (running a file), ``helpers`` (the functions an
exported file names), ``_recorder`` (the dry run's front).

The graph, in the format's conventions (so the reference package's runners compute what
executorkit computes):

- every recorded call is a ``function`` node whose ``value`` is ``"module.qualname"``;
- every argument is an edge into it whose ``targetPort`` is the parameter name. Values
  taken by ``*args`` (or given to a callable without a signature) get ``"arg<i>"``, extra
  keyword arguments their keyword. PWD runners call by keyword only, so only executorkit's
  :func:`run_workflow` runs calls to positional-only or ``*args`` parameters;
- a recorded call's future is an edge from its node (``sourcePort`` null); an item of it
  (:func:`~executorkit.get_item_from_future`, :func:`~executorkit.split_future`,
  executorlib's ``FutureSelector``) with a ``str`` key is an edge whose ``sourcePort`` is
  the key. An integer key (a sequence item) becomes a :func:`helpers.get_item` node, because
  a ``sourcePort`` is a string and every PWD runner indexes the result with it as given;
- a literal that JSON holds exactly (``None``, ``bool``, ``int``, finite ``float``,
  ``str``, and lists and ``str``-keyed dicts of these) is an ``input`` node named after the
  port it feeds (``_0``, ``_1``, ... appended where names repeat);
- other lists and ``str``-keyed dicts become the format's ``get_list`` / ``get_dict`` nodes
  and tuples, sets and frozensets executorkit's ``get_tuple`` / ``get_set`` /
  ``get_frozenset``, with ports ``"0"``, ``"1"``, ... or the keys; literals next to futures
  are kept and tuples stay tuples;
- a numpy array of bools, integers, finite floats or strings becomes a
  :func:`helpers.get_array` node fed by its ``tolist()`` and its dtype string
  (``array.dtype.str``), so it comes back with the same dtype and shape;
- a future from elsewhere is an input with its result if it succeeded, else an input
  without ``value`` (a placeholder: the plot shows it, :func:`run_workflow` refuses it);
- one ``output`` node per sink (a recorded call no other call uses), ``"result"`` if there
  is one sink, else ``"result_<node id>"``.

Anything else (a dataclass, a dict with non-``str`` keys, ``nan``, an object array) cannot be
written as JSON: the plot shows it, the export raises :class:`WorkflowError` naming the
argument. Nodes are numbered in topological order.
"""

from __future__ import annotations

from executorkit.errors import WorkflowError
from executorkit.export._plot import GraphImage, check_plot_filename
from executorkit.export._pwd import PWD_VERSION, load_workflow
from executorkit.export._recorder import WorkflowRecorder
from executorkit.export._run import run_workflow

__all__ = [
    "PWD_VERSION",
    "GraphImage",
    "WorkflowError",
    "WorkflowRecorder",
    "check_plot_filename",
    "load_workflow",
    "run_workflow",
]
