"""shmcast itself, through its public API only (``Bus``, ``subscribe``)."""

from __future__ import annotations

import itertools
import os
from typing import Any

from benchmarks.adapters.base import Peer, wait_until

_seq = itertools.count()
# Event header and type string share the slot with the payload; leave room for them.
_SLOT_OVERHEAD = 256


class ShmcastPeer(Peer):
    name = "shmcast"
    module = "shmcast_peer"
    semantics = "per-subscriber ring; a full ring overwrites its oldest event (counted drop)"

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            from shmcast import Bus, subscribe  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means "not runnable"
            return f"cannot import shmcast: {type(exc).__name__}: {exc}"
        return None

    def channel(self, n: int, max_bytes: int, depth: int) -> _Channel:
        return _Channel(n, max_bytes, depth)


class _Channel:
    def __init__(self, n: int, max_bytes: int, depth: int) -> None:
        import shmcast

        self.name = f"bench-{os.getpid()}-{next(_seq)}"
        slot_size = max(4096, max_bytes + _SLOT_OVERHEAD)
        self.bus = shmcast.Bus(
            self.name, slots=depth, slot_size=slot_size, max_subscribers=max(64, n)
        )
        self._publish = self.bus.publish

    def spec(self, index: int) -> Any:
        return self.name

    def wait_ready(self, n: int, deadline: float) -> None:
        wait_until(lambda: self.bus.subscriber_count >= n, deadline, "shmcast subscribers")

    def publish(self, obj: Any) -> None:
        self._publish("bench", obj)

    @property
    def dropped(self) -> int:
        return self.bus.dropped

    def close(self) -> None:
        self.bus.close()


class _Receiver:
    def __init__(self, name: str) -> None:
        import shmcast

        self._sub = shmcast.subscribe(name)
        self._get = self._sub.get
        self._closed_exc = shmcast.StreamClosed
        self.closed = False

    def recv(self, timeout: float) -> Any:
        if self.closed:
            return None
        try:
            return self._get(timeout=timeout).payload
        except TimeoutError:
            return None
        except self._closed_exc:
            self.closed = True
            return None

    def close(self) -> None:
        self._sub.unsubscribe()


def open_receiver(spec: Any) -> _Receiver:
    return _Receiver(spec)


__all__ = ["ShmcastPeer", "open_receiver"]
