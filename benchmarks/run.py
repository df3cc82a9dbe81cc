"""Benchmark executorkit against the stdlib ProcessPoolExecutor (and executorlib if installed).

    python benchmarks/run.py                       # full run (a few minutes)
    python benchmarks/run.py --quick               # smaller sizes, under a minute
    python benchmarks/run.py --json out.json --markdown out.md

Every figure of DESIGN.md section 6 is measured in the same run, with ``max_workers=2`` and
the tiny task ``inc(x) = x + 1`` defined at the top level of this script (so, run as a
script, in ``__main__``). The table goes to stdout, progress to stderr. See
benchmarks/README.md for the exact definition of every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import multiprocessing
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psutil

import executorkit
from executorkit import SingleNodeExecutor
from executorkit.cache import CacheStore

# The task modules next to this script (npfuncs imports numpy and scipy): importable by
# reference in this process and, through PYTHONPATH, in every worker of every peer.
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)

EK, STDLIB, EL = "executorkit", "ProcessPoolExecutor", "executorlib"
PEERS = (EK, STDLIB, EL)
WORKERS = 2


# ----------------------------------------------------------------------------- the tasks
def inc(x: int) -> int:
    return x + 1


def timed_sleep(seconds: float) -> float:
    """Sleep; return the run time measured inside the task."""
    start = time.perf_counter()
    time.sleep(seconds)
    return time.perf_counter() - start


def inc_logged(x: int, log_path: str) -> int:
    """``x + 1``, appending this process's pid to ``log_path`` (one line per execution)."""
    with open(log_path, "a") as log:
        log.write(f"{os.getpid()}\n")
    return x + 1


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Config:
    quick: bool
    peers: tuple[str, ...]
    n_per_task: int  # figure 1
    n_block: int  # figure 2
    stdlib_per_task_divisor: int  # the stdlib per-task pool is ~20x slower: N / divisor tasks
    chain_per_task: int  # figure 3
    chain_block: int
    busy_repeats: int  # figure 4
    cache_tasks: int  # figure 5
    lookup_entries: tuple[int, ...]
    lookup_calls: int
    waiting: int  # figure 6
    repeats: int = 3  # best (or median) of this many, where cheap
    cheap: float = 10.0  # a measurement longer than this (s) is not repeated

    @classmethod
    def make(cls, quick: bool, peers: tuple[str, ...]) -> Config:
        if quick:
            return cls(quick, peers, n_per_task=300, n_block=5000, stdlib_per_task_divisor=10,
                       chain_per_task=50, chain_block=500, busy_repeats=1, cache_tasks=300,
                       lookup_entries=(2000,), lookup_calls=2000, waiting=20_000, cheap=3.0)
        return cls(quick, peers, n_per_task=1000, n_block=20_000, stdlib_per_task_divisor=5,
                   chain_per_task=200, chain_block=2000, busy_repeats=3, cache_tasks=1000,
                   lookup_entries=(2000, 20_000), lookup_calls=2000, waiting=100_000)


def timeout_for(peer: str, tasks: int) -> float:
    """Generous wall-clock limit for ``tasks`` tiny calls (executorlib: ~13/s per-task)."""
    return 120.0 + tasks * (0.5 if peer == EL else 0.05)


# ----------------------------------------------------------------------------- results
@dataclass
class Failure:
    """A measurement that did not produce a number; shown as ``error: ...``."""

    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class Row:
    key: str
    label: str
    target: str = "-"
    # check(executorkit value, all values) -> passed; None: an informational row
    check: Callable[[float, dict[str, Any]], bool] | None = None
    fmt: str = "{:.2f}"
    ratio: bool = True  # show executorkit / ProcessPoolExecutor
    values: dict[str, Any] = field(default_factory=dict)

    def cell(self, peer: str) -> str:
        return _fmt(self.values.get(peer, "n/a"), self.fmt)

    def ratio_cell(self) -> str:
        ours, theirs = self.values.get(EK), self.values.get(STDLIB)
        if not self.ratio or not _number(ours) or not _number(theirs) or theirs == 0:
            return "-"
        return f"{ours / theirs:.2f}"

    def verdict(self) -> str:
        value = self.values.get(EK)
        if self.check is None:
            return "info"
        if isinstance(value, Hang):
            return "FAIL"
        if not _number(value):
            return "error"
        return "pass" if self.check(value, self.values) else "FAIL"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any, fmt: str) -> str:
    if _number(value):
        return fmt.format(value)
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Report:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.rows: list[Row] = []
        self.details: list[str] = []
        self.warnings: list[str] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        self.details.append(text)
        progress(f"  {text}")

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        progress(f"WARNING: {text}")


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def attempt(report: Report, what: str, peer: str, measure: Callable[[], Any]) -> Any:
    """Run one measurement; an exception becomes a :class:`Failure` (the run goes on)."""
    progress(f"[{what}] {peer} ...")
    start = time.perf_counter()
    try:
        value = measure()
    except Exception as exc:
        progress("".join(traceback.format_exception(exc)).rstrip())
        report.note(f"{what}, {peer}: {type(exc).__name__}: {exc}")
        return Failure(f"error: {type(exc).__name__}: {exc}")
    progress(f"[{what}] {peer}: {time.perf_counter() - start:.1f} s")
    return value


# ----------------------------------------------------------------------------- executors
def make_executor(peer: str, block: bool, **kwargs: Any) -> Executor:
    """A 2-worker pool of ``peer``. ``block=False`` means one process per call:
    executorkit/executorlib's default mode, and for the stdlib a ProcessPoolExecutor whose
    workers exit after one task (``max_tasks_per_child=1``, started by a forkserver)."""
    if peer == EK:
        return SingleNodeExecutor(max_workers=WORKERS, block_allocation=block, **kwargs)
    if peer == STDLIB:
        if block:
            return ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("fork"))
        return ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("forkserver"),
                                   max_tasks_per_child=1)
    if peer == EL:
        import executorlib

        return executorlib.SingleNodeExecutor(max_workers=WORKERS, block_allocation=block,
                                              **kwargs)
    raise ValueError(peer)


