"""Peak driver memory of two streaming patterns, executorkit against ProcessPoolExecutor.

    python benchmarks/memory.py                  # 10,000 x 1 MiB results, 1,000 x 16 MB argument
    python benchmarks/memory.py --quick          # 2,000 results, 200 calls
    python benchmarks/memory.py --cases results  # one case only

``results``: stream results of 1 MiB each, keeping 8 calls in flight and dropping every
future right after ``result()`` (a campaign that consumes its results as they come).

``argument``: submit calls that all take the *same* 16 MB numpy array, then wait for all
of them (a sweep over one large input).

Every (case, executor) runs in a fresh interpreter, so the figure is that driver's own peak
resident size (``ru_maxrss`` of the process, workers not included); the baseline is the
peak of the same interpreter after imports, before the first submit.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections import deque

WORKERS = 2
EXECUTORS = ("executorkit per-task", "executorkit block", "ProcessPoolExecutor")


def make_result(nbytes: int) -> bytes:
    return bytes(nbytes)


def total(arr) -> int:  # (a numpy array)
    return int(arr.nbytes)


def _executor(name: str):
    if name == "ProcessPoolExecutor":
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(WORKERS)
    from executorkit import SingleNodeExecutor

    return SingleNodeExecutor(max_workers=WORKERS, block_allocation=name.endswith("block"))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case_results(exe, n: int) -> None:
    in_flight: deque = deque()
    for _ in range(n):
        in_flight.append(exe.submit(make_result, 1 << 20))
        if len(in_flight) >= 8:
            assert len(in_flight.popleft().result(timeout=600)) == 1 << 20
    while in_flight:
        in_flight.popleft().result(timeout=600)


def case_argument(exe, n: int) -> None:
    import numpy as np

    arr = np.ones(2 * 1024 * 1024)  # 16 MiB
    futures = [exe.submit(total, arr) for _ in range(n)]
    for fut in futures:
        assert fut.result(timeout=600) == arr.nbytes


def child(case: str, name: str, n: int) -> None:
    if case == "argument":
        import numpy  # noqa: F401 - part of the baseline, not of the figure
    exe = _executor(name)
    exe.submit(make_result, 1).result(timeout=120)  # workers up: part of the baseline
    base = _peak_mib()
    start = time.perf_counter()
    {"results": case_results, "argument": case_argument}[case](exe, n)
    seconds = time.perf_counter() - start
    exe.shutdown()
    print(json.dumps({"peak_mib": _peak_mib(), "base_mib": base, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", default="results,argument")
    parser.add_argument("--executors", default=",".join(EXECUTORS))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, name, n = args.child
        child(case, name, int(n))
        return
    sizes = {"results": 2000 if args.quick else 10_000, "argument": 200 if args.quick else 1000}
    print(f"{'case':<10} {'executor':<22} {'calls':>6} {'peak MiB':>9} {'growth MiB':>11} "
          f"{'s':>6}")
    for case in args.cases.split(","):
        for name in args.executors.split(","):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", case, name, str(sizes[case])],
                capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                print(f"{case:<10} {name:<22} error: {proc.stderr.strip()[-300:]}")
                continue
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{case:<10} {name:<22} {sizes[case]:>6} {out['peak_mib']:>9.0f} "
                  f"{out['peak_mib'] - out['base_mib']:>11.0f} {out['seconds']:>6.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
