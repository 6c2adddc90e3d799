"""The small interface every peer adapter implements.

A *peer* is one way to broadcast from one publisher process to N subscriber
processes. The harness drives it in three steps:

1. ``Peer(opts)`` once per run: session-wide resources (a ``redis-server``).
   ``unavailable()`` says why the peer cannot run on this machine, or ``None``.
2. ``peer.channel(n, max_bytes, depth)`` once per trial: the publisher side.
   ``channel.spec(i)`` is the picklable argument handed to subscriber ``i``'s
   process, ``channel.wait_ready(n, deadline)`` returns once every subscriber
   will receive the next publish, ``channel.publish(obj)`` encodes *obj* once and
   sends it to every subscriber, ``channel.close()`` releases everything.
3. In each subscriber process, ``open_receiver(spec)`` (a module-level function
   of the adapter module) returns an object whose ``recv(timeout)`` gives the
   next decoded payload, or ``None`` when nothing arrived within *timeout*
   seconds, and whose ``close()`` detaches.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Options:
    """Run-wide knobs the adapters read."""

    json: str = "stdlib"
    tmpdir: str = "/tmp"
    extra: dict[str, Any] = field(default_factory=dict)


class Channel(Protocol):
    def spec(self, index: int) -> Any: ...
    def wait_ready(self, n: int, deadline: float) -> None: ...
    def publish(self, obj: Any) -> None: ...
    def close(self) -> None: ...


class Receiver(Protocol):
    def recv(self, timeout: float) -> Any: ...
    def close(self) -> None: ...


class Peer:
    """Base class: a peer with no session resources."""

    #: name shown in the tables
    name = "?"
    #: module (under ``benchmarks.adapters``) holding ``open_receiver``
    module = "?"
    #: how the peer behaves when a subscriber is behind (for the docs)
    semantics = ""

    def __init__(self, opts: Options) -> None:
        self.opts = opts

    @classmethod
    def unavailable(cls) -> str | None:
        return None

    def channel(self, n: int, max_bytes: int, depth: int) -> Channel:
        raise NotImplementedError

    def close(self) -> None:
        """Release session resources. Idempotent."""


def wait_until(pred: Any, deadline: float, what: str, poll: float = 0.005) -> None:
    """Poll *pred* until it is true; raise ``TimeoutError`` naming *what* at *deadline*."""
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll)


class QueueReceiver:
    """The subscriber side of the queue peers: a queue whose ``get`` raises ``queue.Empty``."""

    def __init__(self, q: Any) -> None:
        from benchmarks import _codec

        self._get = q.get
        self._loads = _codec.get()[1]

    def recv(self, timeout: float) -> Any:
        try:
            return self._loads(self._get(timeout=timeout))
        except queue.Empty:
            return None

    def close(self) -> None:
        pass


__all__ = [
    "Channel", "Options", "Peer", "QueueReceiver", "Receiver", "wait_until"]
