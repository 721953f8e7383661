"""Work that holds the interpreter for long, done in worker processes so that the event loop never waits.

Parsing a JSON document, rendering one, or reading a large safetensors header holds Python's GIL for the
whole document (here: 4 ms per MB of JSON floats, 26 ms per MB of JSON zeros, 350 ms for a 2.8 MB
safetensors header, 38 ms to render a million numbers). A thread does not help: while it holds the GIL
the event loop cannot run. So such work, once larger than a few milliseconds' worth, goes to a worker
process over a socket pair, and the loop only awaits a thread that waits on the socket.

Arrays (and large byte buffers) cross the socket as raw bytes, sent and received with the GIL released,
straight into their final buffers (`sendall`, `recv_into`); everything else is pickled. Pickle crosses
only between the server and the workers it started itself: it is never stored and never read from a
client. A task names a module-level function of this package (`module:function`).
"""

from __future__ import annotations

import asyncio
import importlib
import io
import os
import pickle
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import numpy as np

from app.memory import trim_freed_memory
from app.wire.errors import WireError

T = TypeVar("T")

# Below this many bytes of JSON (or of safetensors header), the work is done where it is asked for: at
# the worst rate measured (26 ms per MB, a JSON array of zeros) that holds the loop for about 3 ms.
INLINE_BYTES = 128 << 10
# Numbers rendered to JSON inline: about 1 ms at 38 ms per million.
INLINE_NUMBERS = 25_000

_FRAME = struct.Struct("<BQ")  # kind, length of the pickled part
_CALL, _OK, _FAILED = 0, 1, 2
_RAW_BYTES = (
    1 << 16
)  # buffers, and byte strings this long, travel raw like arrays (and arrive as memoryviews)
_ROOT = str(Path(__file__).resolve().parents[2])


class _Pickler(pickle.Pickler):
    """Pickles all but arrays and buffers, which it sets aside (with their dtypes and shapes) to go raw."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.kinds: list[tuple[bool, Any, tuple[int, ...]]] = []
        self.arrays: list[np.ndarray[Any, Any]] = []

    def persistent_id(self, value: Any) -> int | None:
        if type(value) is np.ndarray:
            array = np.ascontiguousarray(value)
            self.kinds.append((False, array.dtype, array.shape))
        elif isinstance(value, (bytearray, memoryview)) or (
            type(value) is bytes and len(value) >= _RAW_BYTES
        ):
            array = np.frombuffer(value, np.uint8)
            self.kinds.append((True, array.dtype, array.shape))
        else:
            return None
        self.arrays.append(array)
        return len(self.arrays) - 1


class _Unpickler(pickle.Unpickler):
    def __init__(self, payload: bytes, received: list[Any]) -> None:
        super().__init__(io.BytesIO(payload))
        self.received = received

    def persistent_load(self, pid: Any) -> Any:
        return self.received[pid]


def _dump(obj: Any) -> tuple[bytes, list[np.ndarray[Any, Any]]]:
    payload = io.BytesIO()
    pickler = _Pickler(payload)
    pickler.dump(obj)
    arrays, kinds = pickler.arrays, pickler.kinds
    pickler.arrays, pickler.kinds = [], []  # nothing large stays reachable from the pickler
    return pickle.dumps((kinds, payload.getvalue()), protocol=pickle.HIGHEST_PROTOCOL), arrays


def _send(sock: socket.socket, kind: int, obj: Any) -> None:
    head, arrays = _dump(obj)
    sock.sendall(_FRAME.pack(kind, len(head)) + head)
    for array in arrays:
        if array.nbytes:
            sock.sendall(array.reshape(-1).view(np.uint8).data)


def receive_into(sock: socket.socket, view: memoryview) -> None:
    """Fills `view` from `sock` (EOFError if the other end closes first); the GIL is let go meanwhile."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the other end closed the socket")
        got += n


def _receive_exactly(sock: socket.socket, n: int) -> bytearray:
    buffer = bytearray(n)
    receive_into(sock, memoryview(buffer))
    return buffer


def _receive(sock: socket.socket) -> tuple[int, Any]:
    kind, n = _FRAME.unpack(_receive_exactly(sock, _FRAME.size))
    kinds, payload = pickle.loads(_receive_exactly(sock, n))
    received: list[Any] = []
    for is_bytes, dtype, shape in kinds:
        array = np.empty(shape, dtype)
        if array.nbytes:
            receive_into(sock, array.reshape(-1).view(np.uint8).data)
        received.append(array.data if is_bytes else array)
    unpickler = _Unpickler(payload, received)
    obj = unpickler.load()
    unpickler.received = []
    return kind, obj


