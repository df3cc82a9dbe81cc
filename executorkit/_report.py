"""Campaign reports: one self-contained HTML page from a cache directory.

``campaign_report(DIR)`` reads every cache entry (``get_cache_data`` without outputs) and
draws, as inline SVG with a little CSS and JavaScript and nothing fetched from elsewhere:

* a timeline of the calls per worker slot (host and pool slot), coloured by outcome;
* running calls and busy cores over time;
* a runtime histogram split into done, failed and cancelled/killed calls;
* a table of the failures with their tracebacks (clicking a failed bar opens its entry).

Earlier failed attempts of retried calls (``<key>.attempt-<n>.h5``) are calls of their own
here. The object shows itself inline in Jupyter (``_repr_html_``); ``write(path)`` and
``executorkit report DIR -o report.html`` write the page.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from typing import Any

from executorkit.errors import ExecutorkitError

__all__ = ["CampaignReport", "campaign_report", "exception_line", "write_report"]

COLOURS = {"done": "#2e8b57", "failed": "#d62728", "killed": "#ff9f1c"}
LABELS = {"done": "done", "failed": "failed", "killed": "cancelled / killed"}
# Failures of the process rather than of the function: it was stopped or died.
_KILLED = ("CancelledError", "TaskTimeoutError", "WorkerDiedError")
WIDTH, LANE, LEFT, TOP = 900, 14, 150, 20


@dataclass(frozen=True)
class Call:
    key: str
    function: str
    outcome: str  # done | failed | killed
    start: float  # seconds since the campaign's first start
    end: float
    lane: str
    cpus: int
    error: str
    traceback: str


def exception_line(text: str | None) -> str:
    """The first line of the exception a traceback ends with (after its last frame)."""
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    frames = [i for i, ln in enumerate(lines) if ln[:1].isspace()]
    after = lines[frames[-1] + 1:] if frames else lines
    return after[0].strip() if after else ""


def _outcome(status: str, error_line: str) -> str:
    if status == "done":
        return "done"
    name = error_line.split(":", 1)[0].rsplit(".", 1)[-1]
    if name in _KILLED or "was killed by signal" in error_line:
        return "killed"
    return "failed"


def _cpus(res: Any) -> int:
    if not isinstance(res, dict):
        return 1
    try:
        return max(1, int(res.get("cores", 1)) * int(res.get("threads_per_core", 1)))
    except (TypeError, ValueError):
        return 1


def load_calls(directory: str | os.PathLike[str]) -> list[Call]:
    from executorkit.cache import get_cache_data

    if not os.path.isdir(directory):
        raise ExecutorkitError(f"{directory} is not a directory (give a cache directory)")
    frame = get_cache_data(directory, load_outputs=False)
    if frame.empty:
        return []
    t0 = min(ts.timestamp() for ts in frame["started"])
    rows = []
    for row in frame.itertuples(index=False):
        line = exception_line(row.error_text) if row.status != "done" else ""
        rows.append((row, line))
    lanes = _lanes([(r.hostname, r.slot, r.started.timestamp(), r.finished.timestamp())
                    for r, _ in rows])
    return [Call(r.cache_key, _function(r), _outcome(r.status, line),
                 r.started.timestamp() - t0, r.finished.timestamp() - t0, lane,
                 _cpus(r.resource_dict), line, r.error_text or "")
            for (r, line), lane in zip(rows, lanes, strict=True)]


def _function(row: Any) -> str:
    """The function's short name; for a Command, its program line."""
    from executorkit.command import label

    name = row.function_name.rsplit(".", 1)[-1]
    return (label(row.input_args) or name) if name == "run_command" else name


def _lanes(spans: list[tuple[str, Any, float, float]]) -> list[str]:
    """Each call's row in the timeline: its host and recorded pool slot; entries without a
    slot (older files) take the first row of their host that is free at their start."""
    out: list[str] = [""] * len(spans)
    free: dict[str, list[float]] = {}  # host -> end time of each inferred row
    for i in sorted(range(len(spans)), key=lambda i: spans[i][2]):
        host, slot, start, end = spans[i]
        if isinstance(slot, int):
            out[i] = f"{host} slot {slot}"
            continue
        ends = free.setdefault(host, [])
        row = next((j for j, e in enumerate(ends) if e <= start), len(ends))
        if row == len(ends):
            ends.append(end)
        else:
            ends[row] = end
        out[i] = f"{host} row {row}"
    return out


# ------------------------------------------------------------------------------ figures
def _scale(span: float) -> float:
    return (WIDTH - LEFT - 20) / span if span > 0 else 1.0


def _axis(span: float, y: float, sx: float) -> str:
    parts = [f'<line x1="{LEFT}" y1="{y}" x2="{WIDTH - 20}" y2="{y}" stroke="#555"/>']
    for i in range(6):
        t = span * i / 5
        x = LEFT + t * sx
        parts.append(f'<text x="{x:.1f}" y="{y + 14}" text-anchor="middle">{t:.3g}s</text>')
    return "".join(parts)


def timeline(calls: list[Call], span: float) -> str:
    lanes = sorted({c.lane for c in calls})
    index = {lane: i for i, lane in enumerate(lanes)}
    sx = _scale(span)
    height = TOP + LANE * len(lanes) + 30
    parts = [f'<svg class="ekit-timeline" width="{WIDTH}" height="{height}" role="img">']
    for lane, i in index.items():
        y = TOP + i * LANE
        parts.append(f'<text x="{LEFT - 6}" y="{y + LANE - 4}" text-anchor="end">'
                     f'{html.escape(lane)}</text>')
    for c in calls:
        y = TOP + index[c.lane] * LANE
        w = max(1.0, (c.end - c.start) * sx)
        tip = f"{c.function} ({c.key}): {LABELS[c.outcome]}, {c.end - c.start:.3g} s"
        if c.error:
            tip += f"\n{c.error}"
        parts.append(
            f'<rect class="ekit-call ekit-{c.outcome}" data-key="{html.escape(c.key)}" '
            f'x="{LEFT + c.start * sx:.1f}" y="{y + 1}" width="{w:.1f}" height="{LANE - 2}" '
            f'fill="{COLOURS[c.outcome]}"><title>{html.escape(tip)}</title></rect>')
    parts.append(_axis(span, TOP + LANE * len(lanes) + 4, sx))
    parts.append("</svg>")
    return "".join(parts)


def _steps(calls: list[Call], weight: str) -> list[tuple[float, int]]:
    events = sorted([(c.start, getattr(c, weight) if weight else 1) for c in calls]
                    + [(c.end, -(getattr(c, weight) if weight else 1)) for c in calls])
    level, out = 0, [(0.0, 0)]
    for t, delta in events:
        level += delta
        out.append((t, level))
    return out


def concurrency(calls: list[Call], span: float) -> str:
    running, busy = _steps(calls, ""), _steps(calls, "cpus")
    top = max(1, max(v for _, v in busy), max(v for _, v in running))
    sx, height = _scale(span), 200
    sy = (height - 50) / top

    def path(points: list[tuple[float, int]]) -> str:
        d, last = [], 0
        for t, v in points:
            x = LEFT + t * sx
            d.append(f"L{x:.1f},{height - 30 - last * sy:.1f} L{x:.1f},{height - 30 - v * sy:.1f}")
            last = v
        return "M" + d[0][1:] + " " + " ".join(d[1:])

    parts = [f'<svg class="ekit-concurrency" width="{WIDTH}" height="{height}" role="img">',
             f'<path class="ekit-running" d="{path(running)}" fill="none" stroke="#1f77b4" '
             f'stroke-width="2"/>',
             f'<path class="ekit-busy" d="{path(busy)}" fill="none" stroke="#9467bd" '
             f'stroke-width="2" stroke-dasharray="5,3"/>',
             f'<text x="{LEFT - 6}" y="{height - 30 - top * sy + 4:.1f}" '
             f'text-anchor="end">{top}</text>',
             f'<text x="{LEFT - 6}" y="{height - 26}" text-anchor="end">0</text>',
             _axis(span, height - 30, sx), "</svg>"]
    return "".join(parts)


def histogram(calls: list[Call], bins: int = 20) -> str:
    longest = max((c.end - c.start for c in calls), default=0.0) or 1.0
    width = longest / bins
    counts = {k: [0] * bins for k in COLOURS}
    for c in calls:
        counts[c.outcome][min(bins - 1, int((c.end - c.start) / width))] += 1
    top = max(1, max(sum(counts[k][b] for k in counts) for b in range(bins)))
    height, bar = 200, (WIDTH - LEFT - 20) / bins
    sy = (height - 50) / top
    parts = [f'<svg class="ekit-histogram" width="{WIDTH}" height="{height}" role="img">']
    for b in range(bins):
        base = height - 30
        for kind in COLOURS:
            n = counts[kind][b]
            if not n:
                continue
            h = n * sy
            base -= h
            lo, hi = b * width, (b + 1) * width
            parts.append(
                f'<rect class="ekit-bin ekit-{kind}" data-count="{n}" x="{LEFT + b * bar:.1f}" '
                f'y="{base:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" '
                f'fill="{COLOURS[kind]}"><title>{n} {LABELS[kind]}, {lo:.3g}-{hi:.3g} s'
                f'</title></rect>')
    parts.append(f'<text x="{LEFT - 6}" y="{height - 30 - top * sy + 4:.1f}" '
                 f'text-anchor="end">{top}</text>')
    parts.append(_axis(longest, height - 30, (WIDTH - LEFT - 20) / longest))
    parts.append("</svg>")
    return "".join(parts)


