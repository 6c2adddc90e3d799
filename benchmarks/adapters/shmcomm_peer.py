"""shm-comm 1.0.0 PUB/SUB: one shared ring, a private read cursor per subscriber.

The publisher writes a slot (a 4-byte length, then the bytes) and then moves the
shared head; each subscriber keeps its own cursor and polls the head, sleeping
100 µs between polls (``shm_comm.utils.poll_until``). Nothing tells a reader that
the slot it copies is being overwritten, or that the writer went round the ring
past it: a torn copy is returned as is, and a lapped reader skips events (or a
whole ring, when its cursor happens to equal the head again).

So the adapter appends a CRC-32 of the JSON bytes to each slot (``send_bytes``:
the suite's one JSON encode, shm-comm's pickling bypassed, as for faster-fifo),
and each subscriber checks it: a copy whose checksum does not match is counted
*torn* (in a shared array the harness reads, ``channel.torn``) and not delivered.
Lapped events show up as lost, like any other peer's. The checksum costs the
publish and each delivery one ``zlib.crc32`` over the payload (about 0.1 µs at
100 B), work the other peers do not do.
"""

from __future__ import annotations

import itertools
import os
import zlib
from typing import Any

from benchmarks import _codec
from benchmarks.adapters.base import Peer

_seq = itertools.count()
# The segment name shm-comm derives from a channel name; the harness's /dev/shm
# check (run._shm_entries) looks for this prefix.
SEGMENT_PREFIX = "shmcomm_pub_shmcast-bench-"
_CRC = 4  # bytes of CRC-32 after the payload
_PREFIX = 4  # shm-comm's length prefix in each slot


class ShmCommPeer(Peer):
    name = "shm-comm"
    module = "shmcomm_peer"
    semantics = (
        "one shared ring, private cursors, readers poll every 100 µs; a lapped reader skips"
        " events, a copy the writer overwrites midway is returned torn (checked by CRC-32 here)"
    )

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            from shm_comm.patterns.pubsub import Publisher, Subscriber  # noqa: F401
        except ImportError as exc:
            return f"shm-comm not installed ({exc})"
        return None

    def channel(self, n: int, max_bytes: int, depth: int) -> _Channel:
        name = f"shmcast-bench-{os.getpid()}-{next(_seq)}"
        return _Channel(name, n, max_bytes, depth, self.opts.json)


class _Channel:
    def __init__(self, name: str, n: int, max_bytes: int, depth: int, json_impl: str) -> None:
        from shm_comm.patterns.pubsub import Publisher

        from benchmarks.run import context

        self.name = name
        # One counter per subscriber, shared like the harness's own counters.
        self._torn = context().RawArray("q", n)
        # Room for the length prefix, the checksum and the few bytes a payload's
        # digits may add over its nominal size.
        self.pub = Publisher(name, num_slots=depth, slot_size=max_bytes + 64 + _PREFIX + _CRC)
        self._send = self.pub.send_bytes
        self._dumps = _codec.get(json_impl)[0]
        self._crc = zlib.crc32

    def spec(self, index: int) -> Any:
        return (self.name, self._torn, index)

    @property
    def torn(self) -> int:
        """Copies the subscribers rejected because their checksum did not match."""
        return sum(self._torn)

    def wait_ready(self, n: int, deadline: float) -> None:
        """A subscriber's cursor starts at the head when it attaches, which it did
        before it reported ready: nothing to wait for."""

    def publish(self, obj: Any) -> None:
        data = self._dumps(obj)
        self._send(data + self._crc(data).to_bytes(_CRC, "little"))

    def close(self) -> None:
        self.pub.close()


class _Receiver:
    def __init__(self, spec: Any) -> None:
        from shm_comm.patterns.pubsub import Subscriber

        name, self._torn, self._index = spec
        self.sub = Subscriber(name, timeout_connect=10.0)
        self._recv = self.sub.recv_bytes
        self._loads = _codec.get()[1]
        self._crc = zlib.crc32

    def recv(self, timeout: float) -> Any:
        raw = self._recv(timeout)
        if raw is None:
            return None
        body = raw[:-_CRC]
        if len(raw) < _CRC or self._crc(body).to_bytes(_CRC, "little") != raw[-_CRC:]:
            self._torn[self._index] += 1
            return None
        return self._loads(body)

    def close(self) -> None:
        self.sub.close()


def open_receiver(spec: Any) -> _Receiver:
    return _Receiver(spec)


__all__ = ["SEGMENT_PREFIX", "ShmCommPeer", "open_receiver"]
