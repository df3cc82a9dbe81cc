"""A small workflow to see executorkit work: ``python -m executorkit.demo``.

A parameter sweep feeds a reduction (futures as arguments), calls ask for their own
resources, one call fails on purpose and its dependent reports why, and a second run of the
same sweep is answered from the cache without starting a single process.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

from executorkit import SingleNodeExecutor, get_cache_data
from executorkit.errors import DependencyError


def simulate(x: float) -> float:
    """Stand-in for a simulation."""
    time.sleep(0.05)
    return math.sin(x) * x


def threads_and_cpus() -> tuple[str | None, int]:
    return os.environ.get("OMP_NUM_THREADS"), len(os.sched_getaffinity(0))


def total(values: list[float]) -> float:
    return sum(values)


def unstable(x: float) -> float:
    raise ArithmeticError(f"diverged at x={x}")


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        for attempt in ("first run", "second run (from the cache)"):
            t0 = time.perf_counter()
            with SingleNodeExecutor(max_workers=2, cache_directory=cache) as exe:
                points = [exe.submit(simulate, 0.5 * i) for i in range(8)]
                reduced = exe.submit(total, points)  # waits for all eight
                print(f"{attempt}: sum = {reduced.result(timeout=120):.4f} "
                      f"in {time.perf_counter() - t0:.2f} s")
        frame = get_cache_data(cache)
        print(f"cache holds {len(frame)} results:")
        print(frame[["function_name", "input_args", "output", "runtime"]].head(4).to_string())

    with SingleNodeExecutor(max_cores=2) as exe:
        wide = exe.submit(threads_and_cpus, resource_dict={"threads_per_core": 2})
        print("a call with threads_per_core=2 sees (OMP_NUM_THREADS, CPUs):",
              wide.result(timeout=120))
        bad = exe.submit(unstable, 1.5)
        after = exe.submit(total, [bad, 1.0])
        try:
            after.result(timeout=120)
        except DependencyError as err:
            print(f"dependent call failed: {err}\n  because: {err.__cause__!r}")


if __name__ == "__main__":
    main()
