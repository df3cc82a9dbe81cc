"""Time and peak driver memory to fail a long dependency chain (issue: DependencyError text).

    python benchmarks/failed_chain.py 5000
    python benchmarks/failed_chain.py 20000

A chain of N calls waits on a plain Future that then fails; every link must fail with a
short DependencyError naming the root failure once.
"""

from __future__ import annotations

import concurrent.futures as cf
import resource
import sys
import time

from executorkit import SingleNodeExecutor


def inc(x: int) -> int:
    return x + 1


def main(n: int) -> None:
    with SingleNodeExecutor(max_workers=1, block_allocation=True) as exe:
        gate: cf.Future[int] = cf.Future()
        futures = [exe.submit(inc, gate)]
        for _ in range(n - 1):
            futures.append(exe.submit(inc, futures[-1]))
        start = time.perf_counter()
        gate.set_exception(RuntimeError("boom"))
        err = futures[-1].exception(timeout=600)
        elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"links={n} failed in {elapsed:.2f} s, last message {len(str(err))} chars, "
          f"peak driver RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
