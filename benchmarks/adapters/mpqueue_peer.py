"""``multiprocessing.Queue``, one per subscriber (unbounded, the stdlib default)."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

from benchmarks import _codec
from benchmarks.adapters.base import Peer, QueueReceiver


class MpQueuePeer(Peer):
    name = "mp.Queue"
    module = "mpqueue_peer"
    semantics = "unbounded queue per subscriber; a slow reader grows the publisher's memory"

    def channel(self, n: int, max_bytes: int, depth: int) -> _Channel:
        return _Channel(n, self.opts.json)


class _Channel:
    def __init__(self, n: int, json_impl: str) -> None:
        ctx = mp.get_context("forkserver")
        self.queues = [ctx.Queue() for _ in range(n)]
        self._dumps = _codec.get(json_impl)[0]
        self._puts = [q.put for q in self.queues]

    def spec(self, index: int) -> Any:
        return self.queues[index]

    def wait_ready(self, n: int, deadline: float) -> None:
        """Each queue exists before its subscriber starts: nothing to wait for."""

    def publish(self, obj: Any) -> None:
        data = self._dumps(obj)
        for put in self._puts:
            put(data)

    def close(self) -> None:
        for q in self.queues:
            # Drop what a stopped reader left behind instead of blocking exit on it.
            q.cancel_join_thread()
            q.close()
        for q in self.queues:
            q.join_thread()


def open_receiver(spec: Any) -> QueueReceiver:
    return QueueReceiver(spec)


__all__ = ["MpQueuePeer", "open_receiver"]