def _task_name(fn: Callable[..., Any]) -> str:
    name = f"{fn.__module__}:{fn.__qualname__}"
    if not fn.__module__.startswith("app.") or "." in fn.__qualname__:
        raise ValueError(f"{name}: a task is a module-level function of the app package")
    return name


def _resolve(name: str) -> Callable[..., Any]:
    module, _, function = name.partition(":")
    if not module.startswith("app."):
        raise ValueError(f"not a task: {name}")
    fn: Callable[..., Any] = getattr(importlib.import_module(module), function)
    return fn


def serve(fd: int) -> None:
    """A worker's life: answer calls on the socket `fd` until the server closes it."""
    sock = socket.socket(fileno=fd)
    while True:
        try:
            _, (name, args) = _receive(sock)
        except EOFError:
            return
        try:
            result = _resolve(name)(*args)
        except WireError as exc:
            _send(sock, _FAILED, ("wire", exc.detail, exc.status, exc.field))
        except MemoryError:
            _send(sock, _FAILED, ("memory", "", 0, None))
        except Exception as exc:  # a defect: the server answers 500 and logs it, as it would inline
            _send(sock, _FAILED, ("defect", repr(exc), 0, None))
        else:
            _send(sock, _OK, result)
        del args
        result = None
        trim_freed_memory()


class WorkerLost(RuntimeError):
    """A worker process stopped in the middle of a call (killed, or out of memory): 503, retry."""


class WorkersBusy(RuntimeError):
    """As many calls as allowed already wait for the worker processes: 503, retry."""


class _Worker:
    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.api.offload", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self.sock = ours

    def call(self, name: str, args: tuple[Any, ...]) -> tuple[int, Any]:
        _send(self.sock, _CALL, (name, args))
        return _receive(self.sock)

    def stop(self) -> None:
        self.sock.close()  # the worker reads end-of-file and returns
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Offload:
    """Up to `workers` worker processes, started when first needed; `run` calls a function in one when
    the work is heavy, and right here when it is not. At most `QUEUE_PER_WORKER` calls per worker may wait
    for one (each holds its request's body meanwhile); past that, `WorkersBusy` (503, retry)."""

    QUEUE_PER_WORKER = 4

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._idle: list[_Worker] = []
        self._slots: asyncio.Semaphore | None = None
        self.waiting = 0

    async def run(self, fn: Callable[..., T], *args: Any, heavy: bool) -> T:
        if not heavy:
            return fn(*args)
        name = _task_name(fn)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        if self.waiting >= self.QUEUE_PER_WORKER * self.workers:
            raise WorkersBusy(
                f"{self.waiting} large requests already wait for the {self.workers} parse worker(s) "
                "(OPTSERVE_PARSE_WORKERS): retry, or send safetensors"
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            kind, answer = await self._exchange(name, args)
        finally:
            self._slots.release()
        if kind == _OK:
            result: T = answer
            return result
        what, detail, status, field = answer
        if what == "wire":
            raise WireError(detail, status=status, field=field)
        if what == "memory":
            raise WireError("the body ran out of memory while it was parsed; send safetensors", status=413)
        raise RuntimeError(f"{name} failed in a worker process: {detail}")

    async def _exchange(self, name: str, args: tuple[Any, ...]) -> tuple[int, Any]:
        worker = self._idle.pop() if self._idle else await anyio.to_thread.run_sync(_Worker)
        healthy = False
        try:
            exchanged: tuple[int, Any] = await anyio.to_thread.run_sync(worker.call, name, args)
            healthy = True
            return exchanged
        except (OSError, EOFError) as exc:
            raise WorkerLost(f"the worker process parsing this request stopped ({exc}); retry") from None
        finally:
            if healthy:
                self._idle.append(worker)
            else:
                await anyio.to_thread.run_sync(worker.stop)

    async def parse(self, fn: Callable[..., T], body: Any, *args: Any) -> T:
        """`fn(body, *args)`, in a worker when the body is too large to parse here in a few ms."""
        return await self.run(fn, body, *args, heavy=len(body) > INLINE_BYTES)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().stop()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
