"""Redis pub/sub over a unix socket, against a real ``redis-server``.

The session starts its own ``redis-server`` on a socket in a temporary folder
with no TCP port (``--port 0``) and stops it by pid.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from typing import Any

from benchmarks import _codec
from benchmarks.adapters.base import Peer, wait_until

_seq = itertools.count()


def _server_binary() -> str | None:
    return os.environ.get("REDIS_SERVER") or shutil.which("redis-server")


class RedisPeer(Peer):
    name = "redis"
    module = "redis_peer"
    semantics = (
        "pub/sub through redis-server on a unix socket; the server buffers per client and"
        " disconnects one past its output limit"
    )

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import redis  # noqa: F401
        except ImportError as exc:
            return f"redis-py not installed ({exc})"
        if _server_binary() is None:
            return "no redis-server binary on PATH (apt-get install redis-server)"
        return None

    def __init__(self, opts: Any) -> None:
        super().__init__(opts)
        import redis

        self.dir = os.path.join(opts.tmpdir, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.sock = os.path.join(self.dir, "redis.sock")
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [
                str(_server_binary()),
                "--port",
                "0",
                "--unixsocket",
                self.sock,
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--logfile",
                os.path.join(self.dir, "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self.client = redis.Redis(unix_socket_path=self.sock)
            deadline = time.monotonic() + 10

            def up() -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
                try:
                    return bool(self.client.ping())
                except redis.ConnectionError:
                    return False

            wait_until(up, deadline, "redis-server to answer PING", poll=0.02)
        except BaseException:
            self.close()
            raise

    def channel(self, n: int, max_bytes: int, depth: int) -> _Channel:
        return _Channel(self.client, self.sock, f"bench-{next(_seq)}", self.opts.json)

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Channel:
    def __init__(self, client: Any, sock: str, channel: str, json_impl: str) -> None:
        self.client = client
        self.sock = sock
        self.chan = channel
        self._pub = client.publish
        self._dumps = _codec.get(json_impl)[0]

    def spec(self, index: int) -> Any:
        return (self.sock, self.chan)

    def wait_ready(self, n: int, deadline: float) -> None:
        wait_until(
            lambda: self.client.pubsub_numsub(self.chan)[0][1] >= n, deadline, "redis subscribers"
        )

    def publish(self, obj: Any) -> None:
        self._pub(self.chan, self._dumps(obj))

    def close(self) -> None:
        pass


class _Receiver:
    def __init__(self, spec: Any) -> None:
        import redis

        sock, chan = spec
        self.client = redis.Redis(unix_socket_path=sock)
        self.ps = self.client.pubsub(ignore_subscribe_messages=True)
        self.ps.subscribe(chan)
        self._get = self.ps.get_message
        self._loads = _codec.get()[1]

    def recv(self, timeout: float) -> Any:
        m = self._get(timeout=timeout)
        if m is None or m["type"] != "message":
            return None
        return self._loads(m["data"])

    def close(self) -> None:
        self.ps.close()
        self.client.close()


def open_receiver(spec: Any) -> _Receiver:
    return _Receiver(spec)


__all__ = ["RedisPeer", "open_receiver"]
