"""Tests of executorkit.scheduler: events in, Start decisions out (no threads, no clocks)."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Hashable, Iterable

import pytest

from executorkit.scheduler import Demand, Scheduler, Start


def started(starts: Iterable[Start]) -> list[Hashable]:
    return [s.task for s in starts]


def fill(sched: Scheduler, n: int, prefix: str = "busy") -> list[str]:
    """Occupy ``n`` single-CPU slots with running tasks; return their names."""
    names = [f"{prefix}{i}" for i in range(n)]
    for name in names:
        assert started(sched.submit(name, Demand())) == [name]
    return names


# --------------------------------------------------------------------------- ordering
def test_free_pool_starts_at_once_with_the_lowest_ids() -> None:
    sched = Scheduler([5, 3, 9], gpus=[2, 0])
    (start,) = sched.submit("a", Demand(cpus=2, gpus=1))
    assert start == Start("a", (3, 5), (0,))
    assert sched.running == 1
    assert sched.waiting == 0
    assert sched.free_cpus == 1
    assert sched.free_gpus == 1
    assert sched.is_running("a")
    sched.check_invariants()


def test_fifo_among_equal_priority() -> None:
    sched = Scheduler([0])
    fill(sched, 1)
    for name in "abcd":
        assert sched.submit(name, Demand()) == []
    order = []
    current = "busy0"
    for _ in range(4):
        (start,) = sched.finish(current)
        order.append(start.task)
        current = start.task
        sched.check_invariants()
    assert order == list("abcd")


def test_higher_priority_first_then_fifo() -> None:
    sched = Scheduler([0])
    fill(sched, 1)
    sched.submit("low", Demand(), priority=-1)
    sched.submit("mid1", Demand(), priority=0)
    sched.submit("high", Demand(), priority=5)
    sched.submit("mid2", Demand(), priority=0)
    sched.submit("top", Demand(), priority=10)
    order = []
    current = "busy0"
    while True:
        starts = sched.finish(current)
        if not starts:
            break
        (start,) = starts
        order.append(start.task)
        current = start.task
    assert order == ["top", "high", "mid1", "mid2", "low"]


def test_priority_orders_across_shapes() -> None:
    sched = Scheduler(range(4))
    busy = fill(sched, 4)
    sched.submit("two", Demand(cpus=2), priority=0)
    sched.submit("one", Demand(cpus=1), priority=3)
    # One slot frees: "one" is the best task and it fits.
    assert started(sched.finish(busy[0])) == ["one"]


# --------------------------------------------------------------------------- backfill
def test_backfill_small_task_when_best_does_not_fit() -> None:
    sched = Scheduler(range(4))
    assert started(sched.submit("big3", Demand(cpus=3))) == ["big3"]
    # The best waiting task (higher priority) needs 2 CPUs; only 1 is free.
    assert sched.submit("two", Demand(cpus=2), priority=1) == []
    starts = sched.submit("small", Demand(cpus=1))
    assert started(starts) == ["small"]
    assert starts[0].cpus == (3,)
    assert sched.waiting == 1
    assert not sched.is_running("two")
    sched.check_invariants()


def test_backfill_respects_priority_among_fitting_tasks() -> None:
    sched = Scheduler(range(4))
    sched.submit("big3", Demand(cpus=3))
    sched.submit("need4", Demand(cpus=4), priority=9)  # best, does not fit
    # "small_late" is the only one that fits now, so it backfills into the free slot.
    assert started(sched.submit("small_late", Demand(cpus=1), priority=1)) == ["small_late"]
    sched.submit("small_a", Demand(cpus=1), priority=0)
    sched.submit("small_b", Demand(cpus=1), priority=2)
    # big3 frees three slots; need4 still does not fit (small_late runs), so the fitting
    # smaller ones start in priority order.
    assert started(sched.finish("big3")) == ["small_b", "small_a"]


# --------------------------------------------------------------------------- starvation
def _small_stream(sched: Scheduler, running: list[str], steps: int) -> list[str]:
    """Per step: submit a new 1-CPU task, finish the oldest running one.

    Returns every task started, in order, stopping once "big" has started.
    """
    order: list[str] = []
    queue = deque(running)
    for i in range(steps):
        new = started(sched.submit(f"n{i}", Demand()))
        done = started(sched.finish(queue.popleft())) if queue else []
        sched.check_invariants()
        for task in new + done:
            order.append(task)
            if task != "big":
                queue.append(task)
        if "big" in order:
            break
    return order


def _pool_with_big_waiting(ncpus: int, **kwargs: int) -> tuple[Scheduler, list[str]]:
    sched = Scheduler(range(ncpus), **kwargs)
    running = fill(sched, ncpus, prefix="s")
    assert sched.submit("big", Demand(cpus=ncpus)) == []
    return sched, running


def test_starvation_guard_lets_the_big_task_through_a_stream_of_small_ones() -> None:
    limit = 3
    sched, running = _pool_with_big_waiting(4, starvation_limit=limit)
    order = _small_stream(sched, running, steps=100)
    assert "big" in order, "the big task was starved"
    # Exactly `limit` small tasks overtook it; then the pool drained towards it.
    assert order.index("big") == limit
    assert sched.is_running("big")
    assert sched.free_cpus == 0
    # After the big task, the small tasks that waited during the drain start, FIFO.
    assert started(sched.finish("big")) == ["n3", "n4", "n5", "n6"]


def test_without_the_guard_the_stream_starves_the_big_task() -> None:
    # Control for the test above: a huge limit lets small tasks overtake forever.
    sched, running = _pool_with_big_waiting(4, starvation_limit=10**9)
    order = _small_stream(sched, running, steps=100)
    assert "big" not in order
    assert len(order) == 100
    assert not sched.is_running("big")


def test_default_starvation_limit_is_twice_the_pool() -> None:
    sched, running = _pool_with_big_waiting(2)
    order = _small_stream(sched, running, steps=100)
    assert "big" in order
    assert order.index("big") == 4


def test_starvation_limit_zero_means_strict_order() -> None:
    sched = Scheduler(range(2), starvation_limit=0)
    sched.submit("a", Demand())
    sched.submit("big", Demand(cpus=2))
    # A free slot exists, but nothing may overtake "big".
    assert sched.submit("small", Demand()) == []
    assert started(sched.finish("a")) == ["big"]
    assert started(sched.finish("big")) == ["small"]


def test_higher_priority_arrival_resets_the_drain() -> None:
    sched, running = _pool_with_big_waiting(2, starvation_limit=0)
    # Drain towards "big": a free slot stays unused ...
    assert sched.finish(running[0]) == []
    # ... until a more important task arrives; it becomes the best and it fits.
    assert started(sched.submit("urgent", Demand(), priority=1)) == ["urgent"]


# --------------------------------------------------------------------------- GPUs
def test_gpus_are_distinct_and_returned() -> None:
    sched = Scheduler(range(4), gpus=[10, 11, 12, 13])
    (a,) = sched.submit("a", Demand(cpus=1, gpus=2))
    (b,) = sched.submit("b", Demand(cpus=1, gpus=2))
    assert len(a.gpus) == len(b.gpus) == 2
    assert not set(a.gpus) & set(b.gpus)
    assert set(a.gpus) | set(b.gpus) == {10, 11, 12, 13}
    assert sched.free_gpus == 0
    # No GPU left: a GPU task waits although CPUs are free.
    assert sched.submit("c", Demand(cpus=1, gpus=1)) == []
    (c,) = sched.finish("a")
    assert c.task == "c"
    assert set(c.gpus) <= set(a.gpus)
    assert sched.free_gpus == 1
    sched.finish("b")
    sched.finish("c")
    assert sched.free_gpus == 4
    assert sched.free_cpus == 4
    sched.check_invariants()


def test_cpu_only_task_gets_no_gpu() -> None:
    sched = Scheduler(range(2), gpus=[0])
    (start,) = sched.submit("a", Demand(cpus=1))
    assert start.gpus == ()
    assert sched.free_gpus == 1


# --------------------------------------------------------------------------- exclusive
def test_exclusive_takes_the_whole_pool() -> None:
    sched = Scheduler([1, 2, 3], gpus=[0, 1])
    (start,) = sched.submit("x", Demand(cpus=1, exclusive=True))
    assert sorted(start.cpus) == [1, 2, 3]
    assert sorted(start.gpus) == [0, 1]
    assert sched.free_cpus == 0
    assert sched.free_gpus == 0
    assert sched.submit("small", Demand()) == []
    assert started(sched.finish("x")) == ["small"]


def test_exclusive_waits_for_an_empty_pool() -> None:
    sched = Scheduler(range(3), starvation_limit=0)
    sched.submit("a", Demand())
    sched.submit("b", Demand())
    assert sched.submit("x", Demand(exclusive=True)) == []
    assert sched.finish("a") == []
    (start,) = sched.finish("b")
    assert start.task == "x"
    assert len(start.cpus) == 3


# --------------------------------------------------------------------------- withdraw
def test_withdraw_waiting_task_never_starts() -> None:
    sched = Scheduler([0])
    fill(sched, 1)
    sched.submit("a", Demand())
    sched.submit("b", Demand())
    assert sched.withdraw("a") is True
    assert sched.waiting == 1
    assert started(sched.finish("busy0")) == ["b"]
    assert sched.finish("b") == []
    assert not sched.is_running("a")
    assert sched.waiting == 0
    sched.check_invariants()


def test_peek_names_the_task_that_starts_next() -> None:
    """peek() is the best waiting task by priority, then submission, across shapes; it
    skips withdrawn tasks and is None when nothing waits. With one shape it is exactly the
    task the next freed slot starts (the engine pickles that call ahead)."""
    sched = Scheduler(range(2))
    assert sched.peek() is None
    busy = fill(sched, 2)
    assert sched.peek() is None
    sched.submit("a", Demand())
    sched.submit("b", Demand(cpus=2), priority=1)
    sched.submit("c", Demand(), priority=2)
    assert sched.peek() == "c"
    assert sched.withdraw("c")
    assert sched.peek() == "b"
    assert sched.withdraw("b")
    sched.submit("d", Demand())
    assert sched.peek() == "a"
    for name in ("a", "d"):
        nxt = sched.peek()
        assert started(sched.finish(busy.pop())) == [nxt] == [name]
    assert sched.peek() is None
    sched.check_invariants()


def test_withdraw_unknown_or_running_returns_false() -> None:
    sched = Scheduler([0])
    fill(sched, 1)
    assert sched.withdraw("nobody") is False
    assert sched.withdraw("busy0") is False
    assert sched.is_running("busy0")
    sched.submit("a", Demand())
    assert sched.withdraw("a") is True
    assert sched.withdraw("a") is False


def test_withdrawn_best_task_releases_the_drain() -> None:
    sched = Scheduler(range(2), starvation_limit=0)
    sched.submit("a", Demand())
    sched.submit("big", Demand(cpus=2))
    assert sched.submit("small", Demand()) == []  # blocked behind "big"
    sched.withdraw("big")
    assert started(sched.finish_none()) == ["small"]


@pytest.mark.parametrize(
    ("old_priority", "new_priority"), [(0, 0), (5, 0)], ids=["fifo", "priority"]
)
def test_withdrawn_then_resubmitted_task_is_queued_as_new(
    old_priority: int, new_priority: int
) -> None:
    sched = Scheduler([0])
    fill(sched, 1)
    sched.submit("a", Demand(), priority=old_priority)
    sched.submit("b", Demand(), priority=0)
    assert sched.withdraw("a")
    # A new submission of "a": behind "b" (same priority, later) either way.
    sched.submit("a", Demand(), priority=new_priority)
    assert started(sched.finish("busy0")) == ["b"]


# --------------------------------------------------------------------------- max_running
def test_max_running_caps_and_can_be_raised() -> None:
    sched = Scheduler(range(4), max_running=1)
    assert started(sched.submit("a", Demand())) == ["a"]
    assert sched.submit("b", Demand()) == []
    assert sched.submit("c", Demand()) == []
    assert sched.submit("d", Demand()) == []
    assert sched.running == 1
    assert sched.free_cpus == 3
    sched.max_running = 3
    assert started(sched.finish_none()) == ["b", "c"]
    assert sched.running == 3
    sched.max_running = None
    assert started(sched.finish_none()) == ["d"]
    sched.check_invariants()


def test_max_running_refills_on_finish() -> None:
    sched = Scheduler(range(4), max_running=2)
    sched.submit("a", Demand())
    sched.submit("b", Demand())
    sched.submit("c", Demand())
    assert sched.running == 2
    assert started(sched.finish("a")) == ["c"]


def test_finish_none_without_changes_starts_nothing() -> None:
    sched = Scheduler([0])
    fill(sched, 1)
    sched.submit("a", Demand())
    assert sched.finish_none() == []


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "demand",
    [Demand(cpus=5), Demand(cpus=1, gpus=3), Demand(cpus=5, gpus=1)],
    ids=["cpus", "gpus", "both"],
)
def test_demand_larger_than_pool_raises(demand: Demand) -> None:
    sched = Scheduler(range(4), gpus=[0, 1])
    with pytest.raises(ValueError, match="exceeds the pool"):
        sched.submit("t", demand)
    assert sched.waiting == 0
    # The scheduler still works afterwards.
    assert started(sched.submit("ok", Demand(cpus=4, gpus=2))) == ["ok"]


def test_gpu_demand_on_a_cpu_only_pool_raises() -> None:
    sched = Scheduler(range(2))
    with pytest.raises(ValueError):
        sched.submit("t", Demand(gpus=1))


def test_duplicate_task_raises() -> None:
    sched = Scheduler([0])
    sched.submit("a", Demand())  # running
    sched.submit("b", Demand())  # waiting
    with pytest.raises(ValueError, match="already known"):
        sched.submit("a", Demand())
    with pytest.raises(ValueError, match="already known"):
        sched.submit("b", Demand())
    assert sched.waiting == 1
    assert sched.running == 1


def test_finished_task_id_may_be_reused() -> None:
    sched = Scheduler([0])
    sched.submit("a", Demand())
    sched.finish("a")
    assert started(sched.submit("a", Demand())) == ["a"]


def test_empty_pool_rejected() -> None:
    with pytest.raises(ValueError):
        Scheduler([])


def test_finish_unknown_task_raises() -> None:
    sched = Scheduler([0])
    with pytest.raises(KeyError):
        sched.finish("ghost")


def test_check_invariants_detects_double_grant() -> None:
    # check_invariants() is the oracle of the randomized test: make sure it can fail.
    sched = Scheduler(range(2))
    (a,) = sched.submit("a", Demand())
    sched._running["evil"] = Start("evil", a.cpus, ())
    with pytest.raises(AssertionError):
        sched.check_invariants()


# --------------------------------------------------------------------------- randomized
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 17, 2024])
def test_randomized_invariants_and_every_task_starts_once(seed: int) -> None:
    rng = random.Random(seed)
    ncpus = rng.randint(1, 8)
    ngpus = rng.randint(0, 4)
    cpu_ids = rng.sample(range(100), ncpus)
    gpu_ids = rng.sample(range(100, 200), ngpus)
    max_running = rng.choice([None, None, 1, 2, 5])
    sched = Scheduler(
        cpu_ids, gpu_ids, max_running=max_running,
        starvation_limit=rng.choice([None, 0, 1, 3, 50]),
    )

    submitted: set[int] = set()
    withdrawn: set[int] = set()
    start_count: dict[int, int] = {}
    waiting: set[int] = set()
    running: dict[int, Start] = {}
    cpus_in_use: set[int] = set()
    gpus_in_use: set[int] = set()
    next_id = 0

    def record(starts: list[Start]) -> None:
        for s in starts:
            assert s.task in waiting, f"{s.task} started but was not waiting"
            assert s.task not in withdrawn
            assert not set(s.cpus) & cpus_in_use, "a CPU id was granted twice"
            assert not set(s.gpus) & gpus_in_use, "a GPU id was granted twice"
            assert len(set(s.cpus)) == len(s.cpus)
            assert len(set(s.gpus)) == len(s.gpus)
            assert set(s.cpus) <= set(cpu_ids)
            assert set(s.gpus) <= set(gpu_ids)
            cpus_in_use.update(s.cpus)
            gpus_in_use.update(s.gpus)
            waiting.discard(s.task)
            running[s.task] = s
            start_count[s.task] = start_count.get(s.task, 0) + 1
        if max_running is not None:
            assert len(running) <= max_running
        sched.check_invariants()
        assert sched.running == len(running)
        assert sched.waiting == len(waiting)
        assert sched.free_cpus == ncpus - len(cpus_in_use)
        assert sched.free_gpus == ngpus - len(gpus_in_use)

    def finish(task: int) -> None:
        s = running.pop(task)
        cpus_in_use.difference_update(s.cpus)
        gpus_in_use.difference_update(s.gpus)
        record(sched.finish(task))

    for _ in range(400):
        op = rng.random()
        if op < 0.5:
            exclusive = rng.random() < 0.05
            demand = Demand(
                cpus=rng.randint(1, ncpus), gpus=rng.randint(0, ngpus), exclusive=exclusive
            )
            task = next_id
            next_id += 1
            submitted.add(task)
            waiting.add(task)
            record(sched.submit(task, demand, priority=rng.randint(-2, 2)))
        elif op < 0.85 and running:
            finish(rng.choice(sorted(running)))
        elif waiting:
            task = rng.choice(sorted(waiting))
            assert sched.withdraw(task) is True
            waiting.discard(task)
            withdrawn.add(task)
            record([])
        else:
            record(sched.finish_none())

    # Drain: finish everything; every remaining task must eventually start.
    for _ in range(10 * len(submitted) + 10):
        if not running:
            record(sched.finish_none())
            if not running:
                break
        finish(min(running))
    assert not running
    assert not waiting
    assert sched.waiting == 0
    assert sched.free_cpus == ncpus
    assert sched.free_gpus == ngpus
    assert set(start_count) == submitted - withdrawn
    assert all(count == 1 for count in start_count.values())


# --------------------------------------------------------------------------- resizing
def test_growing_the_pool_starts_waiting_tasks_at_once() -> None:
    sched = Scheduler([0])
    fill(sched, 1)
    assert sched.submit("a", Demand()) == [] and sched.submit("b", Demand()) == []
    starts = sched.resize([0, 1, 2])
    assert started(starts) == ["a", "b"] and {s.cpus for s in starts} == {(1,), (2,)}
    assert sched.free_cpus == 0
    sched.check_invariants()


def test_shrinking_keeps_running_tasks_and_their_slots_leave_when_they_finish() -> None:
    sched = Scheduler([0, 1, 2])
    fill(sched, 2)  # busy0 on 0, busy1 on 1; slot 2 free
    assert sched.resize([0]) == []
    assert sched.free_cpus == 0 and sched.running == 2  # nobody was disturbed
    sched.check_invariants()
    assert sched.submit("a", Demand()) == []  # the pool is one slot, and it is taken
    assert sched.finish("busy1") == []  # slot 1 left the pool instead of starting "a"
    sched.check_invariants()
    (start,) = sched.finish("busy0")
    assert start == Start("a", (0,), ())
    sched.check_invariants()


def test_a_removed_slot_in_use_can_be_added_back_before_it_is_freed() -> None:
    sched = Scheduler([0, 1])
    fill(sched, 2)
    sched.resize([0])
    sched.resize([0, 1])  # slot 1 is still granted: it stays in use, then returns
    sched.check_invariants()
    assert sched.submit("a", Demand()) == []
    assert started(sched.finish("busy1")) == ["a"]
    sched.check_invariants()


def test_resize_that_strands_a_waiting_task_or_empties_the_pool_is_refused() -> None:
    sched = Scheduler([0, 1, 2, 3], gpus=[0, 1])
    fill(sched, 4)
    sched.submit("big", Demand(cpus=3, gpus=2))
    with pytest.raises(ValueError, match="waiting task"):
        sched.resize([0, 1])
    with pytest.raises(ValueError, match="waiting task"):
        sched.resize([0, 1, 2, 3], gpus=[0])
    with pytest.raises(ValueError, match="at least one CPU"):
        sched.resize([])
    assert sched.free_cpus == 0 and sched.waiting == 1  # nothing changed
    sched.check_invariants()


def test_random_resizes_keep_the_books_balanced() -> None:
    rng = random.Random(7)
    sched = Scheduler(range(4), gpus=range(2))
    cpus, gpus = 4, 2
    running: list[str] = []
    for step in range(400):
        event = rng.random()
        if event < 0.4:
            demand = Demand(cpus=rng.randint(1, min(2, cpus)), gpus=rng.randint(0, min(1, gpus)))
            running += started(sched.submit(f"t{step}", demand))
        elif event < 0.8 and running:
            running += started(sched.finish(running.pop(rng.randrange(len(running)))))
        else:
            new_cpus, new_gpus = rng.randint(1, 6), rng.randint(1, 3)
            try:
                running += started(sched.resize(range(new_cpus), gpus=range(new_gpus)))
            except ValueError:
                continue  # would strand a waiting task: refused, nothing changed
            cpus, gpus = new_cpus, new_gpus
        sched.check_invariants()
