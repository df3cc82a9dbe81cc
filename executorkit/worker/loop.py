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
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from executorkit import _syspath
from executorkit.transport import (
    Address,
    Cancel,
    Dropped,
    FrameReader,
    GaveBack,
    Hello,
    InitFailed,
    RunTask,
    Started,
    Stop,
    TaskDone,
    connect,
    encode,
)
from executorkit.worker import _call, _shm

WATCH_PERIOD = 0.005  # seconds between two looks of the overrun watch at the running call

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
        _shm.release_own()
        os._exit(DRIVER_GONE)

    threading.Thread(target=watch, name="executorkit-driver-watch", daemon=True).start()


LINGER_LIMIT = 1.0  # seconds a lingering worker waits for the engine's shutdown at most
_CHUNK = 1 << 16  # bytes a per-task worker receives at a time


def serve(address: Address, secret: bytes, worker_id: int, *, persistent: bool,
          init_payload: bytes | None = None, setup: _call.TaskSetup | None = None,
          watch_driver: bool = True, linger: bool = False,
          exit_now: Callable[[int], NoReturn] | None = None) -> int:
    """Serve calls; returns the process exit code. ``watch_driver=False`` where a parent
    already ends the worker when the driver goes away (the local fork server).

    ``linger`` (a one-call worker forked on the driver's machine): after its reply, wait
    until the engine shuts the connection, then exit. The engine thread, woken by the reply,
    is often placed on this worker's CPU (the socket's wake-up says the sender is about to
    sleep); were the worker to go on with its exit there, the engine and the next call
    would wait behind it (0.7 ms of a 3 ms hand-over, measured). So the worker sleeps
    until the engine has dealt with its reply, and tears itself down after.

    ``exit_now`` (a one-call worker): called with the exit code once the call is done, to
    end the process where it stands. Returning up the stack would free the messages, the
    server and the channel and unwind the frames, writes to pages a forked worker shares
    with its fork server (some 30 copied pages).
    """
    chan = connect(address, secret)
    if watch_driver:
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
    linger = linger and not persistent
    chan.send(Hello(worker_id, os.getpid(), socket.gethostname(), linger))
    return _Server(chan.sock, secret, persistent, init_values, setup, linger, exit_now).serve()


