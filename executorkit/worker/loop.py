"""The worker: connect to the driver, say hello, run calls until told to stop.

A per-task worker runs one call and exits; a persistent worker (``block_allocation``) runs
``init_function`` once and then serves calls until it receives :class:`Stop` or the driver
goes away.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
from collections.abc import Mapping
from typing import Any

from executorkit.transport import Hello, InitFailed, RunTask, Stop, connect
from executorkit.worker import _call


def serve(address: tuple[str, int], secret: bytes, worker_id: int, *, persistent: bool,
          init_payload: bytes | None = None, setup: _call.TaskSetup | None = None) -> int:
    """Serve calls; returns the process exit code."""
    chan = connect(address, secret)
    chan.send(Hello(worker_id, os.getpid(), socket.gethostname()))
    init_values: Mapping[str, Any] | None = None
    if init_payload is not None:
        try:
            init_values = pickle.loads(init_payload)()
            if not isinstance(init_values, Mapping):
                raise TypeError(
                    f"init_function must return a dict, returned {type(init_values).__name__}"
                )
        except BaseException as exc:
            chan.send(InitFailed(_call.error_info(exc)))
            return 3
    while True:
        try:
            msg = chan.recv()
        except (EOFError, ConnectionError):
            return 0
        if isinstance(msg, Stop):
            return 0
        assert isinstance(msg, RunTask), f"unexpected message {type(msg).__name__}"
        if setup is not None and msg.setup is None:
            msg.setup = setup
        chan.send(_call.run(msg, init_values))
        if not persistent:
            return 0


def _main() -> None:  # pragma: no cover - used by launchers that start a fresh interpreter
    boot = pickle.loads(sys.stdin.buffer.read())
    sys.exit(serve(boot["address"], boot["secret"], boot["worker_id"],
                   persistent=boot["persistent"], init_payload=boot.get("init_payload")))


if __name__ == "__main__":
    _main()
