"""The worker: connect to the driver, say hello, run calls until told to stop.

A per-task worker runs one call and exits; a persistent worker (``block_allocation``) runs
``init_function`` once and then serves calls until it receives :class:`Stop` or the driver
goes away.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import socket
import sys
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

from executorkit import _syspath
from executorkit.transport import FrameReader, Hello, InitFailed, RunTask, Stop, connect, encode
from executorkit.worker import _call

DRIVER_GONE = 75  # exit code of a worker whose driver went away (EX_TEMPFAIL)


def exit_without_driver(sock: socket.socket) -> None:
    """Exit at once, even in the middle of a call, when the driver's end of ``sock`` closes.

    A worker busy with a call does not read its socket, so it would not notice a driver
    that was killed: its Slurm step (or Flux job) would run on until the allocation ends.
    A thread waits for the hang-up instead (the kernel closes the driver's sockets however
    it dies; TCP keep-alive covers a lost node). The exit code is non-zero, so srun and
    mpiexec stop the other ranks too.
    """
    def watch() -> None:
        poller = select.poll()
        poller.register(sock, getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR)
        with contextlib.suppress(OSError, ValueError):
            while not poller.poll():
                pass
        _call._flush()
        os._exit(DRIVER_GONE)

    threading.Thread(target=watch, name="executorkit-driver-watch", daemon=True).start()


def serve(address: tuple[str, int], secret: bytes, worker_id: int, *, persistent: bool,
          init_payload: bytes | None = None, setup: _call.TaskSetup | None = None) -> int:
    """Serve calls; returns the process exit code."""
    chan = connect(address, secret)
    exit_without_driver(chan.sock)
    init_values: Mapping[str, Any] | None = None
    if init_payload is not None:
        # Hello only once init_function is done: the engine starts a call's clock (and
        # counts the worker as up) when the worker says hello.
        try:
            init_function = pickle.loads(init_payload)
            init_values = init_function(**_call.inject_worker_id(init_function, (), {}))
            if not isinstance(init_values, Mapping):
                raise TypeError(
                    f"init_function must return a dict, returned {type(init_values).__name__}"
                )
        except BaseException as exc:
            chan.send(InitFailed(_call.error_info(exc)))
            return 3
    chan.send(Hello(worker_id, os.getpid(), socket.gethostname()))
    # Read whatever has arrived in one system call: a block-allocation worker may be sent
    # several tiny calls at once. Every reply is sent before the next call starts, so a
    # reply never waits behind a slow (or crashing) neighbour, and the engine always knows
    # that the first call without a reply is the one running.
    reader = FrameReader(secret)
    pending: deque[object] = deque()
    replies: list[bytes] = []
    sock = chan.sock
    while True:
        if not pending:
            _flush(sock, replies)
            try:
                data = sock.recv(1 << 20)
            except OSError:
                return 0
            if not data:
                return 0
            pending.extend(reader.feed(data))
            continue
        msg = pending.popleft()
        if isinstance(msg, Stop):
            _flush(sock, replies)
            return 0
        assert isinstance(msg, RunTask), f"unexpected message {type(msg).__name__}"
        if setup is not None and msg.setup is None:
            msg.setup = setup
        _flush(sock, replies)
        replies.extend(encode(_call.run(msg, init_values), secret))
        if not persistent:
            _flush(sock, replies)
            return 0


def _flush(sock: socket.socket, replies: list[bytes]) -> None:
    if replies:
        data = b"".join(replies)
        replies.clear()
        sock.sendall(data)


def _main(bootfile: str) -> None:
    """Entry point of launchers that start a fresh interpreter (srun): a private boot file."""
    boot = read_boot(bootfile)
    with contextlib.suppress(OSError):
        os.remove(bootfile)  # it holds the secret: gone as soon as it has been read
    sys.exit(serve(boot["address"], boot["secret"], boot["worker_id"],
                   persistent=boot["persistent"], init_payload=boot.get("init_payload"),
                   setup=boot.get("setup")))


def read_boot(bootfile: str) -> dict[str, Any]:
    """The boot file of a worker started as a fresh interpreter; its path applied."""
    with open(bootfile, "rb") as fh:
        boot: dict[str, Any] = pickle.load(fh)
    if boot.get("path"):
        _syspath.merge(boot["path"])
    return boot


if __name__ == "__main__":
    _main(sys.argv[1])
