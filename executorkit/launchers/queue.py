"""Submit calls as batch jobs (``sbatch``) and watch them, file based.

Pure functions build the ``sbatch`` command line and the job script (tested as strings);
:class:`SlurmQueue` runs the Slurm commands. Jobs are named by the call's cache key, so a
restarted driver finds its queued or running jobs again with one ``squeue``.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from executorkit.errors import ExecutorkitError, ResourceError
from executorkit.resources import Resources

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class SchedulerCommandError(ExecutorkitError):
    """A Slurm command (sbatch, squeue, scancel) failed; the message has its output."""


def sbatch_command(res: Resources, *, job_name: str, script: str, output: str,
                   after_ok: Iterable[str] = ()) -> list[str]:
    """``sbatch`` with the call's resources, its dependencies and its log file."""
    cmd = ["sbatch", "--parsable", f"--job-name={job_name}", f"--output={output}",
           f"--ntasks={res.cores}", f"--cpus-per-task={res.threads_per_core}"]
    deps = list(after_ok)
    if deps:
        cmd.append("--dependency=afterok:" + ":".join(deps))
    if res.gpus_per_core:
        cmd.append(f"--gpus-per-task={res.gpus_per_core}")
    if res.num_nodes is not None:
        cmd.append(f"--nodes={res.num_nodes}")
    if res.exclusive:
        cmd.append("--exclusive")
    if res.run_time_max is not None:
        cmd.append(f"--time={max(1, math.ceil(res.run_time_max / 60))}")
    if res.cwd:
        cmd.append(f"--chdir={res.cwd}")
    return [*cmd, *res.slurm_cmd_args, script]


def job_script(res: Resources, *, input_file: str, python: str = sys.executable,
               env: Sequence[tuple[str, str]] = (), pmi_mode: str | None = None,
               job_name: str = "executorkit") -> str:
    """The batch script: thread variables, then the call (under srun for MPI ranks).

    With ``res.submission_template`` (a user's own script, executorlib/pysqa style), the
    template is filled in instead: ``{{command}}`` becomes these lines, and ``job_name``,
    ``working_directory``, ``cores``, ``threads``, ``run_time_max`` (minutes),
    ``dependency_list`` and ``memory_max`` are available too. Our sbatch options
    (name, output, dependencies) are given on the command line, which takes precedence.
    """
    lines = [f"export {shlex.quote(k)}={shlex.quote(v)}" for k, v in env]
    run = f"{shlex.quote(python)} -m executorkit.worker.file_task {shlex.quote(input_file)}"
    if res.cores > 1:
        mpi = f" --mpi={shlex.quote(pmi_mode)}" if pmi_mode else ""
        run = f"srun --ntasks={res.cores} --cpus-per-task={res.threads_per_core}{mpi} {run}"
    lines.append(f"exec {run}")
    if res.submission_template is None:
        return "\n".join(["#!/bin/bash", "set -e", *lines]) + "\n"
    minutes = None if res.run_time_max is None else max(1, math.ceil(res.run_time_max / 60))
    return render_template(res.submission_template, command="\n".join(lines),
                           job_name=job_name, working_directory=res.cwd or os.getcwd(),
                           cores=res.cores, threads=res.threads_per_core,
                           run_time_max=minutes, dependency_list=None, memory_max=None)


_PLACEHOLDER = re.compile(r"{{\s*([A-Za-z_][A-Za-z0-9_]*)\s*}}")


def render_template(template: str, **values: Any) -> str:
    """Fill a Jinja2 template (``{{name}}``); plain substitution when jinja2 is missing,
    which then refuses ``{% ... %}`` logic with a clear error."""
    try:
        import jinja2
    except ImportError:
        if "{%" in template:
            raise ResourceError(
                "resource_dict['submission_template'] uses {% ... %} logic, which needs "
                "jinja2 (pip install jinja2)", key="submission_template",
                allowed="a template with {{name}} placeholders only") from None
        return _PLACEHOLDER.sub(lambda m: "" if values.get(m[1]) is None
                                else str(values[m[1]]), template).rstrip("\n") + "\n"
    rendered = jinja2.Template(template, undefined=jinja2.ChainableUndefined).render(**values)
    return rendered.rstrip("\n") + "\n"


