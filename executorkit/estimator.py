"""How long a function's calls take, and whether calls may wait inside a worker's queue.

A pure policy (events in, decisions out; no clocks, threads or processes), used by block
allocation to decide when several calls may be queued inside one persistent worker.

Policy
------
* What is measured is the call's own duration: the worker times ``fn(*args, **kwargs)``
  only, never the unpickling that imports the function's module. A first call that pays
  for ``import scipy`` therefore does not make a 20 us function look long.
* A function is *tiny* once its last ``proof`` calls each took less than ``tiny`` seconds.
  One long call (or a report that a call is still running past ``tiny``) makes it not tiny
  at once; ``proof`` short calls in a row make it tiny again. So a function whose runtime
  changes is re-learned within ``proof`` calls in either direction.
* Estimates are kept per function. ``time.sleep(0)`` and ``time.sleep(0.1)`` share one,
  which is why a wrong guess must stay cheap: the worker gives back the calls queued behind
  a call that overran (see ``executorkit.worker.loop``), and the overrun is learned here.
* Only functions that can be keys of a dict are learned (others are never tiny); the table
  keeps the ``size`` most recently seen functions.
* How many calls may wait in one worker (:meth:`RuntimeEstimator.depth`): enough for about
  ``QUEUE_TIME`` of work at the recent pace of tiny calls (each counted at least
  ``CALL_FLOOR``, the worker's own cost of a call), between 2 and ``depth``. A worker whose
  queue holds only a millisecond of work runs dry whenever the driver's engine thread waits
  for the GIL (a busy submitting thread holds it for up to 5 ms at a time); a deeper queue
  of calls near ``tiny`` would leave one worker with a long tail at the end of a round.

Every operation is O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["CALL_FLOOR", "DEPTH", "QUEUE_TIME", "TINY", "RuntimeEstimator"]

TINY = 0.002  # seconds: calls shorter than this may wait in a worker's own queue
DEPTH = 128  # most calls sent to one worker while every active call is tiny
QUEUE_TIME = 0.02  # seconds of tiny calls a worker's queue may hold
CALL_FLOOR = 100e-6  # seconds a tiny call costs its worker at least (reply, unpickling)


@dataclass(slots=True)
class _Record:
    mean: float  # exponentially weighted mean of the call's own duration (informational)
    streak: int  # consecutive calls shorter than ``tiny``


class RuntimeEstimator:
    """Per-function runtime estimates and the prefetch decision."""

    def __init__(self, *, tiny: float = TINY, proof: int = 2, size: int = 256,
                 depth: int = DEPTH) -> None:
        if tiny <= 0 or proof < 1 or size < 1 or depth < 1:
            raise ValueError("tiny > 0, proof >= 1, size >= 1 and depth >= 1 are required")
        self.tiny = tiny
        self.proof = proof
        self.size = size
        self.max_depth = depth
        self._records: OrderedDict[Hashable, _Record] = OrderedDict()
        self._pace = CALL_FLOOR  # smoothed duration of recent tiny calls, over all functions

    def observe(self, key: object, seconds: float) -> None:
        """A call of ``key`` took ``seconds`` (or has been running that long)."""
        try:
            record = self._records.get(key)  # type: ignore[call-overload]
        except TypeError:  # an unhashable callable: never tiny
            return
        short = 0 <= seconds < self.tiny
        if short:
            self._pace += 0.1 * (max(seconds, CALL_FLOOR) - self._pace)
        if record is None:
            record = self._records[key] = _Record(seconds, 0)  # type: ignore[index]
            if len(self._records) > self.size:
                self._records.popitem(last=False)
        else:
            record.mean += 0.25 * (seconds - record.mean)
            self._records.move_to_end(key)  # type: ignore[arg-type]
        record.streak = record.streak + 1 if short else 0

    def is_tiny(self, key: object) -> bool:
        """True if calls of ``key`` may wait behind other calls inside a worker."""
        try:
            record = self._records.get(key)  # type: ignore[call-overload]
        except TypeError:
            return False
        return record is not None and record.streak >= self.proof

    def mean(self, key: object) -> float | None:
        """The smoothed duration of ``key``'s calls, if any was seen."""
        try:
            record = self._records.get(key)  # type: ignore[call-overload]
        except TypeError:
            return None
        return None if record is None else record.mean

    def depth(self, slow_active: int) -> int:
        """Calls per worker: several while every queued or running call is tiny (about
        ``QUEUE_TIME`` of them), else one (so a long call is never waited for by calls that
        another worker could run)."""
        if slow_active or self.max_depth == 1:
            return 1
        return max(2, min(self.max_depth, int(QUEUE_TIME / self._pace)))
