"""The engine thread's I/O loop: the selector over the listener, worker connections, the wake
pipe and forwarded output, deferred calls, and the batched, non-blocking writes to workers.

It owns no task or worker decisions: it turns bytes into typed messages and hands each to
its handler (``_task_done``, ``_exited``, ``_hello``, ...), and waits until the earliest
timer of the other parts (``_timers``, ``_replenish_due``, ``_deferred``) is due. At the end
of each turn, after the writes, come the others' deferred steps: shutting the one-call workers
that replied (``_release_lingering``) and pickling the next call (``_pickle_next``).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import secrets
import select as _select
import selectors
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from executorkit.engine._config import EngineConfig
from executorkit.engine._records import _Conn, _Worker
from executorkit.errors import ExecutorBrokenError
from executorkit.transport import (
    MAX_FRAME,
    Address,
    BlockingChannel,
    Dropped,
    Exited,
    FrameReader,
    GaveBack,
    Hello,
    InitFailed,
    SpawnFailed,
    Started,
    TaskDone,
    encode,
)

log = logging.getLogger("executorkit")

UNAUTHENTICATED_FRAME = 1 << 16  # bytes a peer may send before its hello
# epoll takes at most 2**31-1 ms (about 24.8 days): a longer timer wakes the loop, which
# finds nothing due and waits again.
_LONGEST_WAIT = 3600.0


class _Loop:
    """Mixin of :class:`~executorkit.engine._engine.Engine`: the thread, its inbox and its
    sockets."""

    def _init_loop(self, config: EngineConfig) -> None:
        self.secret = secrets.token_bytes(32)
        self.inbox: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._stopped = threading.Event()
        self._late_lock = threading.Lock()
        self._wake_pending = False
        self._dirty: set[_Worker] = set()  # workers with frames to flush at the turn's end
        self._lingering: list[_Worker] = []  # one-call workers that replied: shut at the end
        self._deferred: list[tuple[float, int, Callable[[], None]]] = []
        # One receive buffer for every connection (a fresh 1 MiB bytes object per recv()
        # costs an mmap, an mremap and a munmap each time)
        self._rbuf = bytearray(1 << 20)
        self._rview = memoryview(self._rbuf)
        self.listener, self.address = _listen(config)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self._output_registered = False

    def _start_thread(self) -> None:
        self.thread = threading.Thread(target=self._run, name="executorkit-engine", daemon=True)
        self.thread.start()
        self._ident = self.thread.ident

    def on_engine_thread(self) -> bool:
        """True in the engine's own thread (where done-callbacks of its futures run)."""
        return threading.get_ident() == self._ident

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the engine thread (thread-safe, never blocks)."""
        self.inbox.append((fn, args))
        if self._stopped.is_set():
            # The engine thread is gone (shutdown or crash): run late events here, where
            # they can only fail their task with the reason the engine stopped.
            with self._late_lock:
                while self.inbox:
                    late_fn, late_args = self.inbox.popleft()
                    late_fn(*late_args)
            return
        if threading.get_ident() != self._ident and not self._wake_pending:
            self._wake_pending = True
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # the pipe is full (a wake-up is pending anyway) or closed


    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the guard: never die silently
            log.exception("executorkit engine failed")
            self._break(exc)
        finally:
            self._teardown()
            with self._late_lock:
                self._stopped.set()
                while self.inbox:  # posted after the loop's last look
                    fn, args = self.inbox.popleft()
                    with contextlib.suppress(Exception):
                        fn(*args)


    def _loop(self) -> None:
        select = self.selector.select
        inbox = self.inbox
        while True:
            if inbox:
                while inbox:
                    fn, args = inbox.popleft()
                    fn(*args)
                del fn, args  # the last task must not live on while the loop waits
            if self._closing and not self.tasks and self._close_ready():
                self._flush()
                return
            if self._dirty:
                self._flush()
            if self._lingering:
                self._release_lingering()
            if self._pickle_ahead:
                self._pickle_next()
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            if self._replenish_due is not None:
                due = max(0.0, self._replenish_due - time.monotonic())
                timeout = due if timeout is None else min(timeout, due)
            if self._deferred:
                due = max(0.0, self._deferred[0][0] - time.monotonic())
                timeout = due if timeout is None else min(timeout, due)
            if inbox:
                timeout = 0
            elif timeout is not None:
                timeout = min(timeout, _LONGEST_WAIT)
            for key, events in select(timeout):
                data = key.data
                if isinstance(data, _Conn):
                    if events & selectors.EVENT_WRITE and data.worker is not None:
                        self._write(data.worker)
                    if events & selectors.EVENT_READ:
                        self._readable(data)
                elif isinstance(data, tuple):
                    data[0](key.fd, data[1])
                else:
                    data(key.fileobj)
            if self._timers:
                self._fire_timers()
            if self._replenish_due is not None and time.monotonic() >= self._replenish_due:
                self._replenish_due = None
                self._replenish()
            while self._deferred and self._deferred[0][0] <= time.monotonic():
                heapq.heappop(self._deferred)[2]()


    def _drain_wake(self, sock: socket.socket) -> None:
        # Order matters (see post()): empty the pipe, *then* clear the flag, then the loop
        # drains the inbox. Clearing first could swallow a poster's byte while the flag
        # stays set, and every later post would skip the wake-up: a lost-wakeup hang.
        with contextlib.suppress(BlockingIOError):
            while sock.recv(4096):
                pass
        self._wake_pending = False


    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors, say: pause, never die
                log.warning("cannot accept a worker connection: %s", exc)
                self.selector.unregister(listener)
                self._later(1.0, self._resume_accept)
                return
            sock.setblocking(True)
            if sock.family == socket.AF_UNIX:
                if not _same_user(sock):
                    # Anyone on this machine can reach an abstract socket (a loopback
                    # firewall rule by owner cannot stop them): only our own user's
                    # processes may take a connection at all.
                    log.warning("refused a local connection from another user")
                    sock.close()
                    continue
            else:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Until the peer has proven it knows the secret, frames stay small.
            conn = _Conn(sock, FrameReader(self.secret, limit=UNAUTHENTICATED_FRAME),
                         BlockingChannel(sock, self.secret))
            self.selector.register(sock, selectors.EVENT_READ, conn)


    def _resume_accept(self) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.register(self.listener, selectors.EVENT_READ, self._accept)


    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._deferred, (time.monotonic() + delay, next(self._ids), fn))


    def _readable(self, conn: _Conn) -> None:
        try:
            n = conn.sock.recv_into(self._rbuf)
        except OSError:
            n = 0
        if n:
            try:
                messages = conn.reader.feed(self._rview[:n])
            except Exception as exc:  # authentication failure or garbage: drop the peer
                log.warning("dropping a connection: %s", exc)
                self._drop(conn)
                return
            for msg in messages:
                self._dispatch(conn, msg)
            return
        self._drop(conn)


    def _drop(self, conn: _Conn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()
        if conn.is_launcher:
            if not self._closing or self.tasks or self.workers:
                self._break(ExecutorBrokenError("the fork server exited unexpectedly"))
            return
        w = conn.worker
        if w is not None:
            w.eof = True
            self._maybe_finalize(w)


    def _dispatch(self, conn: _Conn, msg: object) -> None:
        if isinstance(msg, TaskDone):
            self._task_done(conn.worker, msg)
        elif isinstance(msg, Started):
            self._started(conn.worker, msg.task_id)
        elif isinstance(msg, GaveBack):
            self._gave_back(conn.worker, msg)
        elif isinstance(msg, Dropped):
            self._dropped(conn.worker, msg)
        elif isinstance(msg, Exited):
            self._exited(msg)
        elif isinstance(msg, Hello):
            self._hello(conn, msg)
        elif isinstance(msg, InitFailed):
            self._init_failed(conn.worker, msg.info)
        elif isinstance(msg, SpawnFailed):
            self._spawn_failed(msg)
        else:
            log.warning("unexpected message %s", type(msg).__name__)


    def _hello(self, conn: _Conn, msg: Hello) -> None:
        if msg.worker_id == 0 and not conn.is_launcher and self.launcher.chan is None:
            conn.is_launcher = True
            conn.reader.limit = MAX_FRAME
            self.launcher.attach(conn.chan)
            return
        w = self.workers.get(msg.worker_id)
        if w is None or w.chan is not None:
            self._drop(conn)  # a worker we no longer expect (already finalized)
            return
        conn.worker = w
        conn.reader.limit = MAX_FRAME
        conn.sock.setblocking(False)  # the engine thread never waits on a worker's socket
        w.chan = conn.chan
        w.conn = conn
        w.pid, w.host, w.lingers = msg.pid, msg.host, msg.lingers
        if w.spare:
            self._spares_coming -= 1
            self._spares.append(w)
        if w.out:
            self._dirty.add(w)


    def _send(self, w: _Worker, msg: object) -> None:
        """Queue a frame; :meth:`_flush` sends each worker's frames in one system call."""
        header, body = encode(msg, self.secret)
        w.out.append(header)
        w.out.append(body)
        if w.chan is not None:
            self._dirty.add(w)


    def _flush(self) -> None:
        for w in self._dirty:
            if w.chan is not None and w.out:
                self._write(w)
        self._dirty.clear()


    def _release_lingering(self) -> None:
        """Shut the connections of the one-call workers that replied this turn: each then
        exits. Done last in the turn because the woken worker's exit (a millisecond of
        unmapping) often runs on the engine's CPU first: the calls sent and the futures
        completed this turn do not wait behind it."""
        for w in self._lingering:
            if w.chan is not None:
                with contextlib.suppress(OSError):
                    w.chan.sock.shutdown(socket.SHUT_WR)
        self._lingering.clear()


    def _write(self, w: _Worker) -> None:
        """Send what the socket takes now; the rest waits for writability (a worker busy
        with a call does not read, and large arguments must never block the engine)."""
        assert w.chan is not None
        data = w.out[0] if len(w.out) == 1 else b"".join(w.out)
        try:
            sent = w.chan.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            w.out = []  # the worker is dying; EOF and Exited will follow and finalize it
            return
        w.out = [memoryview(data)[sent:]] if sent < len(data) else []
        want_write = bool(w.out)
        if want_write != w.writing and w.conn is not None:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.modify(w.chan.sock, events, w.conn)
            w.writing = want_write


    def _watch_output(self) -> None:
        """Forward the launcher's output pipes (once it has started) to our own streams."""
        if self._output_registered or not self.launcher.started:
            return
        self._output_registered = True
        for fd, stream in ((self.launcher.stdout_fd, "stdout"),
                           (self.launcher.stderr_fd, "stderr")):
            if fd is not None:
                os.set_blocking(fd, False)
                self.selector.register(fd, selectors.EVENT_READ, (self._forward, stream))

    def _forward(self, fd: int, stream: str) -> None:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self.selector.unregister(fd)
            os.close(fd)
            return
        out = sys.stdout if stream == "stdout" else sys.stderr
        try:
            out.write(data.decode(errors="replace"))
            out.flush()
        except Exception:
            pass  # a closed driver stream must not break the engine


    def _close_io(self) -> None:
        """Print what is left of forwarded output, then close every watched descriptor."""
        for key in list(self.selector.get_map().values()):
            if isinstance(key.data, tuple):  # forwarded output: print what is left
                with contextlib.suppress(Exception):
                    while key.fd in self.selector.get_map():
                        self._forward(key.fd, key.data[1])
                        if not _readable_now(key.fd):
                            break
            with contextlib.suppress(Exception):
                self.selector.unregister(key.fileobj)
            with contextlib.suppress(Exception):
                if isinstance(key.fileobj, int):
                    os.close(key.fileobj)
                else:
                    cast(Any, key.fileobj).close()
        self.selector.close()
        with contextlib.suppress(OSError):
            self._wake_w.close()


