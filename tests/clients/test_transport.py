"""The fast transports (`optserve.transport`), blocking and asyncio: against a real server (answers equal to
httpx's own transport, byte for byte; one connection for many steps; a restarted server; lost answers) and
against scripted socket servers (stale connections, timeouts, chunked and close-delimited answers, an answer
that comes before the request is whole)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import optserve
import pytest
from optserve import RetryPolicy, Timeout, _http_core, _safetensors
from optserve._base import own_http_client
from optserve.transport import BODY_EXTENSION, AsyncFastTransport, BufferStream, FastTransport, _Connection

from tests.clients.conftest import resolve
from tests.clients.sockets import DroppingProxy, ScriptedServer, answer, read_request
from tests.system.server import Server, free_port

Kind = Literal["sync", "async"]
ADAM = {"name": "adam", "lr": 1e-3}
ST = "application/vnd.safetensors"
FAST_RETRY = RetryPolicy(retries=3, backoff=0.01)


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> Kind:
    kind: Kind = request.param
    return kind


class Http:
    """An httpx client of either kind on a fresh fast transport; `await http.request(...)` drives both."""

    def __init__(self, kind: Kind, **options: Any) -> None:
        self.transport: FastTransport | AsyncFastTransport
        self.client: httpx.Client | httpx.AsyncClient
        if kind == "sync":
            self.transport = FastTransport(**options)
            self.client = httpx.Client(transport=self.transport)
        else:
            self.transport = AsyncFastTransport(**options)
            self.client = httpx.AsyncClient(transport=self.transport)

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response: httpx.Response = await resolve(self.client.request(method, url, **kwargs))
        return response

    async def close(self) -> None:
        await resolve(self.client.close() if isinstance(self.client, httpx.Client) else self.client.aclose())


@pytest.fixture
async def http(kind: Kind) -> AsyncIterator[Any]:
    """`http(**transport_options)`: an `Http` of the test's kind, closed after the test."""
    made: list[Http] = []

    def make(**options: Any) -> Http:
        made.append(Http(kind, **options))
        return made[-1]

    yield make
    for h in made:
        await h.close()


@pytest.fixture
async def sdk(kind: Kind) -> AsyncIterator[Any]:
    """`sdk(url, **kwargs)`: an `optserve.Client` or `AsyncClient` (by the test's kind), closed after."""
    async with AsyncExitStack() as stack:

        async def make(url: str, **kwargs: Any) -> optserve.Client | optserve.AsyncClient:
            if kind == "sync":
                return stack.enter_context(optserve.Client(url, **kwargs))
            return await stack.enter_async_context(optserve.AsyncClient(url, **kwargs))

        yield make


def fast(kind: Kind) -> FastTransport | AsyncFastTransport:
    return FastTransport() if kind == "sync" else AsyncFastTransport()


def httpx_transport(kind: Kind) -> httpx.HTTPTransport | httpx.AsyncHTTPTransport:
    return httpx.HTTPTransport() if kind == "sync" else httpx.AsyncHTTPTransport()


# -- against a real server ------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 5_000, 100_000, 1_000_000])
async def test_steps_equal_the_httpx_transports_byte_for_byte(
    server: Server, kind: Kind, http: Any, numel: int
) -> None:
    """Two identical sessions, one stepped over each transport: the same answers, to the byte."""
    rng = np.random.default_rng(numel)
    params = {"w": rng.standard_normal(numel, dtype=np.float32), "b": rng.standard_normal(3)}
    with optserve.Client(server.url, transport=httpx.HTTPTransport()) as setup:
        ours, theirs = (setup.create_session(params, ADAM) for _ in range(2))
    body = _safetensors.encode(
        {"w": rng.standard_normal(numel, dtype=np.float32), "b": rng.standard_normal(3)}, {"loss": "0.5"}
    )
    headers = {"Content-Type": ST, "Accept": ST}
    a = await http().request(
        "POST", f"{server.url}/v1/sessions/{ours.id}/step", content=body, headers=headers
    )
    with httpx.Client() as plain:
        b = plain.post(f"{server.url}/v1/sessions/{theirs.id}/step", content=body, headers=headers)
    assert a.status_code == b.status_code == 200
    assert a.content == b.content
    assert a.headers["content-type"] == b.headers["content-type"] == ST
    assert len(a.content) > 4 * numel


