"""A throwaway local redis-server on a free loopback port, no persistence: for tests and benchmarks.

Started with ``--bind 127.0.0.1 --save ''`` (Debian's binary listens on every
interface otherwise); ``stop`` kills it, ``start`` brings up a fresh, empty one
on the same port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import redis


class RedisServer:
    """A real redis-server on a free loopback port (no persistence), stoppable and restartable."""

    def __init__(self, tmp: os.PathLike[str] | str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.dir = str(tmp)
        os.makedirs(self.dir, exist_ok=True)
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
