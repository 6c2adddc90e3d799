"""faster-fifo, one bounded queue per subscriber.

The queue's own pickling is bypassed (``dumps``/``loads`` pass bytes through), so
the only serialisation is the suite's one JSON encode and decode. A full queue
makes ``put`` block (faster-fifo's default); the adapter gives up after
``PUT_TIMEOUT`` seconds and the event is counted lost for that subscriber.
"""

from __future__ import annotations

import queue
from typing import Any

from benchmarks import _codec
from benchmarks.adapters.base import Peer, QueueReceiver

PUT_TIMEOUT = 0.5


def _identity(b: Any) -> Any:
    return b


class FasterFifoPeer(Peer):
    name = "faster-fifo"
    module = "fasterfifo_peer"
    semantics = (
        f"bounded queue per subscriber; a full queue blocks put (given up after {PUT_TIMEOUT} s)"
    )

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import faster_fifo  # noqa: F401
        except ImportError as exc:
            return f"faster-fifo not installed ({exc})"
        return None

    def channel(self, n: int, max_bytes: int, depth: int) -> _Channel:
        return _Channel(n, max_bytes, depth, self.opts.json)


class _Channel:
    def __init__(self, n: int, max_bytes: int, depth: int, json_impl: str) -> None:
        from faster_fifo import Queue

        # faster-fifo bounds a queue in bytes: hold *depth* events of this size.
        size = max(200_000, depth * (max_bytes + 64))
        self.queues = [Queue(size, loads=bytes, dumps=_identity) for _ in range(n)]
        self._dumps = _codec.get(json_impl)[0]
        self._puts = [q.put for q in self.queues]

    def spec(self, index: int) -> Any:
        return self.queues[index]

    def wait_ready(self, n: int, deadline: float) -> None:
        """Each queue exists before its subscriber starts: nothing to wait for."""

    def publish(self, obj: Any) -> None:
        data = self._dumps(obj)
        for put in self._puts:
            try:  # noqa: SIM105 - contextlib.suppress costs more per call
                put(data, timeout=PUT_TIMEOUT)
            except queue.Full:
                pass

    def close(self) -> None:
        for q in self.queues:
            q.close()


def open_receiver(spec: Any) -> QueueReceiver:
    return QueueReceiver(spec)


__all__ = ["FasterFifoPeer", "open_receiver"]