class _Server:
    """The worker's side of the calls queued in it (block allocation).

    Whatever has arrived is read in one system call: a persistent worker may be sent several
    tiny calls at once. Every reply is sent before the next call starts, so a reply never
    waits behind a slow (or crashing) neighbour. A call sent ``queued`` (behind calls the
    engine had no reply for) is not running until the worker says so: its start rides on
    the previous reply (``TaskDone.next_task``) or, when there is none, goes out as
    :class:`Started`. Until then a :class:`Cancel` drops it, and the overrun watch may give
    it back (see :meth:`_watch`).
    """

    def __init__(self, sock: socket.socket, secret: bytes, persistent: bool,
                 init_values: Mapping[str, Any] | None, setup: _call.TaskSetup | None,
                 linger: bool = False,
                 exit_now: Callable[[int], NoReturn] | None = None) -> None:
        self.sock = sock
        self.linger = linger
        self.exit_now = exit_now
        self.secret = secret
        self.persistent = persistent
        self.init_values = init_values
        self.setup = setup
        self.reader = FrameReader(secret)
        # A persistent worker reuses one buffer: a fresh 1 MiB bytes per recv() is an mmap. A
        # per-task worker reads one call, into a fresh bytes each time: malloc's memory is
        # not zero-filled, so only the pages the call fills are written (a forked worker's
        # every first write to a page is a page fault; a 64 KiB bytearray wrote 16).
        self.rbuf = bytearray(1 << 20) if persistent else None
        self.rview = memoryview(self.rbuf) if persistent else None
        self.poller = select.poll()  # is anything waiting? (cheaper than a failing recv)
        self.poller.register(sock, select.POLLIN)
        self.pending: deque[object] = deque()
        self.cancelled: set[int] = set()
        self.dropped: list[int] = []
        self.replies: list[bytes] = []
        self.eof = False
        # Between calls the main thread holds ``io``; the overrun watch takes it only while
        # a call runs, so the socket, the reader and ``pending`` have one user at a time.
        self.io = threading.Lock()
        self.running: RunTask | None = None
        self.watching = False

    def serve(self) -> int:
        self.io.acquire()
        last: TaskDone | None = None  # a reply held back: it may announce the next call
        while True:
            if not self.pending:
                self._reply(last)
                last = None
                self._flush()
                if self.eof or not self._receive(block=True):
                    return 0
                continue
            msg = self.pending.popleft()
            if isinstance(msg, Stop):
                self._reply(last)
                self._flush()
                return 0
            assert isinstance(msg, RunTask), f"unexpected message {type(msg).__name__}"
            if msg.queued:
                if self.poller.poll(0):  # a Cancel for it may have arrived meanwhile
                    self._receive(block=False)
                if msg.task_id in self.cancelled:
                    self.cancelled.discard(msg.task_id)
                    self.dropped.append(msg.task_id)
                    continue
                if last is None:
                    self.replies.extend(encode(Started(msg.task_id), self.secret))
            self._reply(last, msg.task_id if msg.queued else 0)
            last = None
            self._flush()
            last = self._run(msg)
            if not self.persistent:
                self._reply(last)
                self._flush()
                if self.linger:
                    self._await_shutdown()
                if self.exit_now is not None:
                    self.exit_now(0)
                return 0

    def _run(self, msg: RunTask) -> TaskDone:
        if self.setup is not None and msg.setup is None:
            msg.setup = self.setup
        if msg.overrun_after > 0 and not self.watching:
            self.watching = True
            threading.Thread(target=self._watch, name="executorkit-overrun-watch",
                             daemon=True).start()
        self.running = msg
        self.io.release()
        try:
            return _call.run(msg, self.init_values)
        finally:
            self.io.acquire()
            self.running = None

    def _await_shutdown(self) -> None:
        """Sleep until the engine shuts the connection (see ``linger`` in :func:`serve`)."""
        deadline = time.monotonic() + LINGER_LIMIT
        try:
            while (left := deadline - time.monotonic()) > 0:
                if not self.poller.poll(left * 1000):
                    return
                if not self.sock.recv(_CHUNK):
                    return  # the shutdown (anything else sent now is of no use)
        except OSError:
            pass

    def _reply(self, done: TaskDone | None, next_task: int = 0) -> None:
        if done is not None:
            done.next_task = next_task
            self.replies.extend(encode(done, self.secret))
        if self.dropped:
            self.replies.extend(encode(Dropped(tuple(self.dropped)), self.secret))
            self.dropped.clear()

    def _flush(self) -> None:
        if self.replies:
            data = b"".join(self.replies)
            self.replies.clear()
            self.sock.sendall(data)

    def _receive(self, *, block: bool) -> bool:
        """Read what has arrived (waiting for it if ``block``); False at end of stream.
        Cancels apply at once; everything else queues up in ``pending``."""
        flags = 0 if block else socket.MSG_DONTWAIT
        try:
            if self.rbuf is not None:
                n = self.sock.recv_into(self.rbuf, 0, flags)
                data: bytes | memoryview = self.rview[:n]  # type: ignore[index]
            else:
                data = self.sock.recv(_CHUNK, flags)
                n = len(data)
        except BlockingIOError:
            return True
        except OSError:
            n = 0
        if not n:
            self.eof = True
            return False
        for msg in self.reader.feed(data):
            if isinstance(msg, Cancel):
                self.cancelled.update(msg.task_ids)
            else:
                self.pending.append(msg)
        return True

    def _watch(self) -> None:
        """Give back the calls queued behind a call that outlives its ``overrun_after``.

        The engine queues calls in a worker only behind calls it expects to be tiny; when
        one is not (``time.sleep(0)`` was, ``time.sleep(10)`` is not), the calls behind it
        return to the engine, which places them on workers that are free, and learns the
        overrun. Checked every ``WATCH_PERIOD`` seconds; a call's own clock starts after
        unpickling, so importing its module never counts.
        """
        while True:
            time.sleep(WATCH_PERIOD)
            msg, begun = self.running, _call.CLOCK.started
            if msg is None or not begun or msg.overrun_after <= 0:
                continue
            elapsed = time.perf_counter() - begun
            if elapsed < msg.overrun_after or not self.io.acquire(blocking=False):
                continue
            try:
                if self.running is msg:
                    self._give_back(msg, elapsed)
            except OSError:
                return  # the driver is gone; the main thread will find out
            finally:
                self.io.release()

    def _give_back(self, running: RunTask, elapsed: float) -> None:
        self._receive(block=False)
        back = [m for m in self.pending if isinstance(m, RunTask) and m.queued
                and m.task_id not in self.cancelled]
        if not back:
            return
        ids = {m.task_id for m in back}
        self.pending = deque(m for m in self.pending
                             if not (isinstance(m, RunTask) and m.task_id in ids))
        self.sock.sendall(b"".join(encode(
            GaveBack(running.task_id, elapsed, tuple(m.task_id for m in back)), self.secret)))


def _main(bootfile: str) -> None:
    """Entry point of launchers that start a fresh interpreter (srun): a private boot file."""
    boot = read_boot(bootfile)
    with contextlib.suppress(OSError):
        os.remove(bootfile)  # it holds the secret: gone as soon as it has been read
        if boot.get("remove"):  # the fork server's private directory for it
            os.rmdir(os.path.dirname(bootfile))
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
