"""Retries that escalate: whether a failed attempt runs again, and with what resources.

Pure decision logic, like :mod:`executorkit.scheduler`: no processes, no clock. The engine
asks :func:`next_attempt` when a running call ends in an exception and either re-queues
the call with the returned resources or fails its future with :func:`exhausted_error`.

Policy, from the call's resource_dict:

* ``max_retries`` (default 0): how many times a call may run again after its first attempt.
* An attempt is retried when its process died (:class:`~executorkit.errors.WorkerDiedError`:
  out of memory, a signal), it ran past ``run_time_max``
  (:class:`~executorkit.errors.TaskTimeoutError`), a program it ran was killed by a signal
  (a :class:`~executorkit.command.CommandError` with a negative return code), or it raised
  an instance of one of the ``retry_on`` exception classes. Anything else fails at once.
* ``retry_escalation`` maps resource keys to factors; attempt ``n`` (``n = 1`` for the
  first retry) runs with each key multiplied by ``factor ** n`` (counts rounded up). A
  count that would exceed what the executor can grant is capped at its limit.

Cost: O(number of escalated keys) per failed attempt.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

from executorkit.errors import TaskTimeoutError, WorkerDiedError
from executorkit.resources import ESCALATABLE, Capabilities, Resources

__all__ = ["ESCALATABLE", "escalate", "exhausted_error", "is_retryable", "next_attempt"]




@dataclass(frozen=True)
class Attempt:
    """The decision for one failed attempt: run again with ``res``, or give up (None)."""

    res: Resources | None
    reason: str


def is_retryable(exc: BaseException, retry_on: tuple[type[BaseException], ...]) -> bool:
    if isinstance(exc, (WorkerDiedError, TaskTimeoutError)):
        return True
    from executorkit.command import CommandError  # a sibling module, no cycle

    if isinstance(exc, CommandError) and exc.returncode < 0:
        return True
    return bool(retry_on) and isinstance(exc, retry_on)


def escalate(first: Resources, attempt: int, caps: Capabilities | None = None) -> Resources:
    """The resources of retry ``attempt`` (1, 2, ...) of a call first run with ``first``."""
    changes: dict[str, int | float] = {}
    for key, factor in first.retry_escalation:
        value = getattr(first, key)
        if key == "run_time_max":
            if value is not None:
                changes[key] = value * factor ** attempt
        else:
            changes[key] = max(value, math.ceil(value * factor ** attempt))
    res = replace(first, **changes, given=first.given | frozenset(changes))
    return _cap(res, caps) if caps is not None else res


def _cap(res: Resources, caps: Capabilities) -> Resources:
    """Shrink escalated counts to what the executor can grant (cores first, then threads)."""
    limit = caps.per_task_cpus if caps.per_task_cpus is not None else caps.max_cpus
    cores, threads = res.cores, res.threads_per_core
    while cores * threads > limit and threads > 1:
        threads -= 1
    while cores * threads > limit and cores > 1:
        cores -= 1
    glimit = caps.per_task_gpus if caps.per_task_gpus is not None else caps.max_gpus
    gpus = res.gpus_per_core
    while cores * gpus > glimit and gpus > 0:
        gpus -= 1
    return replace(res, cores=cores, threads_per_core=threads, gpus_per_core=gpus)


def next_attempt(first: Resources, failures: list[BaseException],
                 caps: Capabilities | None = None) -> Attempt:
    """After ``len(failures)`` failed attempts of a call first run with ``first``: again?"""
    exc = failures[-1]
    if not is_retryable(exc, first.retry_on):
        return Attempt(None, f"{type(exc).__name__} is not retried")
    if len(failures) > first.max_retries:
        return Attempt(None, f"max_retries={first.max_retries} reached")
    res = escalate(first, len(failures), caps)
    return Attempt(res, f"attempt {len(failures) + 1} after {type(exc).__name__}")


def exhausted_error(failures: list[BaseException]) -> BaseException:
    """The future's exception once retries are used up: the last attempt's exception (its
    type kept, so ``except TaskTimeoutError`` still works), carrying ``attempts`` (every
    attempt's exception) and a note listing each attempt's reason."""
    last = failures[-1]
    if len(failures) == 1:
        return last
    lines = [f"attempt {i}: {type(e).__name__}: {_first_line(e)}"
             for i, e in enumerate(failures, 1)]
    with contextlib.suppress(AttributeError, TypeError):
        last.attempts = list(failures)  # type: ignore[attr-defined]
    note = f"failed all {len(failures)} attempts:\n" + "\n".join(lines)
    if hasattr(last, "add_note"):
        last.add_note(note)
    else:  # Python 3.10: no notes; the attempts stay reachable through the attribute
        with contextlib.suppress(AttributeError, TypeError):
            last.__notes__ = [note]  # type: ignore[attr-defined]
    return last


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""
