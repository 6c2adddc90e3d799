"""The subscriber registry in the control segment: joining and leaving places, liveness, reclaiming.

A place is taken by holding its OFD lock, so the kernel frees it when its
subscriber dies; the entry's bytes only describe the ring of whoever holds it.
Subscribers bump the registry epoch, under the registry lock, after joining
or leaving, so the publisher re-reads the registry only when it changed (plus
a periodic check that catches deaths, which change nothing in the bytes).

Each entry has two halves with one writer each (see ``_layout``): the
subscriber describes its ring, the publisher says whether it serves it and
how many events the ring missed while it could not. Every shared field is
written with one aligned store, the entry's state last.

Publisher places follow the registry and work the same way, with locks from
``_ipc.PLACE_LOCK_BASE``; their inboxes belong to the bus, so joining and
leaving create and remove nothing, and no epoch is bumped: the bus owner
drains every inbox whoever holds its place.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from typing import NamedTuple

from . import _ipc
from ._errors import BusNotFoundError, BusPermissionError, ShmcastError
from ._layout import (
    ENTRY_ACTIVE,
    ENTRY_JOINING,
    ENTRY_LEFT,
    ERRNO_OFF,
    I_STATE,
    MISSED_OFF,
    PUB_JOINED_OFF,
    PUB_REJECTED0_OFF,
    PUB_W0_OFF,
    Q_EPOCH,
    SERVE_PENDING,
    SERVED_OFF,
    STATE_CLOSED,
    Entry,
    Geometry,
    entry_i,
    entry_q,
    parse_control_header,
    pub_entry_index,
    read_entry,
    read_pub_entry,
)
from ._names import control_name, drain_name, inbox_name, ring_name

# subscribe() may wait this long for a registry lock held by another process;
# only a stopped (SIGSTOP) holder makes it wait at all.
REGISTRY_TIMEOUT = 5.0

# The entry fields each side stores, as (offset within the entry, width).
_PID, _RING_ID, _SLOTS, _JOINED = (4, 4), (8, 8), (16, 4), (24, 8)
_SERVED_RING_OFF = 48
_F64 = struct.Struct("<d")


class Views:
    """The u32 and u64 views of a control segment that every shared store goes through."""

    __slots__ = ("i", "q", "seg")

    def __init__(self, seg: _ipc.Segment) -> None:
        self.seg = seg
        # Whole u64s only: a peer may have grown the file to any size (385 bytes...),
        # and cast() refuses a length that is not a multiple of the item size.
        whole = seg.buf[: len(seg.buf) & ~7]
        self.q = whole.cast("Q")
        self.i = whole.cast("I")

    def release(self) -> None:
        """Drop the views so the segment can be unmapped."""
        self.q.release()
        self.i.release()


def _store(v: Views, index: int, field: tuple[int, int], value: int) -> None:
    off, width = field
    if width == 8:
        v.q[entry_q(index, off)] = value
    else:
        v.i[entry_i(index, off)] = value


def entries(seg: _ipc.Segment, max_subscribers: int) -> Iterator[tuple[int, Entry]]:
    """Every place's index and entry."""
    buf = seg.buf
    for index in range(max_subscribers):
        yield index, read_entry(buf, index)


class Place:
    """A subscriber's place in the registry and the name of its ring."""

    __slots__ = ("index", "ring_id")

    def __init__(self, index: int, ring_id: int) -> None:
        self.index = index
        self.ring_id = ring_id


def join(v: Views, bus: str, nonce: int, max_subscribers: int, slots: int, pid: int,
         ring_id: int) -> Place | None:
    """Take the first free place and describe our ring in it (state joining); None if full.

    The ring id goes into the entry before the ring exists, so whoever cleans
    up after us (if we die now) knows the names to remove.
    """
    seg = v.seg
    for index in range(max_subscribers):
        if _ipc.try_lock(seg.fd, _ipc.ENTRY_LOCK_BASE + index):
            break
    else:
        return None
    previous = read_entry(seg.buf, index).ring_id
    if previous:
        # The place's last holder left or died; if it died, its names are ours to remove.
        unlink_ring(bus, nonce, previous)
    v.i[entry_i(index, 0)] = ENTRY_JOINING
    _store(v, index, _PID, pid)
    _store(v, index, _RING_ID, ring_id)
    _store(v, index, _SLOTS, slots)
    _store(v, index, _JOINED, int.from_bytes(_F64.pack(time.time()), "little"))
    return Place(index, ring_id)


