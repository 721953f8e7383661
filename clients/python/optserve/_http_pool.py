"""The fast transports' connections (`optserve.transport`): non-blocking sockets tuned for large bodies, the
idle ones kept per origin, and the blocking wait for a socket's readiness."""

from __future__ import annotations

import os
import select
import socket
import threading

from optserve._http_answer import Buffers, Receiver

Origin = tuple[str, int]

MAX_IDLE = 8  # idle connections kept per host and port
SOCKET_BUFFER = 4 << 20

# What a socket became first while waited on; `READ` wins when both are.
READ, WRITE, TIMEOUT = 1, 2, 3


if hasattr(select, "poll"):

    def poll(sock: socket.socket, read: bool, write: bool, timeout: float | None) -> int:
        """Waits until `sock` has something to read (`READ`, when `read`: data, or the peer closed or failed)
        or takes more (`WRITE`, when `write`), or `timeout` seconds pass (`TIMEOUT`)."""
        poller = select.poll()
        poller.register(sock, (select.POLLIN if read else 0) | (select.POLLOUT if write else 0))
        events = poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
        if not events:
            return TIMEOUT
        return READ if read and events[0][1] & (select.POLLIN | select.POLLHUP | select.POLLERR) else WRITE

else:  # pragma: no cover - Windows

    def poll(sock: socket.socket, read: bool, write: bool, timeout: float | None) -> int:
        # A failed connect is reported in the third set, not as writable.
        readable, writable, failed = select.select(
            [sock] if read else [], [sock] if write else [], [sock], timeout
        )
        if readable:
            return READ
        return WRITE if writable or failed else TIMEOUT


class Connection:
    def __init__(self, sock: socket.socket, origin: Origin, buffers: Buffers) -> None:
        self.sock = sock
        self.origin = origin
        self.receiver = Receiver(buffers)
        self.reused = False
        self.sent = False  # some byte of the current request was taken by the socket
        self.cut = False  # the request was not sent whole (an early answer, a failed send): do not reuse

    def usable(self) -> bool:
        """An idle connection has nothing to read: readable means the server closed it (or sent junk)."""
        try:
            return self.sock.fileno() >= 0 and poll(self.sock, True, False, 0) == TIMEOUT
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        self.sock.close()


def tune(sock: socket.socket, buffer_size: int | None) -> None:
    """Before connecting (the window scale is agreed then); non-blocking, as the transports' core wants."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buffer_size:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
    sock.setblocking(False)


class Pool:
    """Idle connections per origin, most recent first out; forgotten in a forked child."""

    def __init__(self, max_idle: int) -> None:
        self.max_idle = max_idle
        self.idle: dict[Origin, list[Connection]] = {}
        self.lock = threading.Lock()
        self.pid = os.getpid()

    def take(self, origin: Origin) -> Connection | None:
        with self.lock:
            if self.pid != os.getpid():
                self.idle, self.pid = {}, os.getpid()
            idle = self.idle.get(origin)
            while idle:
                conn = idle.pop()
                if conn.usable():
                    conn.reused, conn.sent, conn.cut = True, False, False
                    return conn
                conn.close()
        return None

    def give(self, conn: Connection) -> None:
        with self.lock:
            idle = self.idle.setdefault(conn.origin, [])
            if len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
