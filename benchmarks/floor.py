"""The floor: the publish loop stripped to what a shared-memory ring design cannot avoid.

Per publish: one JSON encode and one timestamp; per subscriber ring: one header
``struct.pack_into``, one payload copy into an ``mmap`` and one POSIX semaphore
post (nobody waits on it). One process, no locking, no bookkeeping. The matching
``get`` floor is: header unpack, payload copy out, one JSON decode.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Any

from benchmarks import _codec

# version u64, length u32, type length u16, flags u16, timestamp f64
HEADER = struct.Struct("<QIHHd")


def payloads(k: int, pad: str) -> list[dict[str, Any]]:
    """*k* distinct event payloads (built before any timing starts)."""
    mono = time.monotonic_ns
    return [{"t": mono(), "i": i, "d": pad} for i in range(k)]


def publish_floor(
    n: int,
    objs: list[dict[str, Any]],
    slot_size: int,
    json_impl: str = "stdlib",
) -> float:
    """Seconds per publish to *n* rings of ``len(objs)`` slots, over *objs*."""
    import posix_ipc

    dumps = _codec.get(json_impl)[0]
    slots = len(objs)
    rings: list[mmap.mmap] = []
    sems: list[Any] = []
    try:
        for j in range(n):
            ring = mmap.mmap(-1, slots * slot_size)
            ring.write(b"\0" * len(ring))  # fault the pages in before timing
            rings.append(ring)
            sems.append(
                posix_ipc.Semaphore(
                    f"/shmcast-bench-floor-{os.getpid()}-{j}", posix_ipc.O_CREX, 0o600, 0
                )
            )
        targets = [(ring, sem.release) for ring, sem in zip(rings, sems, strict=True)]
        pack = HEADER.pack_into
        hsize = HEADER.size
        now = time.time
        t0 = time.perf_counter()
        for v, obj in enumerate(objs, 1):
            data = dumps(obj)
            ln = len(data)
            ts = now()
            off = (v - 1) * slot_size
            for ring, post in targets:
                pack(ring, off, v, ln, 5, 0, ts)
                ring[off + hsize : off + hsize + ln] = data
                post()
        return (time.perf_counter() - t0) / len(objs)
    finally:
        for sem in sems:
            sem.unlink()
            sem.close()
        for ring in rings:
            ring.close()


def get_floor(objs: list[dict[str, Any]], slot_size: int, json_impl: str = "stdlib") -> float:
    """Seconds per ``get`` floor: header unpack, payload copy out, JSON decode."""
    dumps, loads = _codec.get(json_impl)
    ring = bytearray(len(objs) * slot_size)
    hsize = HEADER.size
    for v, obj in enumerate(objs):
        data = dumps(obj)
        HEADER.pack_into(ring, v * slot_size, v + 1, len(data), 5, 0, time.time())
        ring[v * slot_size + hsize : v * slot_size + hsize + len(data)] = data
    view = memoryview(ring)
    unpack = HEADER.unpack_from
    t0 = time.perf_counter()
    for v in range(len(objs)):
        off = v * slot_size
        _, ln, _, _, _ = unpack(view, off)
        loads(bytes(view[off + hsize : off + hsize + ln]))
    return (time.perf_counter() - t0) / len(objs)


__all__ = ["HEADER", "get_floor", "payloads", "publish_floor"]