@pytest.mark.parametrize("wire", ["safetensors", "json"])
async def test_sdk_steps_over_either_transport_agree(server: Server, kind: Kind, sdk: Any, wire: str) -> None:
    rng = np.random.default_rng(7)
    params = {"w": rng.standard_normal((300, 100), dtype=np.float32), "b": rng.standard_normal(5)}
    clients = [
        await sdk(server.url, wire=wire),
        await sdk(server.url, wire=wire, transport=httpx_transport(kind)),
    ]
    sessions = [await resolve(c.create_session(params, ADAM)) for c in clients]
    for seed in range(3):
        g = np.random.default_rng(seed)
        grads = {"w": g.standard_normal((300, 100)).astype(np.float16), "b": g.standard_normal(5)}
        a, b = [await resolve(s.step(grads, loss=0.25)) for s in sessions]
        assert (a.step, a.lr, a.skipped, a.grad_norm) == (b.step, b.lr, b.skipped, b.grad_norm)
        for name, value in params.items():
            assert a.params[name].dtype == b.params[name].dtype == value.dtype
            assert a.params[name].shape == value.shape
            assert a.params[name].flags.writeable
            assert a.params[name].tobytes() == b.params[name].tobytes()
    for s in sessions:
        await resolve(s.delete())


async def test_one_connection_carries_many_steps(server: Server, kind: Kind, sdk: Any) -> None:
    transport = fast(kind)
    client = await sdk(server.url, transport=transport)
    session = await resolve(client.create_session({"w": np.zeros(200_000, np.float32)}, ADAM))
    for _ in range(20):
        result = await resolve(session.step({"w": np.ones(200_000, np.float32)}))
    await resolve(client.health())
    await resolve(session.refresh())
    assert result.step == 20
    assert transport.connections_opened == 1
    await resolve(session.delete())


async def test_concurrent_steps_each_get_their_own_answer(server: Server, kind: Kind) -> None:
    """Steps in flight together (threads on one `Client`, tasks on one `AsyncClient`) use connections and
    receive buffers of their own."""
    n, count = 100_000, 6
    sgd = {"name": "sgd", "lr": 1.0}
    if kind == "sync":
        with optserve.Client(server.url) as client:
            sessions = [client.create_session({"w": np.zeros(n, np.float32)}, sgd) for _ in range(count)]
            with ThreadPoolExecutor(count) as pool:
                for _ in range(3):
                    steps = [
                        pool.submit(s.step, {"w": np.full(n, k, np.float32)}) for k, s in enumerate(sessions)
                    ]
                    results = [f.result() for f in steps]
            for s in sessions:
                s.delete()
    else:
        async with optserve.AsyncClient(server.url) as aclient:
            asessions = [
                await aclient.create_session({"w": np.zeros(n, np.float32)}, sgd) for _ in range(count)
            ]
            for _ in range(3):
                results = await asyncio.gather(
                    *(s.step({"w": np.full(n, k, np.float32)}) for k, s in enumerate(asessions))
                )
            for a in asessions:
                await a.delete()
    for k, result in enumerate(results):
        np.testing.assert_array_equal(result.params["w"], np.full(n, -3.0 * k, np.float32))
    views = [r.params["w"] for r in results]
    assert not any(np.shares_memory(a, b) for i, a in enumerate(views) for b in views[i + 1 :])