@dataclass(frozen=True)
class JobSeen:
    """What squeue says of a job: its state; a running job's start (epoch seconds) and
    nodes (Slurm's node list, e.g. ``node[1-2]``)."""

    state: str
    started: float | None = None
    nodes: str | None = None


def parse_squeue(out: str) -> dict[str, JobSeen]:
    """Lines of ``squeue -o "%i|%T|%S|%N|%r"`` by job id (the start and nodes of running
    jobs only: a pending job's %S is an estimate)."""
    jobs = {}
    for line in out.splitlines():
        parts = line.split("|", 4)
        if len(parts) < 5:
            continue
        job_id, state, start, nodes, reason = (p.strip() for p in parts)
        if state == "PENDING" and reason == "DependencyNeverSatisfied":
            state = "DEPENDENCY_NEVER_SATISFIED"
        if state != "RUNNING":
            jobs[job_id] = JobSeen(state)
            continue
        jobs[job_id] = JobSeen(state, _epoch(start), nodes or None)
    return jobs


def _epoch(text: str) -> float | None:
    """squeue's local time (``2026-12-01T20:16:33``) as epoch seconds; None if not a time."""
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


class SlurmQueue:
    """Thin wrapper around sbatch / squeue / scontrol / scancel."""

    def submit(self, cmd: list[str]) -> str:
        out = self._run(cmd)
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise SchedulerCommandError(f"sbatch printed no job id: {out!r}")
        return job_id

    def cancel(self, job_ids: Iterable[str]) -> None:
        ids = list(job_ids)
        if ids:
            self._run(["scancel", *ids], check=False)

    def states(self, job_ids: Iterable[str]) -> dict[str, str]:
        """State of each job: squeue for live ones, scontrol for recently ended ones;
        "GONE" when Slurm says it no longer knows the job, "UNKNOWN" when Slurm could not
        be asked (a failing command raises: the caller asks again later)."""
        return {job: seen.state for job, seen in self.jobs(job_ids).items()}

    def jobs(self, job_ids: Iterable[str]) -> dict[str, JobSeen]:
        """As :meth:`states`, with the start time and nodes of running jobs (same squeue)."""
        ids = list(job_ids)
        if not ids:
            return {}
        # squeue exits non-zero when *all* ids are unknown; only a real failure raises.
        out = self._squeue(["-h", "-o", "%i|%T|%S|%N|%r", "-j", ",".join(ids)])
        jobs = parse_squeue(out)
        for job in ids:
            if job not in jobs:
                jobs[job] = JobSeen(self._ended_state(job))
        return jobs

    def _ended_state(self, job_id: str) -> str:
        try:
            proc = subprocess.run(["scontrol", "-o", "show", "job", job_id],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return "UNKNOWN"
        for field in proc.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        if "Invalid job id" in proc.stderr:
            return "GONE"
        return "UNKNOWN"

    def _squeue(self, args: list[str]) -> str:
        try:
            proc = subprocess.run(["squeue", *args], capture_output=True, text=True,
                                  timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SchedulerCommandError(f"squeue could not run: {exc}") from exc
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            raise SchedulerCommandError(f"squeue failed: {proc.stderr.strip()}")
        return proc.stdout

    def jobs_by_name(self) -> dict[str, tuple[str, str, str, str]]:
        """Name -> (job id, state, reason, batch script) of this user's queued and running
        jobs (the caller matches the script path, not only the name)."""
        out = self._squeue(["-h", "-u", str(os.getuid()), "-o", "%j|%i|%T|%r|%o"])
        jobs = {}
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) == 5:
                jobs[parts[0]] = (parts[1], parts[2], parts[3], parts[4])
        return jobs

    @staticmethod
    def _run(cmd: list[str], check: bool = True) -> str:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SchedulerCommandError(f"{cmd[0]} could not run: {exc}") from exc
        if check and proc.returncode != 0:
            raise SchedulerCommandError(
                f"{' '.join(cmd[:2])}... failed (exit {proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout
