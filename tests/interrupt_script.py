"""Run by test_interrupt.py: ``python interrupt_script.py MODE STYLE DIR``.

Starts long calls (each says so with a file in DIR, then sleeps), waits for their results
and is interrupted by the test with SIGINT. STYLE ``with`` waits inside a ``with`` block,
``plain`` without one (the executor is left to the interpreter's exit).
"""

from __future__ import annotations

import os
import sys
import time

from executorkit import SingleNodeExecutor

MODES = {
    # executor keyword arguments, per-call resource_dict, calls started at once
    "per-task": ({"max_workers": 2}, None, 2),
    "block": ({"max_workers": 2, "block_allocation": True}, None, 2),
    "mpi": ({"max_cores": 2}, {"cores": 2}, 1),
    "mpi-block": ({"max_cores": 2, "block_allocation": True, "resource_dict": {"cores": 2}},
                  None, 1),
}


def long_call(directory: str, name: str) -> None:
    path = os.path.join(directory, f"{name}.{os.getpid()}.started")
    with open(path, "w"):
        pass
    time.sleep(600)


def run(exe: SingleNodeExecutor, directory: str, per_call: dict | None, running: int) -> None:
    # two more than can run: they wait, and must be cancelled rather than started
    futures = [exe.submit(long_call, directory, f"c{i}", resource_dict=per_call)
               for i in range(running + 2)]
    for fut in futures:
        fut.result()


def main() -> None:
    mode, style, directory = sys.argv[1:]
    kwargs, per_call, running = MODES[mode]
    if style == "with":
        with SingleNodeExecutor(**kwargs) as exe:
            run(exe, directory, per_call, running)
    else:
        run(SingleNodeExecutor(**kwargs), directory, per_call, running)


if __name__ == "__main__":
    main()
