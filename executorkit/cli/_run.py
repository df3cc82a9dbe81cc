"""``executorkit run SPEC``: run the ensembles of a spec file and write their results."""

from __future__ import annotations

import csv
import importlib
import json
import os
import sys
from concurrent.futures import Future, wait
from typing import Any, TextIO

from executorkit.cli._spec import Ensemble, SpecError, load_spec
from executorkit.command import CommandError, CommandResult
from executorkit.ensemble import render_command
from executorkit.errors import ResourceError

EXECUTORS = {
    "single": ("executorkit.executors.single", "SingleNodeExecutor"),
    "slurm-job": ("executorkit.executors.slurm", "SlurmJobExecutor"),
    "slurm-cluster": ("executorkit.executors.slurm_cluster", "SlurmClusterExecutor"),
    "flux-job": ("executorkit.executors.flux", "FluxJobExecutor"),
    "flux-cluster": ("executorkit.executors.flux", "FluxClusterExecutor"),
}


def default_cache(spec: str) -> str:
    """``<spec stem>.cache`` beside the spec file."""
    stem = os.path.splitext(os.path.abspath(spec))[0]
    return f"{stem}.cache"


def results_base(cache_directory: str) -> str:
    """Results go next to the cache: ``<cache>.results.csv`` / ``.json``."""
    return os.path.abspath(cache_directory).rstrip(os.sep) + ".results"


def calls_of(ensemble: Ensemble) -> list[tuple[Any, dict[str, Any]]]:
    """(what to submit, the call's values) per call: a Command, or the function."""
    target = ensemble.target()
    out = []
    for index, values in enumerate(ensemble.calls):
        if ensemble.command is not None:
            out.append((render_command(target, {**values, "index": index}), values))
        else:
            out.append((target, values))
    return out


def dry_run(ensembles: list[Ensemble], out: TextIO) -> int:
    total = 0
    for ens in ensembles:
        for index, (what, values) in enumerate(calls_of(ens)):
            shown = str(what) if ens.command is not None else (
                f"{ens.function}(" + ", ".join(f"{k}={v!r}" for k, v in values.items()) + ")")
            print(f"{ens.name}[{index}]: {shown}  {_resources_text(ens.resource_dict)}",
                  file=out)
            total += 1
    print(f"{total} call(s) in {len(ensembles)} ensemble(s); nothing was run (--dry-run)",
          file=out)
    return 0


def _resources_text(res: dict[str, Any]) -> str:
    shown = {k: (v.__name__ if isinstance(v, type) else v) for k, v in res.items()
             if k != "cwd"}
    return json.dumps(shown, default=lambda v: [c.__name__ for c in v]) if shown else ""


def make_executor(name: str, *, cache_directory: str, max_workers: int | None,
                  progress: bool) -> Any:
    module, cls = EXECUTORS[name]
    executor_class = getattr(importlib.import_module(module), cls)
    kwargs: dict[str, Any] = {"cache_directory": cache_directory, "max_workers": max_workers}
    if progress and name not in ("slurm-cluster",):
        kwargs["progress"] = True
    return executor_class(**kwargs)


def run(spec: str, *, executor: str = "single", cache_directory: str | None = None,
        max_workers: int | None = None, dry: bool = False, progress: bool = True,
        out: TextIO | None = None) -> int:
    """Run (or with ``dry`` print) every call; 0 when all succeeded, 1 when any failed."""
    out = out or sys.stdout
    ensembles = load_spec(spec)
    for ens in ensembles:
        if ens.function is not None:
            try:
                ens.target()
            except (ImportError, AttributeError) as exc:
                raise SpecError(spec, f"cannot import {ens.function!r}: {exc}",
                                ensemble=ens.name, key="function") from None
    if dry:
        return dry_run(ensembles, out)
    cache = cache_directory or default_cache(spec)
    rows: list[dict[str, Any]] = []
    with make_executor(executor, cache_directory=cache, max_workers=max_workers,
                       progress=progress) as exe:
        submitted: list[tuple[Ensemble, int, dict[str, Any], Future]] = []
        for ens in ensembles:
            for index, (what, values) in enumerate(calls_of(ens)):
                try:
                    fut = exe.submit(what, resource_dict=ens.resource_dict,
                                     **({} if ens.command is not None else values))
                except ResourceError as exc:
                    raise SpecError(spec, str(exc), ensemble=ens.name, key=exc.key) from None
                submitted.append((ens, index, values, fut))
        wait([s[3] for s in submitted])
        rows = [_row(ens, index, values, fut) for ens, index, values, fut in submitted]
    base = results_base(cache)
    _write_results(base, rows)
    return _summary(rows, base, out)


def _row(ens: Ensemble, index: int, values: dict[str, Any], fut: Future) -> dict[str, Any]:
    row: dict[str, Any] = {"ensemble": ens.name, "index": index, **values}
    exc = fut.exception() if not fut.cancelled() else None
    if fut.cancelled():
        row.update(status="cancelled", output="", error="cancelled")
    elif exc is not None:
        row.update(status="failed", output="", error=f"{type(exc).__name__}: {_first(exc)}")
        if isinstance(exc, CommandError):
            row["returncode"] = exc.returncode
    else:
        result = fut.result()
        row.update(status="done", error="")
        if isinstance(result, CommandResult):
            row.update(output=result.stdout.strip(), returncode=result.returncode,
                       runtime=round(result.runtime, 6))
        else:
            row["output"] = result if _jsonable(result) else repr(result)
    return row


def _first(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _write_results(base: str, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(base + ".json", "w") as fh:
        json.dump(rows, fh, indent=1, default=repr)
    with open(base + ".csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _summary(rows: list[dict[str, Any]], base: str, out: TextIO) -> int:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"{len(rows)} call(s): {parts}. Results: {base}.csv, {base}.json", file=out)
    failed = [r for r in rows if r["status"] != "done"]
    for row in failed[:20]:
        print(f"  {row['ensemble']}[{row['index']}] {row['status']}: {row['error']}", file=out)
    if len(failed) > 20:
        print(f"  ... and {len(failed) - 20} more", file=out)
    return 1 if failed else 0