def shutdown(exe: Executor, *, cancel: bool, timeout: float) -> float:
    """``exe.shutdown(wait=True)`` with a time limit (in a helper thread); its duration."""
    start = time.perf_counter()
    thread = threading.Thread(target=exe.shutdown, kwargs={"wait": True, "cancel_futures": cancel},
                              name="benchmark-shutdown", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{type(exe).__name__}.shutdown() took more than {timeout:.0f} s")
    return time.perf_counter() - start


@contextlib.contextmanager
def running(peer: str, block: bool, **kwargs: Any) -> Iterator[Executor]:
    """An executor, shut down at the end (cancelling what is left if the body failed)."""
    exe = make_executor(peer, block, **kwargs)
    try:
        yield exe
    except BaseException:
        with contextlib.suppress(Exception):
            shutdown(exe, cancel=True, timeout=30)
        raise
    shutdown(exe, cancel=False, timeout=60)


@contextlib.contextmanager
def scratch_cwd() -> Iterator[str]:
    """Run the figures in a temporary directory: whatever calls write into their working
    directory (Command output files, say) never lands in the user's (or the repository)."""
    before = os.getcwd()
    scratch = tempfile.mkdtemp(prefix="executorkit-bench-cwd-")
    os.chdir(scratch)
    try:
        yield scratch
    finally:
        os.chdir(before)
        shutil.rmtree(scratch, ignore_errors=True)


def wait_all(futures: Sequence[Future], timeout: float) -> list[Any]:
    """All results, within ``timeout`` seconds in total."""
    deadline = time.monotonic() + timeout
    return [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]


def warm_up(exe: Executor, timeout: float = 120.0) -> None:
    """Start the workers (or fork server) outside the timed part."""
    assert wait_all([exe.submit(inc, i) for i in range(2 * WORKERS)], timeout) == [1, 2, 3, 4]


def repeated(once: Callable[[], Any], config: Config, times: int | None = None) -> list[Any]:
    """Up to ``times`` (default ``config.repeats``) samples; a slow one is not repeated."""
    samples = []
    for _ in range(times or config.repeats):
        start = time.perf_counter()
        samples.append(once())
        if time.perf_counter() - start > config.cheap:
            break
    return samples


def _samples(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    return ", ".join(fmt.format(v) for v in values)


# ----------------------------------------------------------------------------- figure 1, 2
def tasks_per_second(exe: Executor, n: int, timeout: float) -> float:
    start = time.perf_counter()
    futures = [exe.submit(inc, i) for i in range(n)]
    results = wait_all(futures, timeout)
    elapsed = time.perf_counter() - start
    if results != list(range(1, n + 1)):
        raise AssertionError("wrong results")
    return n / elapsed


class CpuSplit:
    """CPU time that calls cost each process over a ``with`` block, in ms per call: this
    process (the driver: submitting, the engine thread), executorkit's fork server, and the
    workers it forked and reaped (the fork server's children's times). Where per-task time
    goes on a machine whose CPUs are all busy (see the closing notes of issue 10)."""

    def __enter__(self) -> CpuSplit:
        me = psutil.Process()
        self.servers = []
        for child in me.children():
            with contextlib.suppress(psutil.Error):
                if "executorkit.worker.forkserver" in child.cmdline():
                    self.servers.append(child)
        self.before = self._times(me)
        self.after = self.before
        return self

    def _times(self, me: psutil.Process) -> tuple[float, float, float]:
        own = me.cpu_times()
        server = workers = 0.0
        for proc in self.servers:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                server += t.user + t.system
                workers += t.children_user + t.children_system
        return own.user + own.system, server, workers

    def __exit__(self, *exc: object) -> None:
        self.after = self._times(psutil.Process())

    def text(self, calls: int) -> str:
        if not self.servers or calls <= 0:
            return "n/a (no fork server)"
        ms = [(b - a) / calls * 1e3 for a, b in zip(self.before, self.after, strict=True)]
        return " / ".join(f"{v:.2f}" for v in ms) + f" (sum {sum(ms):.2f})"


def throughput(report: Report, what: str, peer: str, block: bool, n: int,
               cpu: Row | None = None) -> float:
    def measure() -> float:
        with running(peer, block) as exe:
            warm_up(exe)
            with CpuSplit() as split:
                rates = repeated(lambda: tasks_per_second(exe, n, timeout_for(peer, n)),
                                 report.config)
        report.note(f"{what}, {peer}: N={n}, tasks/s per round: {_samples(rates)} -> best")
        if cpu is not None:
            cpu.values[peer] = split.text(n * len(rates))
            report.note(f"{what}, {peer}: CPU ms per call, driver / fork server / workers: "
                        f"{cpu.values[peer]}")
        return max(rates)

    return attempt(report, what, peer, measure)


def cpu_row(report: Report, key: str) -> Row:
    return report.add(Row(f"{key}'", "  CPU ms/call: driver / fork server / workers", "-",
                          None, "{}", ratio=False))


def figure_1(report: Report) -> None:
    cfg = report.config
    row = report.add(Row("1", "tiny tasks/s, per-task process", ">= 300/s",
                         lambda v, _: v >= 300, "{:,.0f}"))
    cpu = cpu_row(report, "1")
    for peer in cfg.peers:
        n = cfg.n_per_task // cfg.stdlib_per_task_divisor if peer == STDLIB else cfg.n_per_task
        row.values[peer] = throughput(report, "fig 1", peer, False, n,
                                      cpu if peer == EK else None)


def commands_per_second(exe: Executor, n: int, timeout: float) -> float:
    from executorkit import Command

    start = time.perf_counter()
    futures = [exe.submit(Command(["/bin/true"])) for _ in range(n)]
    results = wait_all(futures, timeout)
    elapsed = time.perf_counter() - start
    if any(r.returncode != 0 for r in results):
        raise AssertionError("a /bin/true call failed")
    return n / elapsed


def figure_c(report: Report) -> None:
    """Command calls (a /bin/true program per call), per-task processes; executorkit only."""
    cfg = report.config
    row = report.add(Row("C", "Command('/bin/true') calls/s, per-task process", ">= 300/s",
                         lambda v, _: v >= 300, "{:,.0f}"))
    n = cfg.n_per_task

    def measure() -> float:
        with running(EK, False) as exe:
            warm_up(exe)
            rates = repeated(lambda: commands_per_second(exe, n, timeout_for(EK, n)), cfg)
        report.note(f"fig C, {EK}: N={n}, calls/s per round: {_samples(rates)} -> best")
        return max(rates)

    row.values[EK] = attempt(report, "fig C", EK, measure)


def figure_2(report: Report) -> None:
    cfg = report.config
    row = report.add(Row("2", "tiny tasks/s, block allocation", ">= 1.0 x stdlib",
                         lambda v, vals: _number(vals.get(STDLIB)) and v >= vals[STDLIB],
                         "{:,.0f}"))
    for peer in cfg.peers:
        row.values[peer] = throughput(report, "fig 2", peer, True, cfg.n_block)


# ----------------------------------------------------------------------------- figure 3
def chain_of_futures(exe: Executor, steps: int, timeout: float) -> float:
    """ms per step of a chain where every call takes the previous call's future."""
    start = time.perf_counter()
    future = exe.submit(inc, 0)
    for _ in range(steps - 1):
        future = exe.submit(inc, future)
    value = future.result(timeout=timeout)
    elapsed = time.perf_counter() - start
    if value != steps:
        raise AssertionError(f"chain ended with {value}, expected {steps}")
    return elapsed / steps * 1e3


def chain_of_results(exe: Executor, steps: int, timeout: float) -> float:
    """The stdlib equivalent: wait for each result and submit the next call with it."""
    deadline = time.monotonic() + timeout
    start = time.perf_counter()
    value = 0
    for _ in range(steps):
        value = exe.submit(inc, value).result(timeout=max(0.0, deadline - time.monotonic()))
    elapsed = time.perf_counter() - start
    if value != steps:
        raise AssertionError(f"chain ended with {value}, expected {steps}")
    return elapsed / steps * 1e3


def chain(report: Report, what: str, peer: str, block: bool, steps: int) -> float:
    def measure() -> float:
        chain_fn = chain_of_results if peer == STDLIB else chain_of_futures
        with running(peer, block) as exe:
            warm_up(exe)
            times = repeated(lambda: chain_fn(exe, steps, timeout_for(peer, steps)),
                             report.config)
        report.note(f"{what}, {peer}: {steps} steps, ms/step per round: "
                    f"{_samples(times, '{:.3f}')} -> best")
        return min(times)

    return attempt(report, what, peer, measure)


def figure_3(report: Report) -> None:
    cfg = report.config
    for key, block, steps, limit in (("3a", False, cfg.chain_per_task, 5.0),
                                     ("3b", True, cfg.chain_block, 0.3)):
        mode = "block allocation" if block else "per-task process"
        row = report.add(Row(key, f"dependency chain, ms/step, {mode}", f"<= {limit} ms",
                             lambda v, _, limit=limit: v <= limit, "{:.3f}"))
        for peer in cfg.peers:
            row.values[peer] = chain(report, f"fig {key}", peer, block, steps)


# ----------------------------------------------------------------------------- figure 4
def sleep_durations() -> list[float]:
    rng = random.Random(1234)
    return [rng.uniform(0.05, 0.3) for _ in range(24)]


def fifo_makespan(durations: Sequence[float], machines: int = WORKERS) -> float:
    """Makespan of the list schedule in submission order (each task to the first free
    worker): the best any first-come-first-served executor can do."""
    free = [0.0] * machines
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free)


def optimal_makespan(durations: Sequence[float], resolution: float = 1e-4) -> float:
    """Optimal 2-machine makespan (a partition problem), to ``resolution`` seconds."""
    sizes = [round(d / resolution) for d in durations]
    reachable = 1  # bit s set: some subset sums to s
    for s in sizes:
        reachable |= reachable << s
    total = sum(sizes)
    best = min(max(s, total - s) for s in range(total + 1) if reachable >> s & 1)
    return best * resolution


def busy_once(exe: Executor, durations: Sequence[float], timeout: float) -> tuple[float, float]:
    """(busy, busy / best achievable) of one run; see README."""
    start = time.perf_counter()
    futures = [exe.submit(timed_sleep, d) for d in durations]
    runtimes = wait_all(futures, timeout)
    wall = time.perf_counter() - start
    total = sum(runtimes)
    bound = max(total / WORKERS, max(runtimes))  # lower bound of the makespan
    return total / (WORKERS * wall), bound / wall


def figure_4(report: Report) -> None:
    cfg = report.config
    durations = sleep_durations()
    total = sum(durations)
    bound = max(total / WORKERS, max(durations))
    fifo = total / (WORKERS * fifo_makespan(durations))
    report.note(f"fig 4: 24 sleeps, total {total:.3f} s, longest {max(durations):.3f} s; "
                f"ideal busy: lower bound {total / (WORKERS * bound):.4f}, "
                f"optimal partition {total / (WORKERS * optimal_makespan(durations)):.4f}, "
                f"FIFO list schedule {fifo:.4f}")
    for key, block in (("4a", False), ("4b", True)):
        mode = "block allocation" if block else "per-task process"
        busy = report.add(Row(key, f"busy fraction, {mode}", ">= 0.97",
                              lambda v, _: v >= 0.97, "{:.3f}"))
        rel = report.add(Row(f"{key}'", "  busy / best achievable (lower bound)", "-",
                             None, "{:.3f}"))
        for peer in cfg.peers:

            def measure(peer: str = peer, block: bool = block,
                        key: str = key) -> tuple[float, float]:
                with running(peer, block) as exe:
                    warm_up(exe)
                    runs = repeated(lambda: busy_once(exe, durations, timeout_for(peer, 24)),
                                    cfg, cfg.busy_repeats)
                runs.sort()
                report.note(f"fig {key}, {peer}: busy per round: "
                            f"{_samples([r[0] for r in runs], '{:.3f}')}; busy/bound: "
                            f"{_samples([r[1] for r in runs], '{:.3f}')} -> median round; "
                            f"busy / FIFO ideal: {runs[len(runs) // 2][0] / fifo:.3f}")
                return runs[len(runs) // 2]

            value = attempt(report, f"fig {key}", peer, measure)
            if isinstance(value, Failure):
                busy.values[peer] = rel.values[peer] = value
            else:
                busy.values[peer], rel.values[peer] = value


# ----------------------------------------------------------------------------- figure 5
class ProcessWatch:
    """Pids of this process's descendants seen while active (sampled every 20 ms)."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.before = {p.pid for p in self.me.children(recursive=True)}
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="benchmark-watch", daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.seen.update(p.pid for p in self.me.children(recursive=True))

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def new(self) -> set[int]:
        return self.seen - self.before


def _lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as log:
        return log.read().split()


def cache_run(directory: str, log_path: str, n: int) -> float:
    """ms per task of ``n`` logged calls on a per-task executor caching in ``directory``.
    The warm-up call (-1) starts the fork server on a cold cache and is a hit on a warm one."""
    with running(EK, False, cache_directory=directory) as exe:
        assert exe.submit(inc_logged, -1, log_path).result(timeout=120) == 0
        start = time.perf_counter()
        futures = [exe.submit(inc_logged, i, log_path) for i in range(n)]
        results = wait_all(futures, timeout_for(EK, n))
        elapsed = time.perf_counter() - start
    if results != list(range(1, n + 1)):
        raise AssertionError("wrong results")
    return elapsed / n * 1e3


def lookup_cost(base: str, entries: int, calls: int) -> tuple[float, list[float]]:
    """ms per ``CacheStore.lookup`` hit (median round) in a directory of ``entries`` entries,
    and the per-round means in us."""
    # The filling and timing helpers of the stand-alone cache benchmark.
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from cache_lookup import fill, time_per_call

    store = CacheStore(os.path.join(base, f"entries-{entries}"))
    start = time.perf_counter()
    keys = fill(store, entries)
    filled = time.perf_counter() - start
    rng = random.Random(0)
    hits = [rng.choice(keys) for _ in range(calls)]
    if not all(store.lookup(key)[0] for key in hits[:100]):
        raise AssertionError("a stored key was not found")
    median, means = time_per_call(store, hits, rounds=3)
    progress(f"  ({entries} entries written in {filled:.1f} s)")
    return median / 1e3, means


def figure_5(report: Report) -> None:
    cfg = report.config
    n = cfg.cache_tasks
    cold = report.add(Row("5a", "cache cold, ms/task (per-task, writes the cache)", "-",
                          None, "{:.2f}", ratio=False))
    warm = report.add(Row("5b", "cache warm, ms/task (all hits)", "<= 0.2 ms",
                          lambda v, _: v <= 0.2, "{:.3f}", ratio=False))
    procs = report.add(Row("5c", "processes started in the warm runs", "0",
                           lambda v, _: v == 0, "{:d}", ratio=False))
    lookups = [report.add(Row(f"5{'de'[i]}", f"CacheStore.lookup, ms/hit, {entries:,} entries",
                              "<= 0.2 ms", lambda v, _: v <= 0.2, "{:.3f}", ratio=False))
               for i, entries in enumerate(cfg.lookup_entries)]
    for row in (cold, warm, procs, *lookups):
        row.values[STDLIB] = "n/a"
        if EL in cfg.peers:
            row.values[EL] = "n/a"

    base = tempfile.mkdtemp(prefix="executorkit-bench-")
    try:
        directory, log_path = os.path.join(base, "cache"), os.path.join(base, "executions.log")

        def measure_cold() -> float:
            value = cache_run(directory, log_path, n)
            report.note(f"fig 5a: {n} calls, {len(_lines(log_path)) - 1} executions logged")
            return value

        cold.values[EK] = attempt(report, "fig 5a", EK, measure_cold)

        def measure_warm() -> tuple[float, int]:
            executed = len(_lines(log_path))
            with ProcessWatch() as watch:
                times = repeated(lambda: cache_run(directory, log_path, n), cfg)
            lines = _lines(log_path)[executed:]
            started = watch.new | {int(pid) for pid in lines}
            report.note(f"fig 5b/5c: {len(times)} warm runs of {n} calls, ms/task: "
                        f"{_samples(times, '{:.3f}')} -> best; executions logged: "
                        f"{len(lines)}; new processes seen: {sorted(started) or 'none'}")
            return min(times), len(started)

        value = attempt(report, "fig 5b", EK, measure_warm)
        if isinstance(value, Failure):
            warm.values[EK] = procs.values[EK] = value
        else:
            warm.values[EK], procs.values[EK] = value

        for entries, row in zip(cfg.lookup_entries, lookups, strict=True):

            def measure_lookup(entries: int = entries, row: Row = row) -> float:
                per_hit, means = lookup_cost(base, entries, cfg.lookup_calls)
                report.note(f"fig {row.key}: {cfg.lookup_calls} random hits per round, us/hit: "
                            f"{_samples(means)} -> median")
                return per_hit

            row.values[EK] = attempt(report, f"fig {row.key}", EK, measure_lookup)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ----------------------------------------------------------------------------- figure 6
CANCEL_LIMIT = 20.0  # s: a shutdown(cancel_futures=True) slower than this counts as hanging


class Hang(Failure):
    """shutdown(cancel_futures=True) did not return while the gate was unfinished."""


def close_waiting(exe: Executor, gate: Future) -> float | Hang:
    """``shutdown(wait=True, cancel_futures=True)`` with waiting calls: its duration, or a
    :class:`Hang` if it needed the gate to be cancelled first (then the gate is cancelled,
    which fails the waiting calls instead of running them, and the shutdown is awaited)."""
    start = time.perf_counter()
    thread = threading.Thread(target=exe.shutdown, kwargs={"wait": True, "cancel_futures": True},
                              name="benchmark-shutdown", daemon=True)
    thread.start()
    thread.join(CANCEL_LIMIT)
    if not thread.is_alive():
        return time.perf_counter() - start
    gate.cancel()
    thread.join(10)
    after = "returned" if not thread.is_alive() else "was still blocked"
    return Hang(f"hangs (> {CANCEL_LIMIT:.0f} s; {after} after the gate was cancelled)")


def waiting_rate(peer: str, block: bool, n: int) -> tuple[float, float | Hang, int, str]:
    """Submit ``n`` calls waiting on one unfinished future, then shutdown(cancel_futures).
    Returns (submits/s, shutdown seconds, futures cancelled, what completing the gate did)."""
    exe = make_executor(peer, block)
    gate: Future = Future()
    futures: list[Future] = []
    try:
        warm_up(exe)
        gc.collect()
        start = time.perf_counter()
        futures = [exe.submit(inc, gate) for _ in range(n)]
        rate = n / (time.perf_counter() - start)
    finally:
        seconds = close_waiting(exe, gate)
    cancelled = sum(f.cancelled() for f in futures)
    if gate.done():
        return rate, seconds, cancelled, "the gate was cancelled to unblock the shutdown"
    start = time.perf_counter()
    gate.set_result(0)  # the end: the gate completes after everything was cancelled
    return rate, seconds, cancelled, f"completing the gate afterwards took " \
                                     f"{time.perf_counter() - start:.2f} s"


def traced_bytes(make: Callable[[], list[Any]]) -> tuple[float, list[Any]]:
    """Driver memory (tracemalloc) allocated by ``make()`` and still held afterwards."""
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    held = make()
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before, held


def waiting_memory(report: Report, peer: str, block: bool, n: int) -> float:
    """KiB of driver memory per call waiting on one unfinished future."""
    exe = make_executor(peer, block)
    gate: Future = Future()
    try:
        warm_up(exe)
        tracemalloc.start()
        try:
            size, futures = traced_bytes(lambda: [exe.submit(inc, gate) for _ in range(n)])
        finally:
            tracemalloc.stop()
        del futures
        return size / n / 1024
    finally:
        gate.cancel()  # the waiting calls fail at once; the shutdown is timed in waiting_rate
        try:
            shutdown(exe, cancel=True, timeout=10 + n * 1e-4)
        except TimeoutError as exc:
            report.warn(f"{peer}, after the memory measurement: {exc} (given up)")


def bare_future_kib(n: int) -> float:
    tracemalloc.start()
    try:
        size, futures = traced_bytes(lambda: [Future() for _ in range(n)])
    finally:
        tracemalloc.stop()
    del futures
    return size / n / 1024


def figure_6(report: Report) -> None:
    cfg = report.config
    n = cfg.waiting
    bare = report.add(Row("6", "bare concurrent.futures.Future, KiB (reference)", "-", None,
                          "{:.2f}", ratio=False))
    bare.values[EK] = "n/a"
    bare.values[STDLIB] = attempt(report, "fig 6", "bare Future", lambda: bare_future_kib(n))
    if EL in cfg.peers:
        bare.values[EL] = "n/a"
    rows: dict[str, tuple[Row, Row, Row]] = {}
    for key, block in (("6a", False), ("6b", True)):
        mode = "block" if block else "per-task"
        rate = report.add(Row(key, f"submits/s waiting on a future, {mode}", ">= 50,000/s",
                              lambda v, _: v >= 50_000, "{:,.0f}", ratio=False))
        memory = report.add(Row(f"{key}'", "  driver KiB per waiting task", "<= 2.5 KiB",
                                lambda v, _: v <= 2.5, "{:.2f}", ratio=False))
        cancel = report.add(Row(f"{key}''", f"  shutdown(cancel_futures=True) of {n:,}, s",
                                "<= 1 s (informal)", lambda v, _: v <= 1.0, "{:.2f}",
                                ratio=False))
        for row in (rate, memory, cancel):
            row.values[STDLIB] = "n/a (no deps)"
        rows[key] = rate, memory, cancel
    # executorlib last: its threads stay blocked (and polling) after this figure
    for peer in (p for p in cfg.peers if p != STDLIB):
        for key, block in (("6a", False), ("6b", True)):
            rate, memory, cancel = rows[key]

            def measure_rate(peer: str = peer, block: bool = block,
                             key: str = key) -> tuple[float, float | Hang]:
                submits, seconds, cancelled, gate = waiting_rate(peer, block, n)
                took = f"{seconds:.2f} s" if _number(seconds) else seconds
                report.note(f"fig {key}, {peer}: {n} submits at {submits:,.0f}/s; shutdown "
                            f"with cancel_futures: {took}, {cancelled} of {n} futures "
                            f"cancelled; {gate}")
                if cancelled != n:
                    report.warn(f"fig {key}, {peer}: only {cancelled} of {n} waiting futures "
                                f"were cancelled by shutdown(cancel_futures=True)")
                return submits, seconds

            value = attempt(report, f"fig {key}", peer, measure_rate)
            if isinstance(value, Failure):
                rate.values[peer] = cancel.values[peer] = value
            else:
                rate.values[peer], cancel.values[peer] = value

            def measure_memory(peer: str = peer, block: bool = block, key: str = key) -> float:
                kib = waiting_memory(report, peer, block, n)
                report.note(f"fig {key}', {peer}: {kib:.2f} KiB per waiting task "
                            f"(tracemalloc, {n} tasks, separate executor)")
                return kib

            memory.values[peer] = attempt(report, f"fig {key}'", peer, measure_memory)


# ----------------------------------------------------------------------------- output
COLUMNS = ("figure", EK, STDLIB, EL, "ratio vs stdlib", "target", "pass/fail")


def table_rows(report: Report) -> list[list[str]]:
    return [[f"{row.key} {row.label}", row.cell(EK), row.cell(STDLIB), row.cell(EL),
             row.ratio_cell(), row.target, row.verdict()] for row in report.rows]


def text_table(report: Report) -> str:
    rows = [list(COLUMNS), *table_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for index, row in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append(" | ".join(cells).rstrip())
        if index == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(report: Report, meta: dict[str, Any]) -> str:
    out = [f"## Results of `python benchmarks/run.py{' --quick' if report.config.quick else ''}`",
           "", *(f"- {k}: {v}" for k, v in meta.items()), "",
           "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
            for row in table_rows(report)]
    out += ["", "Ratio: executorkit / ProcessPoolExecutor (for ms rows lower is better).", "",
            "### Details", "", "```", *report.details, "```"]
    if report.warnings:
        out += ["", "### Warnings", "", *(f"- {w}" for w in report.warnings)]
    return "\n".join(out) + "\n"


def as_json(report: Report, meta: dict[str, Any]) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        return value if _number(value) or value is None else str(value)

    return {
        "meta": meta,
        "rows": [{"key": r.key, "label": r.label.strip(), "target": r.target,
                  "values": {p: plain(r.values.get(p, "n/a")) for p in PEERS},
                  "ratio_vs_stdlib": r.ratio_cell(), "verdict": r.verdict()}
                 for r in report.rows],
        "details": report.details,
        "warnings": report.warnings,
    }


# ----------------------------------------------------------------------------- clean-up
def stop_multiprocessing_helpers() -> None:
    """The stdlib's forkserver and resource tracker live until interpreter exit; stop them
    now so the check below sees only what the executors left behind."""
    for module, name in (("multiprocessing.forkserver", "_forkserver"),
                         ("multiprocessing.resource_tracker", "_resource_tracker")):
        with contextlib.suppress(Exception):
            getattr(importlib.import_module(module), name)._stop()


def leftover_processes(grace: float = 10.0) -> list[str]:
    """Kill (by pid) descendants still alive ``grace`` seconds after the last shutdown."""
    me = psutil.Process()
    deadline = time.monotonic() + grace
    while True:
        alive = []
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    found = []
    for child in alive:
        with contextlib.suppress(psutil.Error):
            found.append(f"{child.pid} {' '.join(child.cmdline())[:100]}")
            child.kill()
    return found


# ----------------------------------------------------------------------------- main
def executorlib_version() -> str | None:
    try:
        import executorlib
    except Exception:
        return None
    return getattr(executorlib, "__version__", "unknown")


def mpi_ranks() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


def figure_7(report: Report) -> None:
    """Round trip of a 2-rank MPI call (issue: executorlib measured about 0.2 s here)."""
    from executorkit.launchers.local import find_mpiexec

    rows = {block: report.add(Row(f"7{'b' if block else 'a'}",
                                  f"2-rank MPI call, ms, {'block' if block else 'per-task'}",
                                  "info (executorlib here: ~200 ms)", None, "{:.1f}",
                                  ratio=False)) for block in (False, True)}
    if find_mpiexec() is None:
        for row in rows.values():
            row.values[EK] = "n/a (no mpiexec)"
        return
    n = 5 if report.config.quick else 20
    for block, row in rows.items():

        def measure(block: bool = block) -> float:
            kwargs: dict[str, Any] = {"max_cores": 2}
            per_call: dict[str, Any] | None = {"cores": 2}
            if block:
                kwargs.update(block_allocation=True, resource_dict={"cores": 2})
                per_call = None
            with executorkit.SingleNodeExecutor(**kwargs) as exe:
                assert exe.submit(mpi_ranks, resource_dict=per_call).result(timeout=120) == [0, 1]
                start = time.perf_counter()
                for _ in range(n):
                    exe.submit(mpi_ranks, resource_dict=per_call).result(timeout=120)
                return (time.perf_counter() - start) / n * 1e3

        row.values[EK] = attempt(report, f"fig {row.key}", EK, measure)


def slurm_inner() -> None:
    """Inside an allocation: tiny calls through SlurmJobExecutor (figure 8)."""
    import json

    out = {}
    for block, n in ((False, 40), (True, 2000)):
        kwargs: dict[str, Any] = {"max_workers": 2, "block_allocation": block}
        with executorkit.SlurmJobExecutor(**kwargs) as exe:
            wait_all([exe.submit(inc, i) for i in range(4)], 300)
            start = time.perf_counter()
            wait_all([exe.submit(inc, i) for i in range(n)], 600)
            out["block" if block else "per-task"] = n / (time.perf_counter() - start)
    print("SLURM " + json.dumps(out), flush=True)


def figure_8(report: Report) -> None:
    """Tiny calls per second through SlurmJobExecutor, started inside ``salloc``."""
    import json
    import shutil
    import subprocess

    rows = {mode: report.add(Row(f"8{'a' if mode == 'per-task' else 'b'}",
                                 f"SlurmJobExecutor tiny tasks/s, {mode}", "info", None,
                                 "{:,.1f}", ratio=False)) for mode in ("per-task", "block")}
    if shutil.which("salloc") is None:
        for row in rows.values():
            row.values[EK] = "n/a (no Slurm)"
        return

    def measure() -> dict[str, float]:
        proc = subprocess.run(["salloc", "-n", "2", "--time=10", sys.executable,
                               os.path.abspath(__file__), "--slurm-inner"],
                              capture_output=True, text=True, timeout=900)
        for line in proc.stdout.splitlines():
            if line.startswith("SLURM "):
                return json.loads(line[6:])
        raise RuntimeError(f"salloc run failed: {proc.stderr.strip()[-300:]}")

    result = attempt(report, "fig 8", EK, measure)
    for mode, row in rows.items():
        row.values[EK] = result[mode] if isinstance(result, dict) else result


# ----------------------------------------------------------------------------- figure 9, 10
def real_function(name: str) -> Callable[[int], Any]:
    """A task function from a module of its own (npfuncs imports numpy and scipy)."""
    module = "purefuncs" if name == "spin" else "npfuncs"
    return getattr(importlib.import_module(module), name)


@contextlib.contextmanager
def imported_by_the_script(fn: Callable[..., Any]) -> Iterator[None]:
    """While a row of figures 10/11 runs, ``fn`` is named in this script's namespace, as
    ``from npfuncs import trivial`` at the top of a user's script names it (executorkit's
    default ``preload="auto"`` imports such modules in its fork server). Taken away after,
    so the other figures keep a script that imports neither numpy nor scipy."""
    main = sys.modules["__main__"]
    name = f"_bench_{fn.__name__}"
    setattr(main, name, fn)
    try:
        yield
    finally:
        delattr(main, name)


def first_round(peer: str, block: bool, fn: Callable[[int], Any], n: int,
                splits: list[str] | None = None, **kwargs: Any) -> float:
    """Calls/s of ``n`` calls of ``fn`` on a fresh executor whose workers are up (warmed
    with ``inc``) but have never seen ``fn``: the first round a user's campaign gets.
    ``splits``: gets the round's CPU split (see CpuSplit)."""
    with imported_by_the_script(fn), running(peer, block, **kwargs) as exe:
        warm_up(exe)
        start = time.perf_counter()
        with CpuSplit() as split:
            futures = [exe.submit(fn, i) for i in range(n)]
            results = wait_all(futures, timeout_for(peer, n))
        elapsed = time.perf_counter() - start
        if splits is not None:
            splits.append(split.text(n))
    if results != [fn(i) for i in range(n)]:
        raise AssertionError(f"wrong results of {fn.__name__}")
    return n / elapsed


def real_rows(report: Report, key: str, label: str, target: str,
              check: Callable[[float, dict[str, Any]], bool], block: bool, fn_name: str,
              sizes: dict[str, int]) -> Row:
    """One row: the median over fresh executors of the first round's calls/s."""
    row = report.add(Row(key, label, target, check, "{:,.0f}"))
    cpu = None if block else cpu_row(report, key)
    fn = real_function(fn_name)
    for peer in report.config.peers:
        n = sizes.get(peer, sizes[EK])

        def measure(peer: str = peer, n: int = n) -> float:
            splits: list[str] | None = [] if cpu is not None and peer == EK else None
            rates = repeated(lambda: first_round(peer, block, fn, n, splits), report.config)
            report.note(f"fig {key}, {peer}: {fn_name}, N={n}, first-round calls/s on fresh "
                        f"executors: {_samples(rates)} -> median")
            if cpu is not None and splits:
                median = sorted(range(len(rates)), key=rates.__getitem__)[len(rates) // 2]
                cpu.values[peer] = splits[median]
                report.note(f"fig {key}, {peer}: CPU ms per call, driver / fork server / "
                            f"workers, per round: {'; '.join(splits)}")
            return sorted(rates)[len(rates) // 2]

        row.values[peer] = attempt(report, f"fig {key}", peer, measure)
    return row


def figure_10(report: Report) -> None:
    """Per-task calls of a function whose module imports numpy and scipy (issue 10.14)."""
    cfg = report.config
    n = 100 if cfg.quick else 400
    sizes = {EK: n, STDLIB: max(10, n // (4 * cfg.stdlib_per_task_divisor)), EL: n // 10}
    real_rows(report, "10", "numpy/scipy-module calls/s, per-task process", ">= 200/s",
              lambda v, _: v >= 200, False, "trivial", sizes)


def figure_11(report: Report) -> None:
    """Block allocation on real functions, first round, against the stdlib (issue 13)."""
    n = 1000 if report.config.quick else 3000
    sizes = {EK: n, STDLIB: n, EL: n}
    rows: dict[str, Row] = {}
    ratio = (">= 1.2 x stdlib",
             lambda v, vals: _number(vals.get(STDLIB)) and v >= 1.2 * vals[STDLIB])
    for key, label, name in (
            ("11a", "numpy/scipy module: trivial (x + 1)", "trivial"),
            ("11b", "numpy/scipy module: float(np.arange(4.0).sum() * x)", "np_sum"),
            ("11c", "numpy/scipy module: scipy.linalg.norm", "scipy_norm"),
            ("11d", "pure-Python loop, ~40 us per call", "spin")):
        rows[key] = real_rows(report, key, f"block calls/s, {label}", *ratio, True, name,
                              sizes)
    # The same first round as 10a with the module imported by the fork server beforehand
    # (SingleNodeExecutor(preload=...)), so the workers do not import numpy and scipy
    # during the round; the stdlib column repeats 10a's.
    row = report.add(Row("11e", "block calls/s, 11a with preload=['npfuncs']", *ratio,
                         "{:,.0f}"))
    row.values[STDLIB] = rows["11a"].values.get(STDLIB, "n/a")
    fn = real_function("trivial")

    def measure() -> float:
        rates = repeated(lambda: first_round(EK, True, fn, n, preload=["npfuncs"]),
                         report.config)
        report.note(f"fig 11e, {EK}: trivial, N={n}, preload=['npfuncs'], first-round "
                    f"calls/s on fresh executors: {_samples(rates)} -> median")
        return sorted(rates)[len(rates) // 2]

    row.values[EK] = attempt(report, "fig 11e", EK, measure)
# ----------------------------------------------------------------------------- figure 9
def flux_raw_rate(command: list[str], n: int) -> float:
    """Jobs per second of ``flux submit --cc=1-n --wait COMMAND`` in this instance."""
    import subprocess

    start = time.perf_counter()
    subprocess.run(["flux", "submit", "--quiet", f"--cc=1-{n}", "--wait", *command],
                   check=True, capture_output=True, timeout=900)
    return n / (time.perf_counter() - start)


def flux_executor(peer: str, block: bool, **kwargs: Any) -> Executor:
    if peer == EK:
        return executorkit.FluxJobExecutor(max_workers=WORKERS, block_allocation=block,
                                           **kwargs)
    import executorlib

    return executorlib.FluxJobExecutor(max_workers=WORKERS, block_allocation=block, **kwargs)


def flux_figures(peer: str, quick: bool) -> dict[str, float]:
    """Per call and block-allocation throughput and chains, and a 2-rank MPI call."""
    out: dict[str, float] = {}
    for block in (False, True):
        mode = "block" if block else "per-call"
        n, steps = ((3000 if not quick else 500), 500) if block else ((200 if not quick else 40),
                                                                      (40 if not quick else 10))
        exe = flux_executor(peer, block)
        try:
            warm_up(exe, 300)
            out[f"{mode} calls/s"] = max(repeated(
                lambda exe=exe, n=n: tasks_per_second(exe, n, 900), Config.make(quick, ())))
            out[f"{mode} chain ms"] = min(repeated(
                lambda exe=exe, steps=steps: chain_of_futures(exe, steps, 900),
                Config.make(quick, ())))
        finally:
            shutdown(exe, cancel=True, timeout=120)
    kwargs: dict[str, Any] = {"max_cores": 2}
    if peer == EK:
        exe = executorkit.FluxJobExecutor(**kwargs)
    else:
        import executorlib

        exe = executorlib.FluxJobExecutor(**kwargs)
    try:
        res = {"cores": 2}
        assert exe.submit(mpi_ranks, resource_dict=res).result(timeout=300) == [0, 1]
        times = []
        for _ in range(3 if quick else 10):
            start = time.perf_counter()
            exe.submit(mpi_ranks, resource_dict=res).result(timeout=300)
            times.append(time.perf_counter() - start)
        out["mpi s"] = min(times)
    finally:
        shutdown(exe, cancel=True, timeout=120)
    return out


def figure_9(report: Report) -> None:
    """FluxJobExecutor inside a Flux instance, next to Flux's own submit rate."""
    specs = [("9a", "Flux raw: flux submit true, jobs/s", "info", None, "{:,.1f}"),
             ("9b", "Flux raw: python -c pass jobs, jobs/s", "info", None, "{:,.1f}"),
             ("9c", "FluxJobExecutor tiny calls/s, per call", ">= 20/s",
              lambda v, _: v >= 20, "{:,.1f}"),
             ("9d", "FluxJobExecutor chain, ms/step, per call", "<= 80 ms",
              lambda v, _: v <= 80, "{:.1f}"),
             ("9e", "FluxJobExecutor tiny calls/s, block", ">= 10,000/s",
              lambda v, _: v >= 10_000, "{:,.0f}"),
             ("9f", "FluxJobExecutor chain, ms/step, block", "<= 0.5 ms",
              lambda v, _: v <= 0.5, "{:.3f}"),
             ("9g", "FluxJobExecutor 2-rank MPI call, s", "<= 0.25 s",
              lambda v, _: v <= 0.25, "{:.3f}")]
    rows = [report.add(Row(k, label, target, check, fmt, ratio=False))
            for k, label, target, check, fmt in specs]
    if not os.environ.get("FLUX_URI"):
        for row in rows:
            row.values[EK] = "n/a (run inside flux start)"
        return
    quick = report.config.quick
    n = 60 if quick else 300
    rows[0].values[EK] = attempt(report, "fig 9a", "flux", lambda: flux_raw_rate(["true"], n))
    rows[1].values[EK] = attempt(report, "fig 9b", "flux", lambda: flux_raw_rate(
        [sys.executable, "-c", "pass"], n // 3))
    keys = ["per-call calls/s", "per-call chain ms", "block calls/s", "block chain ms", "mpi s"]
    for peer in (p for p in report.config.peers if p != STDLIB):
        result = attempt(report, "fig 9", peer, lambda peer=peer: flux_figures(peer, quick))
        for row, key in zip(rows[2:], keys, strict=True):
            row.values[peer] = result[key] if isinstance(result, dict) else result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under a minute)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="also write a Markdown report")
    parser.add_argument("--no-executorlib", action="store_true",
                        help="skip executorlib even if it is installed")
    parser.add_argument("--slurm-inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--figures", default="1,2,3,4,5,6,7,8,9,10,11,C",
                        help="comma-separated figures to run (default: all)")
    args = parser.parse_args(argv)
    if args.slurm_inner:
        slurm_inner()
        return 0
    figures = {"1": figure_1, "2": figure_2, "3": figure_3, "4": figure_4, "5": figure_5,
               "6": figure_6, "7": figure_7, "8": figure_8, "9": figure_9, "10": figure_10,
               "11": figure_11, "C": figure_c}
    try:
        chosen = [figures[f.strip()] for f in args.figures.split(",") if f.strip()]
    except KeyError as exc:
        parser.error(f"unknown figure {exc}; choose from {', '.join(figures)}")

    el_version = None if args.no_executorlib else executorlib_version()
    peers = (EK, STDLIB, EL) if el_version else (EK, STDLIB)
    config = Config.make(args.quick, peers)
    report = Report(config)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "python": platform.python_version(),
        "executorkit": executorkit.__version__,
        "executorlib": el_version or "not installed",
        "cpus": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "max_workers": WORKERS,
        "task": f"{inc.__module__}.inc (x + 1)",
    }
    progress(" ".join(f"{k}={v}" for k, v in meta.items()))
    started = time.perf_counter()
    for name in ("json", "markdown"):  # named from where the user ran us
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    with scratch_cwd():
        for figure in chosen:
            figure(report)
    stop_multiprocessing_helpers()
    leftovers = leftover_processes()
    if leftovers:
        report.warn(f"child processes still alive after every shutdown (killed): {leftovers}")
    meta["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["duration"] = f"{time.perf_counter() - started:.0f} s"

    print(text_table(report))
    print("\nratio: executorkit / ProcessPoolExecutor (for ms rows lower is better); "
          f"{meta['mode']} run, {meta['duration']}, load average {meta['load average at start']}"
          f" -> {meta['load average at end']}")
    for warning in report.warnings:
        print(f"WARNING: {warning}")
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown(report, meta))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(as_json(report, meta), out, indent=2)
    return 0


def exit_now(code: int) -> None:
    """Exit even if an executor left a non-daemon thread blocked (the interpreter would wait
    for it forever); the child processes were already killed by :func:`leftover_processes`."""
    stuck = [t for t in threading.enumerate()
             if t is not threading.current_thread() and not t.daemon and t.is_alive()]
    deadline = time.monotonic() + 10
    for thread in stuck:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in stuck if t.is_alive()]
    if stuck:
        print(f"WARNING: threads still blocked at exit: {stuck}; exiting anyway", flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_now(main())
