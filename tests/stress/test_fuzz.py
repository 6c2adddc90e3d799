"""Hostile and corrupted bytes: a subscriber's own ring, the control segment, the registry.

A peer with write access to the bus's segments (a buggy or hostile subscriber
of the same user) must not be able to make the publisher or the other
subscribers crash, raise anything but ``ShmcastError``, stall, or miscount.
"""

from __future__ import annotations

import os
import time

import pytest
from _stress_helpers import DEV_SHM, bus_entries, remove_bus_entries

from shmcast import Bus, ShmcastError, subscribe
from shmcast._layout import RING_HEADER_SIZE, SLOT_HEADER_SIZE, slot_stride

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings(r"ignore:This process \(pid=\d+\) is multi-threaded"),
]


def _ring_path(name: str, sub: object) -> str:
    """The /dev/shm path of *sub*'s ring segment (its name ends with the ring id)."""
    ring_id = f"{sub._r.ring_id:016x}"  # type: ignore[attr-defined]
    (entry,) = [e for e in bus_entries(name) if e.startswith("shmcast.") and
                e.endswith(ring_id)]
    return os.path.join(DEV_SHM, entry)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_hostile_subscriber_resizing_its_ring_cannot_break_publish(bus_name):
    try:
        with Bus(bus_name, slots=4) as bus, subscribe(bus_name) as good:
            hostile = subscribe(bus_name)
            path = _ring_path(bus_name, hostile)
            fd = os.open(path, os.O_RDWR)
            try:
                os.ftruncate(fd, os.fstat(fd).st_size + 3)
            finally:
                os.close(fd)
            bus.publish("e", {"v": 1})  # adopts both rings: the hostile one may be refused
            assert good.get(timeout=5).payload == {"v": 1}
            fds = _fds()
            published = 1
            deadline = time.monotonic() + 0.8  # spans three of the publisher's liveness scans
            while time.monotonic() < deadline:
                bus.publish("e", {"v": published + 1})
                published += 1
                ev = good.get(timeout=5)
                assert ev.payload == {"v": published}
                time.sleep(0.005)
            assert _fds() <= fds, "the publisher leaks fds on the hostile ring"
            hostile.unsubscribe()
    finally:
        remove_bus_entries(bus_name)


def test_garbage_payload_in_a_complete_slot_is_skipped_and_counted(bus_name):
    try:
        with Bus(bus_name, slots=8, slot_size=64) as bus, subscribe(bus_name) as sub:
            for v in (1, 2, 3):
                bus.publish("e", {"v": v})
            # Event index 1 sits in slot 1; overwrite the first payload bytes, keep its seq.
            off = RING_HEADER_SIZE + 1 * slot_stride(64) + SLOT_HEADER_SIZE + len(b"e")
            fd = os.open(_ring_path(bus_name, sub), os.O_RDWR)
            try:
                os.pwrite(fd, b"\xff\xfe\x00", off)
            finally:
                os.close(fd)
            received = []
            for _ in range(4):  # at most 3 events; a ShmcastError for the bad one is fine
                try:
                    received.append(sub.get(timeout=0).version)
                except TimeoutError:
                    break
                except ShmcastError:
                    continue
            assert received == [1, 3]
            assert len(received) + sub.dropped == 3, (received, sub.dropped)
    finally:
        remove_bus_entries(bus_name)
