"""A :class:`~executorkit.command.Command` as a Flux job of the program itself.

No Python runs in the job: its tasks are the program's processes (``cores`` tasks, the MPI
ranks, with PMI from the job shell). The driver prepares what a worker would have (the
call's cwd, new output files there, the stdin file), the job shell writes the program's
stdout/stderr straight into those files, and when the job's eventlog says it finished the
driver reads them back into the :class:`~executorkit.command.CommandResult` (or the
:class:`~executorkit.command.CommandError`) a worker would have sent::

    prepare_program()  ->  jobspec: argv, tasks, cwd, env, output.*/input.* files
                           ... the job runs ...
    program_outcome()  <-  "finish" status + start/finish times: a TaskDone
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
from dataclasses import dataclass
from typing import Any

import cloudpickle

from executorkit.command import (
    CommandCall,
    CommandError,
    CommandResult,
    new_output_files,
    program_stem,
    stdin_bytes,
)
from executorkit.transport import TaskDone
from executorkit.worker._call import error_info


@dataclass(frozen=True)
class ProgramRun:
    """What the driver set up for one program job."""

    argv: list[str]
    cwd: str
    files: tuple[str, str]  # stdout, stderr (in cwd; they are the result's files)
    outputs: tuple[str, ...]  # declared output files, absolute
    stdin: str | None  # a private file holding the input, removed when the job ends


def prepare_program(call: CommandCall, cwd: str, private_dir: str) -> ProgramRun:
    """Create the call's cwd, its new output files and its stdin file."""
    os.makedirs(cwd, exist_ok=True)
    cmd = call.command
    # named after the driver's pid: unique among this driver's calls, never overwriting
    files = new_output_files(os.path.join(cwd, f"{program_stem(cmd)}.{os.getpid()}"))
    data = stdin_bytes(cmd)
    stdin = None
    if data is not None:
        fd, stdin = tempfile.mkstemp(prefix="stdin-", dir=private_dir)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return ProgramRun(cmd.resolved_argv(), cwd, files,
                      tuple(os.path.join(cwd, p) for p in cmd.outputs), stdin)


def io_options(run: ProgramRun) -> dict[str, Any]:
    """Job-shell options: stdout/stderr into the run's files, stdin from its file (or
    /dev/null, as a worker gives a program: Flux would otherwise wait for input)."""
    return {"output.stdout.type": "file", "output.stdout.path": run.files[0],
            "output.stderr.type": "file", "output.stderr.path": run.files[1],
            "input.stdin.type": "file", "input.stdin.path": run.stdin or os.devnull,
            # the shell batches its input eventlog for 0.5 s by default and waits that
            # long at exit: half a second on every program (measured, flux-core 0.88)
            "input.batch-timeout": INPUT_BATCH}


INPUT_BATCH = 0.01  # seconds


def program_outcome(run: ProgramRun, task_id: int, returncode: int, started: float,
                    finished: float) -> TaskDone:
    """The call's outcome from the finished job: its result, or its CommandError."""
    result = CommandResult(
        args=list(run.argv), returncode=returncode, stdout=read_output(run.files[0]),
        stderr=read_output(run.files[1]), cwd=run.cwd, runtime=max(0.0, finished - started),
        stdout_file=run.files[0], stderr_file=run.files[1], outputs=run.outputs)
    if returncode == 0:
        return TaskDone(task_id, True, cloudpickle.dumps(result), started, finished)
    info = error_info(CommandError(result))
    return TaskDone(task_id, False, pickle.dumps(info, protocol=5), started, finished)


def start_failure(run: ProgramRun, task_id: int, note: str, when: float) -> TaskDone:
    """The job shell could not start the program (Flux's "exec" exception): the same
    ``OSError`` a worker's spawn raises (FileNotFoundError for a missing program)."""
    reason = note.rsplit(": ", 1)[-1].strip()
    code = _ERRNO_OF.get(reason)
    exc = OSError(code, reason, run.argv[0]) if code else OSError(
        f"the program {run.argv[0]!r} could not be started: {note}")
    return TaskDone(task_id, False, pickle.dumps(error_info(exc), protocol=5), when, when)


# the texts of the errno values exec fails with, as the job shell quotes them (strerror)
_ERRNO_OF = {os.strerror(e): e for e in (errno.ENOENT, errno.EACCES, errno.ENOEXEC,
                                         errno.ENOTDIR, errno.ELOOP, errno.E2BIG)}


def read_output(path: str) -> str:
    """The text of a job's output file (empty when there is none)."""
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""
