"""``executorkit status DIR``: a campaign's live status, or a summary of its cache.

With a live executor (a ``status.json`` in DIR that is not closed and whose process is
alive), print its counts, busy fraction and one line per call that is not finished plus the
most recent failures. Otherwise summarise the cache entries of DIR: done, failed (with the
first line of the error) and runtimes, and the calls a batch executor left queued or running
when it shut down without waiting. ``--watch`` repeats every few seconds.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from typing import Any

from executorkit.errors import ExecutorkitError

STATUS_NAME = "status.json"
_SHOWN = 20  # calls listed per section
_ATTEMPT = re.compile(r"\.attempt-\d+$")  # <key>.attempt-<n>: see cache._hook._Attempts


def read_status(directory: str) -> dict[str, Any] | None:
    """The parsed status.json of ``directory`` (or the file itself), None if there is none."""
    path = directory if os.path.isfile(directory) else os.path.join(directory, STATUS_NAME)
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ExecutorkitError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) and data.get("format") == 1 else None


def is_live(status: dict[str, Any]) -> bool:
    """Not closed, and (on this host) its process still runs."""
    if status.get("closed"):
        return False
    if status.get("host") != socket.gethostname():
        return True  # another node: trust the file
    try:
        os.kill(int(status.get("pid", 0)), 0)
    except (ProcessLookupError, ValueError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def live_table(status: dict[str, Any]) -> str:
    counts = status.get("counts", {})
    pool = status.get("pool", {})
    age = time.time() - float(status.get("updated", time.time()))
    what = "calls ask for" if pool.get("asked") else "pool"  # batch executors: see _status
    lines = [
        f"{status.get('executor')} on {status.get('host')} (pid {status.get('pid')}), "
        f"{what} {pool.get('cpus')} CPUs / {pool.get('gpus')} GPUs, updated {age:.0f} s ago",
        "  ".join(f"{k} {counts.get(k, 0)}" for k in
                  ("submitted", "waiting", "running", "done", "failed", "cancelled")),
        f"busy now {100 * status.get('busy_now', 0):.0f}%, "
        f"busy since the first start {100 * status.get('busy_fraction', 0):.0f}%",
    ]
    calls = status.get("calls", [])
    active = [c for c in calls if c.get("state") in ("running", "queued", "waiting")]
    failed = [c for c in calls if c.get("state") == "failed"][-_SHOWN:]
    lines += _active_rows(active)
    if failed:
        lines += ["", "recent failures:"]
        lines += [f"  {c['id']} {c.get('function', '')}: {c.get('error', '')}" for c in failed]
    return "\n".join(lines)


def _active_rows(active: list[dict[str, Any]]) -> list[str]:
    """The table of unfinished calls (with the batch job's id where there is one)."""
    now = time.time()
    jobs = any(c.get("job_id") for c in active)
    rows = [(str(c["id"]), c["state"], c.get("function", ""), c.get("host") or "-",
             _elapsed(c, now), _res(c.get("resources", {})), str(c.get("attempt", "")),
             *([str(c.get("job_id") or "-")] if jobs else []))
            for c in active[:_SHOWN]]
    if not rows:
        return []
    header = ("id", "state", "function", "host", "for", "resources", "attempt",
              *(["job"] if jobs else []))
    more = [f"... and {len(active) - _SHOWN} more"] if len(active) > _SHOWN else []
    return ["", *_table(header, rows), *more]


def left_running(status: dict[str, Any]) -> str | None:
    """A closed status whose calls were still queued or running (a batch executor shut down
    with ``wait=False``: its jobs live on): those calls as last known, else None."""
    active = [c for c in status.get("calls", []) if c.get("state") in ("running", "queued")]
    if not status.get("closed") or not active:
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.get("updated", 0)))
    return "\n".join([f"{status.get('executor')} (pid {status.get('pid')}) shut down at {when} "
                      f"leaving {len(active)} call(s) queued or running; their jobs live on "
                      f"(states as last known):", *_active_rows(active)])


def cache_summary(directory: str) -> str:
    """Done and failed entries of the cache, runtimes, and each failure's first line."""
    from executorkit._report import exception_line
    from executorkit.cache._catalogue import list_rows

    done: list[float] = []
    failures: list[tuple[str, str, str]] = []
    retried = 0
    listing = list_rows(directory, load_outputs=False, load_inputs=False)
    unreadable = len(listing.unreadable)
    for rec in sorted(listing.rows, key=lambda row: row.path):
        if _ATTEMPT.search(rec.key):
            retried += 1  # an earlier attempt of a call that ran again: not a call
        elif rec.status == "done":
            done.append(rec.finished - rec.started)
        else:
            failures.append((rec.key, rec.function_name, exception_line(rec.error_text)))
    total = len(done) + len(failures)
    if total == 0 and not unreadable and not retried:
        return f"no live executor and no cache entries in {directory}"
    lines = [f"no live executor; cache {directory}: {total} calls, {len(done)} done, "
             f"{len(failures)} failed" + (f", {unreadable} unreadable" if unreadable else "")
             + (f"; {retried} earlier failed attempt(s) of retried calls" if retried else "")]
    if done:
        ordered = sorted(done)
        lines.append(f"runtime of done calls: min {ordered[0]:.3g} s, median "
                     f"{ordered[len(ordered) // 2]:.3g} s, max {ordered[-1]:.3g} s, "
                     f"total {sum(ordered):.3g} s")
    if failures:
        lines += ["", *_table(("key", "function", "error"), failures[:_SHOWN])]
        if len(failures) > _SHOWN:
            lines.append(f"... and {len(failures) - _SHOWN} more")
    return "\n".join(lines)


def render(directory: str) -> str:
    if not os.path.exists(directory):
        raise ExecutorkitError(f"{directory} does not exist (give a cache directory, or the "
                               f"directory of a status.json)")
    status = read_status(directory)
    if status is not None and is_live(status):
        return live_table(status)
    if os.path.isfile(directory):
        directory = os.path.dirname(directory) or "."
    left = left_running(status) if status is not None else None
    return cache_summary(directory) + (f"\n\n{left}" if left else "")


def status(directory: str, *, watch: float | None = None) -> int:
    if watch is not None and watch <= 0:
        raise ExecutorkitError(f"--watch must be a positive number of seconds, got {watch}")
    while True:
        text = render(directory)
        if watch is None:
            print(text)
            return 0
        print("\033[H\033[J" + text, flush=True)  # clear the terminal, then redraw
        time.sleep(watch)  # the user asked for a refresh at this rate


def _elapsed(call: dict[str, Any], now: float) -> str:
    started = call.get("started")
    return f"{now - started:.0f}s" if isinstance(started, (int, float)) else "-"


def _res(res: dict[str, Any]) -> str:
    parts = [f"cores={res.get('cores', 1)}"]
    if res.get("threads_per_core", 1) != 1:
        parts.append(f"threads={res['threads_per_core']}")
    if res.get("gpus_per_core"):
        parts.append(f"gpus={res['gpus_per_core']}")
    return ",".join(parts)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*map(str, row)).rstrip() for row in (header, *rows)]
