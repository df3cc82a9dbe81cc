"""The pool and the admission policy, as a plain state machine.

Events go in (:meth:`Scheduler.submit`, :meth:`Scheduler.finish`, :meth:`Scheduler.withdraw`,
:meth:`Scheduler.resize`), decisions come out (a list of :class:`Start`). There are no
threads, clocks or processes here, so the policy is tested by feeding events and reading decisions.

Policy
------
* Waiting tasks are ordered by priority (higher first), then by submission.
* The pool is a set of CPU slots and GPU ids. A task needs ``cpus`` slots and ``gpus`` ids
  (``exclusive`` tasks need the whole pool).
* Whenever resources free, the best waiting task that fits starts at once (backfill).
* Starvation guard: if the best task does not fit and smaller tasks have overtaken it
  ``starvation_limit`` times, nothing else starts until it does. The pool then drains
  towards it, so a large task is never blocked forever by a stream of small ones.
* Resizing: slots added to the pool are free at once; a removed slot leaves at once if free,
  otherwise when the task holding it finishes (a running task is never disturbed). A resize
  that would leave a waiting task larger than the pool is refused, as its submit would be.

Waiting tasks are kept in one heap per *shape* (cpus, gpus). Campaigns have few shapes, so
finding the best task that fits costs O(shapes * log n), not a scan of every waiting task.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import operator
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

__all__ = ["Demand", "Scheduler", "Start"]


@dataclass(frozen=True, slots=True)
class Demand:
    cpus: int = 1
    gpus: int = 0
    exclusive: bool = False


@dataclass(frozen=True, slots=True)
class Start:
    """Decision: start ``task`` on these CPU slots and GPU ids."""

    task: Hashable
    cpus: tuple[int, ...]
    gpus: tuple[int, ...]


class Scheduler:
    """Admission control for one pool; not thread-safe (the engine holds a lock around it)."""

    def __init__(
        self,
        cpus: Iterable[int],
        gpus: Iterable[int] = (),
        *,
        max_running: int | None = None,
        starvation_limit: int | None = None,
    ) -> None:
        self._all_cpus = tuple(cpus)
        self._all_gpus = tuple(gpus)
        if not self._all_cpus:
            raise ValueError("a pool needs at least one CPU slot")
        self._free_cpus = sorted(self._all_cpus, reverse=True)  # pop() takes the lowest id
        self._free_gpus = sorted(self._all_gpus, reverse=True)
        # granted slots that a resize removed: they leave when their task finishes
        self._leaving_cpus: set[int] = set()
        self._leaving_gpus: set[int] = set()
        self.max_running = max_running
        self._fixed_starvation_limit = starvation_limit
        self._starvation_limit = (
            starvation_limit if starvation_limit is not None else 2 * len(self._all_cpus)
        )
        self._seq = itertools.count()
        # shape -> heap of (-priority, seq, task); entries of withdrawn tasks stay until popped
        self._queues: dict[tuple[int, int], list[tuple[int, int, Hashable]]] = {}
        # task -> (shape, seq of its live heap entry); older entries of a task that was
        # withdrawn and submitted again are recognised as stale by their seq.
        self._waiting: dict[Hashable, tuple[tuple[int, int], int]] = {}
        self._running: dict[Hashable, Start] = {}
        self._overtaken = 0  # times the current best waiting task was passed over
        self._best_seen: Hashable = None

    # ------------------------------------------------------------------ events
    def submit(self, task: Hashable, demand: Demand, priority: int = 0) -> list[Start]:
        if task in self._waiting or task in self._running:
            raise ValueError(f"task {task!r} is already known to the scheduler")
        shape = self._shape(demand)
        if shape[0] > len(self._all_cpus) or shape[1] > len(self._all_gpus):
            raise ValueError(f"demand {demand} exceeds the pool")
        seq = next(self._seq)
        heapq.heappush(self._queues.setdefault(shape, []), (-priority, seq, task))
        self._waiting[task] = (shape, seq)
        return self._admit()

    def finish(self, task: Hashable) -> list[Start]:
        """A running task ended: free its resources and start what now fits."""
        start = self._running.pop(task)
        back = _returned(start.cpus, self._leaving_cpus)
        if len(back) == 1:  # (block allocation: thousands of slots, one back per call)
            bisect.insort(self._free_cpus, back[0], key=operator.neg)
        else:
            self._free_cpus.extend(back)
            self._free_cpus.sort(reverse=True)
        if start.gpus:
            self._free_gpus.extend(_returned(start.gpus, self._leaving_gpus))
            self._free_gpus.sort(reverse=True)
        return self._admit()

    def resize(self, cpus: Iterable[int], gpus: Iterable[int] | None = None) -> list[Start]:
        """The pool is now ``cpus`` (and ``gpus``; None keeps them): start what fits now.

        Raises ValueError, changing nothing, if the pool would be empty or a waiting task
        would no longer fit in it.
        """
        new_cpus = tuple(dict.fromkeys(cpus))
        new_gpus = self._all_gpus if gpus is None else tuple(dict.fromkeys(gpus))
        if not new_cpus:
            raise ValueError("a pool needs at least one CPU slot")
        for shape, _ in self._waiting.values():
            if shape[0] > len(new_cpus) or shape[1] > len(new_gpus):
                raise ValueError(f"a waiting task needs {shape[0]} CPUs and {shape[1]} GPUs, "
                                 f"more than the resized pool of {len(new_cpus)} and "
                                 f"{len(new_gpus)}")
        self._free_cpus, self._leaving_cpus = _repool(
            self._all_cpus, new_cpus, self._free_cpus, self._leaving_cpus)
        self._free_gpus, self._leaving_gpus = _repool(
            self._all_gpus, new_gpus, self._free_gpus, self._leaving_gpus)
        self._all_cpus, self._all_gpus = new_cpus, new_gpus
        if self._fixed_starvation_limit is None:
            self._starvation_limit = 2 * len(new_cpus)
        return self._admit()

    def finish_none(self) -> list[Start]:
        """Start what fits now (after a limit changed or several finishes were batched)."""
        return self._admit()

    def withdraw(self, task: Hashable) -> bool:
        """Remove a waiting task (cancelled). Returns False if it is not waiting."""
        if self._waiting.pop(task, None) is None:
            return False
        # The heap entry is skipped lazily when it reaches the top.
        return True

    # ------------------------------------------------------------------ queries
    def peek(self) -> Hashable | None:
        """The best waiting task: the one that starts next when resources free, unless a
        smaller one overtakes it (None if nothing waits)."""
        best = None
        for shape in list(self._queues):
            entry = self._head(shape)
            if entry is not None and (best is None or entry < best):
                best = entry
        return None if best is None else best[2]

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def free_cpus(self) -> int:
        return len(self._free_cpus)

    @property
    def free_gpus(self) -> int:
        return len(self._free_gpus)

    def is_running(self, task: Hashable) -> bool:
        return task in self._running

    def check_invariants(self) -> None:
        """Raise AssertionError if the books do not balance (used by the tests)."""
        used_cpus = [c for s in self._running.values() for c in s.cpus]
        used_gpus = [g for s in self._running.values() for g in s.gpus]
        assert len(set(used_cpus)) == len(used_cpus), "a CPU slot is granted twice"
        assert len(set(used_gpus)) == len(used_gpus), "a GPU is granted twice"
        assert self._leaving_cpus <= set(used_cpus), "a removed CPU slot is not in use"
        assert self._leaving_gpus <= set(used_gpus), "a removed GPU is not in use"
        assert not (self._leaving_cpus & set(self._all_cpus))
        assert sorted(used_cpus + self._free_cpus) == sorted(
            [*self._all_cpus, *self._leaving_cpus])
        assert sorted(used_gpus + self._free_gpus) == sorted(
            [*self._all_gpus, *self._leaving_gpus])
        assert not (self._waiting.keys() & self._running.keys())

    # ------------------------------------------------------------------ policy
    def _shape(self, demand: Demand) -> tuple[int, int]:
        if demand.exclusive:
            return (len(self._all_cpus), len(self._all_gpus))
        return (demand.cpus, demand.gpus)

    def _head(self, shape: tuple[int, int]) -> tuple[int, int, Hashable] | None:
        """Best live entry of one shape's queue, dropping withdrawn ones."""
        queue = self._queues[shape]
        while queue:
            entry = queue[0]
            if self._waiting.get(entry[2]) == (shape, entry[1]):
                return entry
            heapq.heappop(queue)
        del self._queues[shape]
        return None

    def _fits(self, shape: tuple[int, int]) -> bool:
        return shape[0] <= len(self._free_cpus) and shape[1] <= len(self._free_gpus)

    def _admit(self) -> list[Start]:
        started: list[Start] = []
        while self._waiting:
            if self.max_running is not None and len(self._running) >= self.max_running:
                break
            heads = []
            for shape in list(self._queues):
                entry = self._head(shape)
                if entry is not None:
                    heads.append((entry, shape))
            if not heads:
                break
            heads.sort()
            best_entry, best_shape = heads[0]
            if self._best_seen != best_entry[2]:
                self._best_seen, self._overtaken = best_entry[2], 0
            if self._fits(best_shape):
                started.append(self._start(best_entry, best_shape))
                continue
            if self._overtaken >= self._starvation_limit:
                break  # drain the pool until the best task fits
            fitting = [(e, s) for e, s in heads[1:] if self._fits(s)]
            if not fitting:
                break
            self._overtaken += 1
            started.append(self._start(*fitting[0]))
        return started

    def _start(self, entry: tuple[int, int, Hashable], shape: tuple[int, int]) -> Start:
        heapq.heappop(self._queues[shape])
        task = entry[2]
        del self._waiting[task]
        cpus = tuple(self._free_cpus.pop() for _ in range(shape[0]))
        gpus = tuple(self._free_gpus.pop() for _ in range(shape[1]))
        start = Start(task, cpus, gpus)
        self._running[task] = start
        return start


def _returned(ids: tuple[int, ...], leaving: set[int]) -> tuple[int, ...]:
    """The ids of a finished task that go back to the pool (removed ones leave it)."""
    if not leaving:
        return ids
    back = tuple(i for i in ids if i not in leaving)
    leaving.difference_update(ids)
    return back


def _repool(old: tuple[int, ...], new: tuple[int, ...], free: list[int],
            leaving: set[int]) -> tuple[list[int], set[int]]:
    """Free and leaving ids after the pool changed from ``old`` to ``new``."""
    keep = set(new)
    granted = (set(old) | leaving) - set(free)
    added = [i for i in new if i not in granted and i not in free]
    free = sorted([i for i in free if i in keep] + added, reverse=True)
    return free, {i for i in granted if i not in keep}
