"""Tiny socket servers for the fast transports' tests: a scripted HTTP server (one thread per connection, each
running a handler) and an HTTP-aware proxy in front of a real server that can drop chosen answers."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Self

Handler = Callable[[socket.socket, "ScriptedServer"], None]


def read_request(sock: socket.socket, pending: bytearray) -> tuple[bytes, bytes] | None:
    """The next request's head (without the blank line) and its Content-Length body; None when the client
    closed. `pending` carries bytes read past the request."""
    while b"\r\n\r\n" not in pending:
        data = sock.recv(1 << 16)
        if not data:
            return None
        pending += data
    end = pending.index(b"\r\n\r\n")
    head = bytes(pending[:end])
    del pending[: end + 4]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(pending) < length:
        data = sock.recv(1 << 20)
        if not data:
            return None
        pending += data
    body = bytes(pending[:length])
    del pending[:length]
    return head, body


def answer(status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class ScriptedServer:
    """Accepts connections on a loopback port and runs `handler(conn, server)` for each, in its own thread.
    `accepted` counts connections; `requests` collects request heads that handlers append."""

    def __init__(self, handler: Handler, backlog: int = 16) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.port: int = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self.requests: list[bytes] = []
        self.conns: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            self.handler(conn, self)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()


class DroppingProxy(ScriptedServer):
    """Forwards each request whole to `upstream_port` and its answer whole back, one upstream connection per
    client connection; the first `drops` requests whose head contains `match` get no answer: the proxy
    reads the server's answer (so the server did the work), then closes the client's connection."""

    def __init__(self, upstream_port: int, match: bytes, drops: int = 1) -> None:
        super().__init__(self._forward)
        self.upstream_port = upstream_port
        self.match = match
        self.drops = drops
        self.dropped = 0

    def _forward(self, conn: socket.socket, _: ScriptedServer) -> None:
        with socket.create_connection(("127.0.0.1", self.upstream_port)) as upstream:
            from_client, from_server = bytearray(), bytearray()
            while (request := read_request(conn, from_client)) is not None:
                head, body = request
                self.requests.append(head)
                upstream.sendall(head + b"\r\n\r\n" + body)
                response = read_request(upstream, from_server)  # an answer is framed the same way
                assert response is not None, "the server closed the connection"
                if self.match in head.split(b"\r\n")[0] and self.dropped < self.drops:
                    self.dropped += 1
                    return  # closes the client's connection without a word
                conn.sendall(response[0] + b"\r\n\r\n" + response[1])
