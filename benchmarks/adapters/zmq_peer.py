"""pyzmq PUB/SUB over ``ipc://`` (an XPUB socket, so the publisher sees who subscribed).

High-water marks are set to the run's queue depth on both sides; a PUB socket
drops for a subscriber whose queue is full.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from typing import Any

from benchmarks import _codec
from benchmarks.adapters.base import Peer

_seq = itertools.count()


class ZmqPeer(Peer):
    name = "zmq"
    module = "zmq_peer"
    semantics = (
        "PUB/SUB over ipc://, HWM = depth on both sides; drops when a subscriber's queue is full"
    )

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import zmq  # noqa: F401
        except ImportError as exc:
            return f"pyzmq not installed ({exc})"
        return None

    def channel(self, n: int, max_bytes: int, depth: int) -> _Channel:
        path = os.path.join(self.opts.tmpdir, f"zmq-{next(_seq)}.ipc")
        return _Channel(path, depth, self.opts.json)


class _Channel:
    def __init__(self, path: str, depth: int, json_impl: str) -> None:
        import zmq

        self._zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.sock.setsockopt(zmq.SNDHWM, depth)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.addr = f"ipc://{path}"
        self.path = path
        self.depth = depth
        self.sock.bind(self.addr)
        self._send = self.sock.send
        self._dumps = _codec.get(json_impl)[0]

    def spec(self, index: int) -> Any:
        return (self.addr, self.depth)

    def wait_ready(self, n: int, deadline: float) -> None:
        seen = 0
        while seen < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"zmq: {seen} of {n} subscriptions arrived")
            if self.sock.poll(int(left * 1000) + 1):
                msg = self.sock.recv()
                if msg[:1] == b"\x01":
                    seen += 1

    def publish(self, obj: Any) -> None:
        self._send(self._dumps(obj))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _Receiver:
    def __init__(self, spec: Any) -> None:
        import zmq

        addr, depth = spec
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, depth)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addr)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._recv = self.sock.recv
        self._poll = self.sock.poll
        self._again = zmq.Again
        self._noblock = zmq.NOBLOCK
        self._loads = _codec.get()[1]

    def recv(self, timeout: float) -> Any:
        try:
            return self._loads(self._recv(self._noblock))
        except self._again:
            pass
        if self._poll(int(timeout * 1000)):
            return self._loads(self._recv())
        return None

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def open_receiver(spec: Any) -> _Receiver:
    return _Receiver(spec)


__all__ = ["ZmqPeer", "open_receiver"]
