"""The dependency graph drawn with networkx (layout) and matplotlib (PNG or SVG), shown
inline in Jupyter. Both are pip-installable (the ``graph`` extra); no graphviz."""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

from executorkit.errors import ResourceError
from executorkit.export._model import Edge, Graph, Node, ascii_text
from executorkit.export._pwd import write_atomically

PLOT_EXTENSIONS = (".png", ".svg")


def plot_graph(graph: Graph, filename: str | os.PathLike[str] | None) -> Any:
    """Draw ``graph``; write ``filename`` (.png or .svg) if given; an object Jupyter shows."""
    fmt = _plot_format(filename)
    data = _render(graph, fmt)
    if filename is not None:
        write_atomically(os.fspath(filename), data)
    return _display_object(data, fmt)


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


def layers(graph: Graph, dag: Any) -> dict[int, int]:
    """Rows from the top: a call one below its deepest call input, an input or a helper
    just above the node it feeds, an output just below its source."""
    nodes = {node.id: node for node in graph.nodes}
    order = list(_topological_sort(dag))
    layer: dict[int, int] = {}
    for n in order:
        if nodes[n].type == "function":
            layer[n] = max((layer[p] + 1 if nodes[p].type == "function" else 1
                            for p in dag.predecessors(n)), default=1)
    for n in reversed(order):  # consumers first, so nested helpers stack upwards
        below = [layer[s] for s in dag.successors(n) if s in layer]
        if nodes[n].helper and below:
            layer[n] = min(below) - 1
        elif nodes[n].type == "input":
            layer[n] = max(min(below, default=1) - 1, 0)
    for n in order:
        if nodes[n].type == "output":
            layer[n] = max(layer[p] for p in dag.predecessors(n)) + 1
    return layer


def layout(graph: Graph) -> dict[int, tuple[float, float]]:
    """``(x, y)`` per node, one unit apart: networkx's multipartite layout of the layers
    (``y = -layer``), each layer ordered by a depth-first walk up from the outputs so the
    inputs of a node sit next to each other."""
    import networkx as nx

    dag = nx.DiGraph()
    dag.add_nodes_from(node.id for node in graph.nodes)
    dag.add_edges_from((edge.source, edge.target) for edge in graph.edges)
    layer = layers(graph, dag)
    ordered = nx.DiGraph()
    ordered.add_nodes_from((n, {"layer": layer[n]})
                           for n in nx.dfs_postorder_nodes(dag.reverse(copy=False)))
    if not len(ordered):
        return {}
    positions = nx.multipartite_layout(ordered, subset_key="layer", align="horizontal")
    unit = _unit(positions, layer)
    return {n: (float(xy[0]) / unit, -float(layer[n])) for n, xy in positions.items()}


def _topological_sort(dag: Any) -> list[int]:
    import networkx as nx

    return list(nx.lexicographical_topological_sort(dag))


def _unit(positions: Mapping[int, Any], layer: Mapping[int, int]) -> float:
    """The distance networkx put between neighbours (it scales the whole layout)."""
    rank = {value: i for i, value in enumerate(sorted(set(layer.values())))}
    nodes = list(positions)
    first = nodes[0]
    for n in nodes[1:]:
        if layer[n] != layer[first]:
            return abs(float(positions[n][1] - positions[first][1])) / abs(
                rank[layer[n]] - rank[layer[first]])
    xs = sorted(float(positions[n][0]) for n in nodes)
    return (xs[1] - xs[0]) if len(xs) > 1 else 1.0


_STYLES = {  # node kind -> (font size, face colour)
    "function": (9, "#cfe2f3"),
    "helper": (8, "#e6e6e6"),
    "input": (7, "#fff2cc"),
    "output": (8, "#d9ead3"),
}


def _render(graph: Graph, fmt: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    positions = layout(graph)
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
    pairs = Counter((edge.source, edge.target) for edge in graph.edges)
    drawn: Counter[tuple[int, int]] = Counter()
    for edge in graph.edges:  # parallel edges (two items of one result) bend apart
        pair = (edge.source, edge.target)
        bend = 0.8 * (drawn[pair] - (pairs[pair] - 1) / 2)
        drawn[pair] += 1
        _draw_edge(ax, edge, (artists[edge.source], artists[edge.target]),
                   (positions[edge.source], positions[edge.target]), bend)
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else None
    fig.savefig(buffer, format=fmt, bbox_inches="tight", dpi=100, metadata=metadata)
    return buffer.getvalue()


def _draw_node(ax: Any, node: Node, xy: tuple[float, float]) -> Any:
    kind = "helper" if node.helper else node.type
    size, colour = _STYLES[kind]
    return ax.text(xy[0], xy[1], node.label, ha="center", va="center", fontsize=size,
                   parse_math=False, zorder=3,
                   bbox={"boxstyle": "round,pad=0.3", "facecolor": colour,
                         "edgecolor": "#555555", "linewidth": 0.8})


def _draw_edge(ax: Any, edge: Edge, artists: tuple[Any, Any],
               ends: tuple[tuple[float, float], tuple[float, float]], bend: float) -> None:
    ax.annotate("", xy=(0.5, 1.0), xycoords=artists[1], xytext=(0.5, 0.0),
                textcoords=artists[0], zorder=1,
                arrowprops={"arrowstyle": "-|>", "color": "#555555", "linewidth": 0.8,
                            "shrinkA": 4, "shrinkB": 4,
                            "connectionstyle": f"arc3,rad={bend}"})
    label = edge.port if edge.source_port is None else f"{edge.source_port} > {edge.port}"
    if label is None:
        return
    (x0, y0), (x1, y1) = ends
    # the middle of an arc3 curve lies half the bend off the straight line
    x, y = (x0 + x1) / 2 + bend * (y1 - y0) / 2, (y0 + y1) / 2 - bend * (x1 - x0) / 2
    ax.text(x, y, ascii_text(label), ha="center", va="center",
            fontsize=6, color="#7f3f00", parse_math=False, zorder=2,
            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none",
                  "alpha": 0.8})