def test_step_answers_belong_to_the_caller(server: Server) -> None:
    """An answer's arrays are views of the buffer the body was received into; a later answer reuses that
    buffer only once nothing references it any more."""
    with optserve.Client(server.url) as client:
        session = client.create_session({"w": np.zeros(100_000, np.float32)}, {"name": "sgd", "lr": 1.0})
        ones = {"w": np.ones(100_000, np.float32)}
        first = session.step(ones).params["w"]
        assert first.flags.writeable
        kept = first.copy()
        second = session.step(ones).params["w"]
        assert not np.shares_memory(first, second)
        np.testing.assert_array_equal(first, kept)  # untouched by the second answer
        np.testing.assert_array_equal(second, kept - 1)
        first[:] = 5  # the caller's to change
        address = second.__array_interface__["data"][0]
        del second
        third = session.step(ones).params["w"]
        assert third.__array_interface__["data"][0] == address  # received into the buffer let go of
        np.testing.assert_array_equal(third, kept - 2)
        np.testing.assert_array_equal(first, 5)
        session.delete()


async def test_a_server_restarted_between_steps_is_met_on_a_fresh_connection(
    tmp_path: Path, kind: Kind, sdk: Any
) -> None:
    transport = fast(kind)
    with Server(f"sqlite:///{tmp_path / 'db.sqlite'}") as server:
        client = await sdk(
            server.url, transport=transport, retries=0
        )  # no retry by the SDK: it is the transport
        session = await resolve(client.create_session({"w": np.zeros(10, np.float32)}, {"name": "sgd"}))
        await resolve(session.step({"w": np.ones(10, np.float32)}))
        server.stop()
        server.start()
        result = await resolve(session.step({"w": np.ones(10, np.float32)}))
        assert (result.step, result.replayed) == (2, False)
        assert transport.connections_opened == 2


async def test_a_lost_step_answer_is_resent_with_its_key_and_applied_once(
    server: Server, kind: Kind, sdk: Any
) -> None:
    with DroppingProxy(server.port, b"/step") as proxy:
        client = await sdk(proxy.url, retries=FAST_RETRY)
        session = await resolve(
            client.create_session({"w": np.zeros(5, np.float32)}, {"name": "sgd", "lr": 1.0})
        )
        result = await resolve(session.step({"w": np.ones(5, np.float32)}, expected_step=0))
        assert (result.step, result.replayed, proxy.dropped) == (1, True, 1)
        np.testing.assert_array_equal(result.params["w"], -np.ones(5, np.float32))
        steps = [h for h in proxy.requests if b"/step" in h.split(b"\r\n")[0]]
        keys = [
            line for h in steps for line in h.split(b"\r\n") if line.lower().startswith(b"idempotency-key:")
        ]
        assert len(steps) == 2
        assert len(set(keys)) == 1
        assert (await resolve(session.refresh())).step == 1
        await resolve(session.delete())


async def test_a_lost_answer_that_must_not_be_resent_raises_a_typed_error(
    server: Server, kind: Kind, sdk: Any
) -> None:
    with DroppingProxy(server.port, b"POST /v1/sessions HTTP") as proxy:
        client = await sdk(proxy.url, retries=FAST_RETRY)
        before = len(await resolve(client.list_sessions()))
        with pytest.raises(optserve.TransportError) as caught:
            await resolve(client.create_session({"w": np.zeros(5, np.float32)}, {"name": "sgd"}))
        assert caught.value.attempts == 1
        assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)
        assert len(await resolve(client.list_sessions())) == before + 1  # it was created: not sent twice
    with DroppingProxy(server.port, b"/step") as proxy:
        client = await sdk(proxy.url, retries=0)
        session = await resolve(client.create_session({"w": np.zeros(5, np.float32)}, {"name": "sgd"}))
        with pytest.raises(optserve.TransportError) as caught:
            await resolve(session.step({"w": np.ones(5, np.float32)}))
        assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)
        await resolve(session.delete())


