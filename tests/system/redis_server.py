"""A real `redis-server` of the test's own: loopback, free port, temp dir, AOF with `appendfsync always`.

`RedisServer(dir).start()`; `.url()` names it for `--store`; `.kill()` is SIGKILL (nothing flushed that
was not already fsynced), `.shutdown()` is a clean SHUTDOWN; `.start()` again reopens the same dir (and
replays the AOF) on the same port. There is no skip when redis-server is missing: the Redis store is part
of the suite, and `make test` installs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.system.server import free_port

MISSING = (
    "redis-server was not found (looked at $OPTSERVE_REDIS_SERVER and PATH). The Redis store tests need a "
    "real one: `make test` installs it (Debian/Ubuntu: `apt-get install -y redis-server`; macOS: "
    "`brew install redis`), or point OPTSERVE_REDIS_SERVER at the binary."
)


def redis_server_binary() -> str:
    """The redis-server to run; fails the test (never skips) when there is none."""
    configured = os.environ.get("OPTSERVE_REDIS_SERVER")
    found = configured if configured and Path(configured).is_file() else shutil.which("redis-server")
    if found is None:
        pytest.fail(MISSING, pytrace=False)
    return found


def _ping(port: int, timeout: float = 0.5) -> bool:
    """True when the server answers PING (not while it is still loading its AOF: -LOADING)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None, *extra: str) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self._may_move = port is None  # until the first start, a port taken meanwhile is swapped for another
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def command(self) -> list[str]:
        return [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.dir / "redis.log"),
            *self.extra,
        ]

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Starts (or restarts, on the same dir and port) and returns once PING answers PONG."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        for _ in range(3 if self._may_move else 1):
            try:
                self._start(timeout)
                break
            except RuntimeError:
                if not self._may_move or "already in use" not in self.log_tail():
                    raise
                self.port = free_port()
        self._may_move = False
        return self

    def _start(self, timeout: float) -> None:
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log_tail()}")
            if _ping(self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING within {timeout}s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        log = self.dir / "redis.log"
        return "\n".join(log.read_text().splitlines()[-lines:]) if log.exists() else "(no log)"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: what the AOF holds (fsynced on every write with `always`) is all that survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def shutdown(self) -> None:
        """A clean SHUTDOWN (the AOF is flushed), falling back to SIGKILL."""
        if not self.running():
            return
        assert self.proc is not None
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"SHUTDOWN\r\n")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()

    def restart(self, hard: bool = True) -> RedisServer:
        """SIGKILL (or SHUTDOWN when `hard` is false), then start again on the same dir and port."""
        if hard:
            self.kill()
        else:
            self.shutdown()
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.kill()