def activate(v: Views, index: int) -> bool:
    """Mark our entry active and bump the epoch, unless the bus is closed (then False).

    Done under the registry lock, which close() also tries to hold while it
    ends every stream: either close() sees this entry, or this sees the bus closed.

    :raises ShmcastError: if the registry lock stays taken (its holder is stopped).
    """
    with _ipc.locked(v.seg.fd, _ipc.REGISTRY_LOCK, REGISTRY_TIMEOUT, "registry lock"):
        if v.i[I_STATE] == STATE_CLOSED:
            return False
        v.i[entry_i(index, 0)] = ENTRY_ACTIVE
        v.q[Q_EPOCH] += 1
        return True


def leave(v: Views, bus: str, nonce: int, place: Place) -> None:
    """Give up our place and our ring's names at once; never waits.

    The epoch is bumped only if the registry lock is free: if a stopped
    process holds it, the publisher's periodic scan sees the place freed instead.
    """
    seg = v.seg
    v.i[entry_i(place.index, 0)] = ENTRY_LEFT
    _ipc.unlock(seg.fd, _ipc.ENTRY_LOCK_BASE + place.index)
    if _ipc.try_lock(seg.fd, _ipc.REGISTRY_LOCK):
        try:
            v.q[Q_EPOCH] += 1
        finally:
            _ipc.unlock(seg.fd, _ipc.REGISTRY_LOCK)
    unlink_ring(bus, nonce, place.ring_id)


def bump_epoch(v: Views, timeout: float = REGISTRY_TIMEOUT) -> None:
    """Tell the publisher the registry changed.

    :raises ShmcastError: if the registry lock stays taken for *timeout* seconds.
    """
    with _ipc.locked(v.seg.fd, _ipc.REGISTRY_LOCK, timeout, "registry lock"):
        v.q[Q_EPOCH] += 1


# The publisher's half of an entry.
class Service(NamedTuple):
    """What the publisher says of one ring: served or not, why not, and what it missed."""

    status: int
    errno: int
    missed: int


def service(v: Views, index: int, ring_id: int) -> Service:
    """The publisher's word on our ring (pending with nothing missed until it has one)."""
    if v.q[entry_q(index, _SERVED_RING_OFF)] != ring_id:
        return Service(SERVE_PENDING, 0, 0)
    return Service(v.i[entry_i(index, SERVED_OFF)], v.i[entry_i(index, ERRNO_OFF)],
                   v.q[entry_q(index, MISSED_OFF)])


def start_service(v: Views, index: int, ring_id: int) -> None:
    """Begin the publisher's half for a new ring: nothing missed yet, then its id."""
    v.q[entry_q(index, MISSED_OFF)] = 0
    v.i[entry_i(index, SERVED_OFF)] = SERVE_PENDING
    v.i[entry_i(index, ERRNO_OFF)] = 0
    v.q[entry_q(index, _SERVED_RING_OFF)] = ring_id


def set_service(v: Views, index: int, status: int, err: int = 0) -> None:
    """Say whether the ring of place *index* is served (errno first, then the status)."""
    v.i[entry_i(index, ERRNO_OFF)] = err
    v.i[entry_i(index, SERVED_OFF)] = status


def missed_index(index: int) -> int:
    """Index in the u64 view of place *index*'s missed counter."""
    return entry_q(index, MISSED_OFF)


def place_held(seg: _ipc.Segment, index: int) -> bool:
    """Whether some other open file description holds place *index*."""
    return _ipc.is_locked(seg.fd, _ipc.ENTRY_LOCK_BASE + index)


def count_active(seg: _ipc.Segment, max_subscribers: int) -> int:
    """Live subscribers: active entries whose place is held."""
    return sum(1 for index, entry in entries(seg, max_subscribers)
               if entry.state == ENTRY_ACTIVE and place_held(seg, index))


def unlink_ring(bus: str, nonce: int, ring_id: int) -> None:
    """Remove a ring's segment and semaphore names."""
    name = ring_name(bus, nonce, ring_id)
    _ipc.unlink_segment(name)
    _ipc.unlink_semaphore(name)


# Publisher places.
def take_publisher_place(v: Views, max_subscribers: int, max_publishers: int,
                         pid: int) -> int | None:
    """Take the first free publisher place (state joining); its number, None if all are taken."""
    for place in range(max_publishers):
        if _ipc.try_lock(v.seg.fd, _ipc.PLACE_LOCK_BASE + place):
            index = pub_entry_index(max_subscribers, place)
            v.i[entry_i(index, 0)] = ENTRY_JOINING
            _store(v, index, _PID, pid)
            return place
    return None


def activate_publisher(v: Views, max_subscribers: int, place: int, w0: int,
                       rejected0: int) -> None:
    """Record where our counts start in the place's inbox, then mark the place active."""
    index = pub_entry_index(max_subscribers, place)
    v.q[entry_q(index, PUB_W0_OFF)] = w0
    v.q[entry_q(index, PUB_REJECTED0_OFF)] = rejected0
    v.q[entry_q(index, PUB_JOINED_OFF)] = int.from_bytes(_F64.pack(time.time()), "little")
    v.i[entry_i(index, 0)] = ENTRY_ACTIVE