def _listen(config: EngineConfig) -> tuple[socket.socket, Address]:
    """The socket workers connect to, and the address they are given.

    Where every worker runs on this machine (``local_socket``), a Unix socket with a random
    name in Linux's abstract namespace: it has no file to leave behind, however the driver
    ends, and no TCP stack to cross. Reachable, like loopback TCP, from this machine's
    network namespace only, and taken only from processes of this user (``_same_user``);
    a peer must still know the executor's secret to be heard. Elsewhere (other systems, no
    such socket, or ``EXECUTORKIT_LOCAL_SOCKET=0`` in the environment), and for workers on
    other hosts, TCP.
    """
    if (config.local_socket and sys.platform.startswith("linux")
            and os.environ.get("EXECUTORKIT_LOCAL_SOCKET", "1") != "0"):
        name = f"\0executorkit-{os.getpid()}-{secrets.token_hex(16)}"
        sock = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(name)
            sock.listen(1024)
            sock.setblocking(False)
            return sock, name
        except OSError:
            if sock is not None:
                sock.close()
    listener = socket.create_server((config.bind_host, 0), backlog=1024)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    return listener, (config.advertise_host or config.bind_host, port)


_PEER = struct.Struct("3i")  # Linux's struct ucred: pid, uid, gid


def _same_user(sock: socket.socket) -> bool:
    """Whether the peer of local socket ``sock`` runs as this process's user."""
    try:
        _, uid, _ = _PEER.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER.size))
    except (OSError, AttributeError, struct.error):
        return False
    return uid == os.geteuid()


def _readable_now(fd: int) -> bool:
    return bool(_select.select([fd], [], [], 0)[0])
