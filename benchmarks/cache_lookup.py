"""Measure the cost of cache lookups and of get_cache_data.

    python benchmarks/cache_lookup.py    # 2,000 and 20,000 entries, get_cache_data at 10,000
    python benchmarks/cache_lookup.py --entries 2000 --frame 0 --dir /scratch/bench

For each directory size it writes that many real entries (``CacheStore.write``, keys from
``compute_key``, a small dict as output), then times ``CacheStore.lookup`` on random stored
keys (hits, including unpickling) and on absent keys (misses), and reports the median over
several rounds of the mean cost per call.  ``get_cache_data`` (``--frame`` entries) is timed
three times: the first listing after the writes (entries come from the journal the writes
appended to, and the directory's catalogue is written), then with and without outputs
(unchanged entries come from the catalogue).  The page cache is warm: this measures the
library, not the disk.  Directories are created under ``--dir`` (default: a temporary
directory) and removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time

import cloudpickle

from executorkit.cache import CacheRecord, CacheStore, compute_key, get_cache_data


def task(x: int, scale: float = 1.0) -> dict[str, float]:
    return {"x": x * scale, "y": x**2 * scale}


def _no_futures(fut: object) -> str:
    raise AssertionError("no futures in this benchmark")


def fill(store: CacheStore, count: int) -> list[str]:
    keys = []
    pickled_task = cloudpickle.dumps(task)
    for index in range(count):
        key = compute_key(task, (index,), {"scale": 2.0}, future_key=_no_futures)
        now = time.time()
        store.write(
            CacheRecord(
                key=key, function_name=f"{__name__}.task", function=pickled_task,
                args=cloudpickle.dumps((index,)), kwargs=cloudpickle.dumps({"scale": 2.0}),
                resource_dict={"cores": 1}, status="done",
                output=cloudpickle.dumps(task(index, 2.0)), error=None, error_text=None,
                started=now - 0.5, finished=now, hostname=socket.gethostname(), pid=os.getpid(),
            )
        )
        keys.append(key)
    return keys


def time_per_call(store: CacheStore, keys: list[str], rounds: int) -> tuple[float, list[float]]:
    """Median and all per-round means of the lookup cost, in microseconds."""
    means = []
    for _ in range(rounds):
        start = time.perf_counter()
        for key in keys:
            store.lookup(key)
        means.append((time.perf_counter() - start) / len(keys) * 1e6)
    return statistics.median(means), means


def bench_lookup(base: str, count: int, calls: int, rounds: int) -> None:
    directory = os.path.join(base, f"entries-{count}")
    store = CacheStore(directory)
    start = time.perf_counter()
    keys = fill(store, count)
    print(f"{count} entries: written in {time.perf_counter() - start:.1f} s")
    rng = random.Random(0)
    hits = [rng.choice(keys) for _ in range(calls)]
    assert all(store.lookup(key)[0] for key in hits[:100])
    misses = [f"absent_{index:064x}" for index in range(calls)]
    median, means = time_per_call(store, hits, rounds)
    print(f"  hit : {median:7.1f} us per lookup (rounds: {', '.join(f'{m:.1f}' for m in means)})")
    median, means = time_per_call(store, misses, rounds)
    print(f"  miss: {median:7.1f} us per lookup (rounds: {', '.join(f'{m:.1f}' for m in means)})")
    shutil.rmtree(directory)


def bench_frame(base: str, count: int) -> None:
    directory = os.path.join(base, f"frame-{count}")
    fill(CacheStore(directory), count)
    import pandas  # noqa: F401  (its import is not part of any figure)

    # The first listing after the entries were written takes them from the journal (and
    # writes the directory's catalogue); the next ones take them from the catalogue.
    time_frame(directory, count, load_outputs=False, label="first listing, ")
    for load_outputs in (True, False):
        time_frame(directory, count, load_outputs=load_outputs, label="")
    shutil.rmtree(directory)


def time_frame(directory: str, count: int, *, load_outputs: bool, label: str) -> None:
    # CPU time too: on a shared machine the wall time mostly measures the neighbours.
    start, cpu = time.perf_counter(), time.process_time()
    frame = get_cache_data(directory, load_outputs=load_outputs)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert len(frame) == count
    print(f"get_cache_data({label}{count} entries, load_outputs={load_outputs}): {elapsed:.2f} "
          f"s ({elapsed / count * 1e6:.0f} us per entry), {cpu:.2f} s CPU")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, nargs="*", default=[2000, 20000])
    parser.add_argument("--calls", type=int, default=5000, help="lookups per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frame", type=int, default=10000, help="entries for get_cache_data")
    parser.add_argument("--dir", default=None, help="where to create the cache directories")
    args = parser.parse_args(argv)
    import h5py

    print(f"python {sys.version.split()[0]}, h5py {h5py.__version__}, "
          f"HDF5 {h5py.version.hdf5_version}")
    base = tempfile.mkdtemp(prefix="executorkit-bench-", dir=args.dir)
    try:
        for count in args.entries:
            bench_lookup(base, count, args.calls, args.rounds)
        if args.frame:
            bench_frame(base, args.frame)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