def test_the_sdk_picks_the_fast_transport_for_plain_http_only(monkeypatch: pytest.MonkeyPatch) -> None:
    with optserve.Client("http://127.0.0.1:1") as client:
        assert client._zero_copy
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    with optserve.Client("http://127.0.0.1:1") as client:
        assert not client._zero_copy  # httpx's default transport, which honours the proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with optserve.Client("http://127.0.0.1:1") as client:
        assert client._zero_copy
    http, owned, zero_copy = own_http_client(httpx.Client, "https://example.test", None, None)
    assert (owned, zero_copy) == (True, False)
    http.close()
    with optserve.Client("http://127.0.0.1:1", transport=httpx.HTTPTransport()) as client:
        assert not client._zero_copy  # the opt-out: bodies are joined, as any transport expects


# -- against scripted servers ---------------------------------------------------------------------------


def keep_alive(conn: socket.socket, server: ScriptedServer) -> None:
    pending = bytearray()
    while (request := read_request(conn, pending)) is not None:
        server.requests.append(request[0])
        conn.sendall(answer(200, request[1] or b"ok"))


def one_then_close(conn: socket.socket, server: ScriptedServer) -> None:
    """Answers one request as if the connection stayed open, then closes it."""
    request = read_request(conn, bytearray())
    assert request is not None
    conn.sendall(answer(200, b"first"))


def one_then_read_and_close(conn: socket.socket, server: ScriptedServer) -> None:
    """Answers the first request, takes the second whole, and closes without answering it."""
    pending = bytearray()
    assert read_request(conn, pending) is not None
    conn.sendall(answer(200, b"first"))
    assert read_request(conn, pending) is not None


async def test_an_idle_connection_the_server_closed_is_replaced_before_use(http: Any) -> None:
    with ScriptedServer(one_then_close) as server:
        client = http()
        for _ in range(3):
            assert (await client.request("GET", server.url)).content == b"first"
            time.sleep(0.05)  # the server's FIN arrives
        assert server.accepted == client.transport.connections_opened == 3