def failures(calls: list[Call]) -> str:
    failed = [c for c in calls if c.outcome != "done"]
    if not failed:
        return '<p class="ekit-failures">No failures.</p>'
    rows = "".join(
        f'<tr><td>{html.escape(c.function)}</td><td>{LABELS[c.outcome]}</td>'
        f'<td><details data-key="{html.escape(c.key)}"><summary>{html.escape(c.error)}'
        f'</summary><pre>{html.escape(c.traceback)}</pre><small>{html.escape(c.key)}</small>'
        f'</details></td></tr>' for c in failed)
    return ('<table class="ekit-failures"><tr><th>function</th><th>outcome</th>'
            f'<th>error (click for the traceback)</th></tr>{rows}</table>')


_CSS = """
.ekit-report{font-family:sans-serif;font-size:13px;color:#222}
.ekit-report svg{display:block;margin:4px 0 16px 0}
.ekit-report svg text{font-size:11px;fill:#333}
.ekit-report .ekit-call{cursor:pointer}
.ekit-report table{border-collapse:collapse}
.ekit-report td,.ekit-report th{border:1px solid #ccc;padding:2px 6px;text-align:left;
  vertical-align:top}
.ekit-report pre{white-space:pre-wrap;font-size:11px;max-width:800px}
.ekit-report .ekit-key span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
"""

# Any script error is written into the page itself (and so into a headless browser's DOM
# dump), then clicking a failed bar opens that failure's traceback.
_JS = """
(function(){
  var root = document.currentScript.parentNode;
  function report(msg){var p=root.querySelector('.ekit-errors');
    p.textContent += msg + '\\n'; p.hidden = false;}
  window.addEventListener('error', function(e){report('error: ' + e.message);});
  window.addEventListener('unhandledrejection', function(e){report('rejection: ' + e.reason);});
  root.querySelectorAll('.ekit-call.ekit-failed, .ekit-call.ekit-killed').forEach(
    function(bar){bar.addEventListener('click', function(){
      var d = root.querySelector('details[data-key="' + bar.dataset.key + '"]');
      if (d) {d.open = true; d.scrollIntoView();}});});
  root.dataset.ready = root.querySelectorAll('svg').length;
})();
"""


class CampaignReport:
    """The report of one cache directory; shows itself inline in Jupyter."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        self.calls = load_calls(self.directory)

    def counts(self) -> dict[str, int]:
        return {k: sum(c.outcome == k for c in self.calls) for k in COLOURS}

    def fragment(self) -> str:
        """The report as an HTML fragment (what Jupyter shows)."""
        calls = self.calls
        span = max((c.end for c in calls), default=0.0) or 1.0
        counts = self.counts()
        key = "".join(f'<span style="background:{COLOURS[k]}"></span>{LABELS[k]} '
                      f'({counts[k]})' for k in COLOURS)
        title = html.escape(os.path.abspath(self.directory))
        if not calls:
            body = "<p>No calls recorded in this cache directory yet.</p>"
        else:
            body = (f'<p class="ekit-key">{len(calls)} calls over {span:.3g} s: {key}</p>'
                    "<h3>Calls per worker slot</h3>" + timeline(calls, span)
                    + "<h3>Running calls (solid) and busy cores (dashed)</h3>"
                    + concurrency(calls, span)
                    + "<h3>Runtime histogram</h3>" + histogram(calls)
                    + "<h3>Failures</h3>" + failures(calls))
        return (f'<div class="ekit-report"><style>{_CSS}</style>'
                f'<pre class="ekit-errors" hidden></pre>'
                f"<h2>executorkit campaign: {title}</h2>{body}<script>{_JS}</script></div>")

    def html(self) -> str:
        """The whole page: self-contained, nothing loaded from elsewhere."""
        meta = json.dumps({"directory": self.directory, **self.counts()}).replace("</", "<\\/")
        return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                f"<title>executorkit report</title>"
                f'<script type="application/json" id="ekit-summary">{meta}</script>'
                f"</head><body>{self.fragment()}</body></html>\n")

    def _repr_html_(self) -> str:
        return self.fragment()

    def write(self, path: str | os.PathLike[str]) -> str:
        """Write the page to ``path`` (atomically); returns its absolute path."""
        path = os.path.abspath(os.fspath(path))
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.html())
        os.replace(tmp, path)
        return path


def campaign_report(directory: str | os.PathLike[str]) -> CampaignReport:
    """The campaign report of a cache directory: display it in Jupyter, or ``.write(path)``.

    A self-contained HTML page (inline SVG, no network): the calls per worker slot over time
    coloured by outcome, running calls and busy cores over time, a runtime histogram split
    into done / failed / cancelled-killed, and the failures with their tracebacks. The same
    as ``executorkit report DIR -o report.html``.
    """
    return CampaignReport(directory)


def write_report(directory: str | os.PathLike[str], output: str | os.PathLike[str]) -> str:
    return campaign_report(directory).write(output)
