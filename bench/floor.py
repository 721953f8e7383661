"""The floors a step round trip is measured against: (a) moving its bytes, (b) doing its math.

(a) A raw TCP echo over loopback: a server in its own process (plain blocking sockets, 4 MiB socket buffers,
TCP_NODELAY) reads an 8-byte length and then exactly that many bytes into a preallocated buffer
(`recv_into`), and sends them back (`sendall`); the client sends the same way and receives into its own
preallocated buffer. N is the size of the step's safetensors request body, so one echo moves what one step
moves: N bytes there, N bytes back (the answer carries the same tensors).

(b) torch's fused Adam on the same number of float32 parameters, on one thread (`torch.set_num_threads(1)`).

Run: `python -m bench.floor` prints both for 1e5, 1e6, 1e7 parameters.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
from typing import Any

import torch

from app.api.offload import receive_into
from app.wire import safetensors
from bench.bench_optim import ADAM_SPEC, _torch
from bench.common import PortPrinter, Step, grads_of, interleaved_medians, table

SIZES = (100_000, 1_000_000, 10_000_000)
SOCKET_BUFFER = 4 << 20
_LENGTH = struct.Struct("<Q")


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


def serve_echo() -> None:
    """The echo server: prints its port, then echoes length-prefixed messages on each connection in turn."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _tune(listener)  # accepted sockets inherit the buffer sizes
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    print(listener.getsockname()[1], flush=True)
    buffer = bytearray(1 << 20)
    prefix = bytearray(_LENGTH.size)
    while True:
        conn, _ = listener.accept()
        _tune(conn)
        with conn:
            try:
                while True:
                    receive_into(conn, memoryview(prefix))
                    (n,) = _LENGTH.unpack(prefix)
                    if n > len(buffer):
                        buffer = bytearray(n)
                    view = memoryview(buffer)[:n]
                    receive_into(conn, view)
                    conn.sendall(view)
            except EOFError:
                pass


class TcpEcho:
    """The client side of (a): `echo(payload)` sends it and receives it back, whole."""

    def __init__(self) -> None:
        self.server = PortPrinter("bench.floor", "--serve")
        self.sock = socket.create_connection(("127.0.0.1", self.server.port))
        _tune(self.sock)
        self.buffer = bytearray(0)

    def echo(self, payload: bytes | memoryview) -> None:
        n = len(payload)
        if len(self.buffer) < n:
            self.buffer = bytearray(n)
        self.sock.sendall(_LENGTH.pack(n))
        self.sock.sendall(payload)
        receive_into(self.sock, memoryview(self.buffer)[:n])

    def step(self, payload: bytes) -> Step:
        return lambda: self.echo(payload)

    def close(self) -> None:
        self.sock.close()
        self.server.stop()

    def __enter__(self) -> TcpEcho:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def torch_adam(numel: int) -> Step:
    """One step of torch's fused Adam on `numel` float32 parameters; the caller sets one thread."""
    return _torch(lambda p: torch.optim.Adam(p, **ADAM_SPEC, fused=True), numel)


def request_bytes(numel: int) -> bytes:
    """The size of the step's safetensors request for `numel` float32 parameters, as zero bytes."""
    return bytes(len(safetensors.encode_bytes({"w": grads_of(numel)}, None)))


def run(sizes: tuple[int, ...] = SIZES, repeat: int | None = None) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    with TcpEcho() as tcp:
        for numel in sizes:
            payload = request_bytes(numel)
            steps = {"tcp echo": tcp.step(payload), "torch fused Adam": torch_adam(numel)}
            seconds = interleaved_medians(steps, repeat or max(10, 30_000_000 // numel))
            rows += [
                {"case": name, "params": numel, "bytes": len(payload), "ms": s * 1e3}
                for name, s in seconds.items()
            ]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", action="store_true", help="run the echo server (prints its port)")
    if parser.parse_args().serve:
        serve_echo()
        return 0
    print(table(run(), ["case", "params", "bytes", "ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