async def test_a_request_the_dead_connection_refused_is_sent_again_on_a_fresh_one(
    http: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the idle check cannot see: the server resets the connection just as it is taken."""
    answered = threading.Event()

    def one_then_reset(conn: socket.socket, server: ScriptedServer) -> None:
        assert read_request(conn, bytearray()) is not None
        conn.sendall(answer(200, b"first"))
        answered.wait()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a RST

    monkeypatch.setattr(_Connection, "usable", lambda self: True)  # the idle check saw nothing
    with ScriptedServer(one_then_reset) as server:
        client = http()
        assert (await client.request("POST", server.url, content=b"x")).content == b"first"
        answered.set()
        time.sleep(0.05)  # the reset arrives
        assert (await client.request("POST", server.url, content=b"y")).content == b"first"
        assert server.accepted == client.transport.connections_opened == 2


async def test_a_connection_closed_after_taking_a_request_raises_remote_protocol_error(http: Any) -> None:
    with ScriptedServer(one_then_read_and_close) as server:
        client = http()
        assert (await client.request("POST", server.url, content=b"x")).content == b"first"
        with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
            await client.request("POST", server.url, content=b"y")
        assert server.accepted == 1  # bytes had left: not resent by the transport


async def test_keep_alive_carries_requests_of_every_shape(http: Any, kind: Kind) -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b""
        yield b"c" * 100_000

    def sync_parts() -> Iterator[bytes]:
        yield b"ab"
        yield b""
        yield b"c" * 100_000

    def echo_chunked(conn: socket.socket, server: ScriptedServer) -> None:
        pending = bytearray()
        while True:
            while b"\r\n\r\n" not in pending:
                pending += conn.recv(1 << 16)
            head, _, rest = bytes(pending).partition(b"\r\n\r\n")
            server.requests.append(head)
            pending = bytearray(rest)
            if b"transfer-encoding: chunked" in head.lower():
                while not pending.endswith(b"0\r\n\r\n"):
                    pending += conn.recv(1 << 16)
            else:
                _, _, tail = head.lower().partition(b"content-length: ")
                length = int(tail.split(b"\r\n")[0] or 0)
                while len(pending) < length:
                    pending += conn.recv(1 << 16)
            conn.sendall(answer(200, bytes(pending)))
            pending.clear()

    with ScriptedServer(echo_chunked) as server:
        client = http()
        streamed = await client.request(
            "POST", server.url, content=sync_parts() if kind == "sync" else parts()
        )
        assert streamed.content == b"2\r\nab\r\n186a0\r\n" + b"c" * 100_000 + b"\r\n0\r\n\r\n"
        big = np.arange(300_000, dtype=np.float32)
        request = httpx.Request(
            "PUT", f"{server.url}/x?y=1", stream=BufferStream([b"head", big.data, b"", b"tail"])
        )
        sent = await resolve(client.client.send(request))
        assert sent.content == b"head" + big.tobytes() + b"tail"
        assert (await client.request("GET", server.url + "/q?a=b")).content == b""
        assert server.accepted == 1
        assert server.requests[1].startswith(b"PUT /x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"Content-Length: 1200008" in server.requests[1]
        assert server.requests[2].startswith(b"GET /q?a=b HTTP/1.1")


def chunked_answers(conn: socket.socket, server: ScriptedServer) -> None:
    pending = bytearray()
    big = bytes(range(256)) * 1000
    while read_request(conn, pending) is not None:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
        body = b"5;name=value\r\nhello\r\n" + b"%X\r\n" % len(big) + big + b"\r\n0\r\nTrailer: x\r\n\r\n"
        data = head + body
        for at in range(0, len(data), 7_777):  # in pieces that split lines and sizes
            conn.sendall(data[at : at + 7_777])


async def test_chunked_answers_are_read_whole_and_keep_the_connection(http: Any) -> None:
    expected = b"hello" + bytes(range(256)) * 1000
    with ScriptedServer(chunked_answers) as server:
        client = http()
        for _ in range(2):
            response = await client.request("GET", server.url)
            assert response.content == expected
        handed = await client.request("GET", server.url, extensions={BODY_EXTENSION: True})
        view = handed.extensions[BODY_EXTENSION]
        assert isinstance(view, memoryview)
        assert not view.readonly
        assert view == expected
        assert server.accepted == 1


async def test_close_delimited_empty_and_head_answers(http: Any) -> None:
    def varied(conn: socket.socket, server: ScriptedServer) -> None:
        pending = bytearray()
        while (request := read_request(conn, pending)) is not None:
            first = request[0].split(b"\r\n")[0]
            if first.startswith(b"HEAD"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            elif b"/empty" in first:
                conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
            else:  # no length: the body ends when the connection does
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + b"z" * 70_000)
                return

    with ScriptedServer(varied) as server:
        client = http()
        head = await client.request("HEAD", server.url)
        assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "1000")
        assert (await client.request("GET", server.url + "/empty")).status_code == 204
        assert (await client.request("GET", server.url)).content == b"z" * 70_000
        assert (await client.request("GET", server.url + "/empty")).status_code == 204
        assert server.accepted == 2


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    ],
)
async def test_malformed_or_cut_answers_raise_remote_protocol_error(http: Any, reply: bytes) -> None:
    def send_reply(conn: socket.socket, server: ScriptedServer) -> None:
        assert read_request(conn, bytearray()) is not None
        conn.sendall(reply)

    with ScriptedServer(send_reply) as server, pytest.raises(httpx.RemoteProtocolError):
        await http().request("GET", server.url)


async def test_timeouts_and_refusals_raise_httpx_errors(http: Any) -> None:
    def silent(conn: socket.socket, server: ScriptedServer) -> None:
        server.stopping.wait()  # reads nothing, answers nothing

    def read_then_silent(conn: socket.socket, server: ScriptedServer) -> None:
        read_request(conn, bytearray())
        server.stopping.wait()

    client = http()
    with ScriptedServer(read_then_silent) as server, pytest.raises(httpx.ReadTimeout):
        await client.request("GET", server.url, timeout=httpx.Timeout(10, read=0.2))
    started = time.monotonic()
    with ScriptedServer(silent) as server, pytest.raises(httpx.WriteTimeout):
        await client.request(
            "POST", server.url, content=bytes(64 << 20), timeout=httpx.Timeout(10, write=0.3)
        )
    assert time.monotonic() - started < 5
    with socket.create_server(
        ("127.0.0.1", 0), backlog=0
    ) as full:  # never accepts: connects queue, then hang
        url = f"http://127.0.0.1:{full.getsockname()[1]}"
        queued = [socket.create_connection(full.getsockname()) for _ in range(1)]
        with pytest.raises(httpx.ConnectTimeout):
            await client.request("GET", url, timeout=httpx.Timeout(10, connect=0.2))
        for s in queued:
            s.close()
    with pytest.raises(httpx.ConnectError):
        await client.request("GET", f"http://127.0.0.1:{free_port()}")


async def test_sdk_timeouts_end_in_transport_error(sdk: Any) -> None:
    def read_then_silent(conn: socket.socket, server: ScriptedServer) -> None:
        read_request(conn, bytearray())
        server.stopping.wait()

    with ScriptedServer(read_then_silent) as server:
        client = await sdk(server.url, timeout=Timeout(base=0.2, per_mib=0.0), retries=0)
        with pytest.raises(optserve.TransportError) as caught:
            await resolve(client.health())
        assert isinstance(caught.value.__cause__, httpx.ReadTimeout)


async def test_an_answer_before_the_whole_request_stops_the_sending(http: Any) -> None:
    def refuse_early(conn: socket.socket, server: ScriptedServer) -> None:
        pending = bytearray()
        while b"\r\n\r\n" not in pending:
            pending += conn.recv(1 << 16)
        conn.sendall(answer(413, b"too large", {"Connection": "close"}))
        server.stopping.wait()  # and reads no more

    with ScriptedServer(refuse_early) as server:
        client = http()
        started = time.monotonic()
        response = await client.request("POST", server.url, content=bytes(64 << 20))
        assert (response.status_code, response.content) == (413, b"too large")
        assert time.monotonic() - started < 5
        assert client.transport.connections_opened == 1


async def test_a_cancelled_request_closes_its_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task cancelled while it waits for the answer closes the connection at once (not when the garbage
    collector finds it): it is not pooled, and the server sees the end of it."""
    taken, closed = threading.Event(), threading.Event()
    opened: list[socket.socket] = []  # also keeps the sockets from the garbage collector, which closes them

    def read_then_wait_for_the_end(conn: socket.socket, server: ScriptedServer) -> None:
        assert read_request(conn, bytearray()) is not None
        taken.set()
        if not conn.recv(1):
            closed.set()

    tune = _http_core.tune
    monkeypatch.setattr(_http_core, "tune", lambda sock, size: (opened.append(sock), tune(sock, size)))
    with ScriptedServer(read_then_wait_for_the_end) as server:
        transport = AsyncFastTransport()
        async with httpx.AsyncClient(transport=transport) as client:
            task = asyncio.create_task(client.get(server.url))
            assert await asyncio.to_thread(taken.wait, 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert [sock.fileno() for sock in opened] == [-1]
            assert await asyncio.to_thread(closed.wait, 5)
            assert transport._pool.take(("127.0.0.1", server.port)) is None


async def test_other_schemes_go_to_the_fallback_transport(kind: Kind) -> None:
    mock = httpx.MockTransport(lambda request: httpx.Response(200, text=str(request.url)))
    url = "https://example.test/x"
    if kind == "sync":
        with httpx.Client(transport=FastTransport(fallback=mock)) as client:
            assert client.get(url).text == url
    else:
        async with httpx.AsyncClient(transport=AsyncFastTransport(fallback=mock)) as aclient:
            assert (await aclient.get(url)).text == url
