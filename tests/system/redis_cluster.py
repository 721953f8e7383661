"""A real Redis Cluster of the test's own: three masters on loopback (`redis-server --cluster-enabled yes`,
each on a free port and in its own directory), joined by `redis-cli --cluster create`, slots spread over
all three. `.url()` names it for `--store` (`redis+cluster://`); `.flush()` empties every master;
`.owners(keys)` tells which master holds each key's slot."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.system.redis_server import RedisServer


def cluster_port() -> int:
    """A free port p <= 55535 whose bus port, p + 10000, is free too (Redis Cluster needs both)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 55_535)
        if all(_free(p) for p in (port, port + 10_000)):
            return port
    raise RuntimeError("no free pair of ports for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class RedisCluster:
    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(
                directory / f"node-{i}",
                cluster_port(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            )
            for i in range(masters)
        ]

    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> RedisCluster:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # no node outlives a cluster that did not come up
            raise

    def _start(self, timeout: float) -> RedisCluster:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli was not found; it comes with redis-server (`make test` installs it)")
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while not all(self._ok(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        return self

    @staticmethod
    def _ok(node: RedisServer) -> bool:
        client = redis.Redis(port=node.port)
        try:
            return bool(client.cluster("info")["cluster_state"] == "ok")
        finally:
            client.close()

    def flush(self) -> None:
        for node in self.nodes:
            client = redis.Redis(port=node.port)
            client.flushall()
            client.close()

    def owners(self, keys: list[str]) -> set[int]:
        """The ports of the masters that hold these keys."""
        client = redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)
        try:
            return {client.get_node_from_key(key).port for key in keys}
        finally:
            client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