def leave_publisher(v: Views, max_subscribers: int, place: int) -> None:
    """Give up our publisher place at once; never waits."""
    v.i[entry_i(pub_entry_index(max_subscribers, place), 0)] = ENTRY_LEFT
    _ipc.unlock(v.seg.fd, _ipc.PLACE_LOCK_BASE + place)


def publisher_place_held(seg: _ipc.Segment, place: int) -> bool:
    """Whether some other open file description holds publisher place *place*."""
    return _ipc.is_locked(seg.fd, _ipc.PLACE_LOCK_BASE + place)


def count_publishers(seg: _ipc.Segment, max_subscribers: int, max_publishers: int) -> int:
    """Attached live publishers: active places whose lock is held."""
    return sum(1 for place in range(max_publishers)
               if read_pub_entry(seg.buf, max_subscribers, place).state == ENTRY_ACTIVE
               and publisher_place_held(seg, place))


def unlink_publisher_objects(bus: str, nonce: int, max_publishers: int) -> None:
    """Remove the drain semaphore and every inbox of a bus (the bus created them all)."""
    for place in range(max_publishers):
        _ipc.unlink_segment(inbox_name(bus, nonce, place))
    if max_publishers:
        _ipc.unlink_semaphore(drain_name(bus, nonce))


def check_attachable(seg: _ipc.Segment, bus: str, owner: int | None, what: str) -> Geometry:
    """The geometry of a live bus a subscriber or publisher may attach to.

    The owner is checked before a byte of the segment is read: a segment
    another user made under the name could say anything.

    :param what: who attaches (``"subscribe"``, ``"Publisher"``), for the message.
    :raises BusPermissionError: if the segment belongs to another uid than *owner*
        (the caller's effective uid by default).
    :raises BusNotFoundError: if the bus is being created, closed or dead.
    :raises ShmcastError: if it is not a shmcast bus of this layout.
    """
    want = os.geteuid() if owner is None else owner
    got = seg.owner()
    if got != want:
        raise BusPermissionError(
            f"bus {bus!r} belongs to uid {got}, not {want}: pass owner={got} to "
            f"{what} only if you trust that user"
        )
    geometry = parse_control_header(seg.buf, seg.size)
    if geometry.state == STATE_CLOSED:
        raise BusNotFoundError(f"bus {bus!r} is closed")
    if not publisher_alive(seg):
        raise BusNotFoundError(
            f"bus {bus!r} is dead: its owner (pid {geometry.pid}) exited without closing it"
        )
    return geometry


def publisher_alive(seg: _ipc.Segment) -> bool:
    """Whether the publisher still holds the bus."""
    return _ipc.is_locked(seg.fd, _ipc.PUBLISHER_LOCK)


def reclaim_dead_bus(seg: _ipc.Segment, bus: str) -> bool:
    """Unlink a bus whose publisher is dead, with the rings of its dead subscribers.

    Rings of live subscribers are left to them. Whoever reclaims holds the
    reclaim lock and checks that the name still resolves to this very segment,
    so two reclaimers, or a reclaimer and a new publisher, never unlink a
    newer bus of the same name.

    :returns: whether this call unlinked the control segment.
    """
    if not _ipc.try_lock(seg.fd, _ipc.RECLAIM_LOCK):
        return False
    try:
        if publisher_alive(seg) or not seg.still_named():
            return False
        try:
            geometry = parse_control_header(seg.buf, seg.size)
        except ShmcastError:
            geometry = None  # not a readable bus: nothing of it but the name to remove
        if geometry is not None:
            for index, entry in entries(seg, geometry.max_subscribers):
                if entry.ring_id and not place_held(seg, index):
                    unlink_ring(bus, geometry.nonce, entry.ring_id)
            # Before the control segment: its header is what names them.
            unlink_publisher_objects(bus, geometry.nonce, geometry.max_publishers)
        _ipc.unlink_segment(control_name(bus))
        return True
    finally:
        _ipc.unlock(seg.fd, _ipc.RECLAIM_LOCK)


__all__ = [
    "check_attachable",
    "REGISTRY_TIMEOUT",
    "Place",
    "Service",
    "Views",
    "activate",
    "activate_publisher",
    "bump_epoch",
    "count_active",
    "count_publishers",
    "entries",
    "join",
    "leave",
    "leave_publisher",
    "missed_index",
    "place_held",
    "publisher_place_held",
    "publisher_alive",
    "reclaim_dead_bus",
    "service",
    "set_service",
    "start_service",
    "take_publisher_place",
    "unlink_publisher_objects",
    "unlink_ring",
]
