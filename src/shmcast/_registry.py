"""The subscriber registry in the control segment: claiming places, liveness, reclaiming dead buses.

A place is taken by holding its OFD lock, so the kernel frees it when its
subscriber dies; the entry's bytes only describe the ring of whoever holds it.
Subscribers bump the registry epoch, under the registry lock, after every
change, so the publisher re-reads the registry only when it changed (plus a
periodic check that catches deaths, which change nothing in the bytes).
"""

from __future__ import annotations

from . import _ipc
from ._errors import ShmcastError
from ._layout import (
    ENTRY,
    ENTRY_ACTIVE,
    EPOCH_OFF,
    STATE_CLOSED,
    STATE_OFF,
    U32,
    U64,
    Entry,
    entry_offset,
    parse_control_header,
    read_entry,
)
from ._names import control_name, ring_name

REGISTRY_TIMEOUT = 5.0


def claim_place(ctrl: _ipc.Segment, max_subscribers: int) -> int | None:
    """Take the first free place; its index, or None if all are taken."""
    for index in range(max_subscribers):
        if _ipc.try_lock(ctrl.fd, _ipc.ENTRY_LOCK_BASE + index):
            return index
    return None


def place_held(ctrl: _ipc.Segment, index: int) -> bool:
    """Whether some other open file description holds place *index*."""
    return _ipc.is_locked(ctrl.fd, _ipc.ENTRY_LOCK_BASE + index)


def write_entry(ctrl: _ipc.Segment, index: int, entry: Entry) -> None:
    """Write our own entry (we hold its place)."""
    ENTRY.pack_into(ctrl.buf, entry_offset(index), *entry)


def set_state(ctrl: _ipc.Segment, index: int, state: int) -> None:
    """Change our own entry's state."""
    U32.pack_into(ctrl.buf, entry_offset(index), state)


def bump_epoch(ctrl: _ipc.Segment) -> None:
    """Tell the publisher the registry changed.

    :raises ShmcastError: if the registry lock stays taken (its holder is stopped).
    """
    _ipc.lock(ctrl.fd, _ipc.REGISTRY_LOCK, REGISTRY_TIMEOUT, "registry lock")
    try:
        U64.pack_into(ctrl.buf, EPOCH_OFF, U64.unpack_from(ctrl.buf, EPOCH_OFF)[0] + 1)
    finally:
        _ipc.unlock(ctrl.fd, _ipc.REGISTRY_LOCK)


def activate(ctrl: _ipc.Segment, index: int) -> bool:
    """Mark our entry active and bump the epoch, unless the bus is closed (then False).

    Done under the registry lock, which close() also holds while it ends every
    stream: either close() sees this entry, or this sees the bus closed.
    """
    _ipc.lock(ctrl.fd, _ipc.REGISTRY_LOCK, REGISTRY_TIMEOUT, "registry lock")
    try:
        if U32.unpack_from(ctrl.buf, STATE_OFF)[0] == STATE_CLOSED:
            return False
        set_state(ctrl, index, ENTRY_ACTIVE)
        U64.pack_into(ctrl.buf, EPOCH_OFF, U64.unpack_from(ctrl.buf, EPOCH_OFF)[0] + 1)
        return True
    finally:
        _ipc.unlock(ctrl.fd, _ipc.REGISTRY_LOCK)


def count_active(ctrl: _ipc.Segment, max_subscribers: int) -> int:
    """Live subscribers: active entries whose place is held."""
    return sum(
        1 for index in range(max_subscribers)
        if read_entry(ctrl.buf, index).state == ENTRY_ACTIVE and place_held(ctrl, index)
    )


def unlink_ring(bus: str, nonce: int, ring_id: int) -> None:
    """Remove a ring's segment and semaphore names."""
    name = ring_name(bus, nonce, ring_id)
    _ipc.unlink_segment(name)
    _ipc.unlink_semaphore(name)


def publisher_alive(ctrl: _ipc.Segment) -> bool:
    """Whether the publisher still holds the bus."""
    return _ipc.is_locked(ctrl.fd, _ipc.PUBLISHER_LOCK)


def reclaim_dead_bus(ctrl: _ipc.Segment, bus: str) -> bool:
    """Unlink a bus whose publisher is dead, with the rings of its dead subscribers.

    Rings of live subscribers are left to them. Whoever reclaims holds the
    reclaim lock and checks that the name still resolves to this very segment,
    so two reclaimers, or a reclaimer and a new publisher, never unlink a
    newer bus of the same name.

    :returns: whether this call unlinked the control segment.
    """
    if not _ipc.try_lock(ctrl.fd, _ipc.RECLAIM_LOCK):
        return False
    try:
        if publisher_alive(ctrl) or not ctrl.still_named():
            return False
        try:
            geometry = parse_control_header(ctrl.buf, ctrl.size)
        except ShmcastError:
            geometry = None  # not a readable bus: nothing of it but the name to remove
        if geometry is not None:
            for index in range(geometry.max_subscribers):
                entry = read_entry(ctrl.buf, index)
                if entry.ring_id and not place_held(ctrl, index):
                    unlink_ring(bus, geometry.nonce, entry.ring_id)
        _ipc.unlink_segment(control_name(bus))
        return True
    finally:
        _ipc.unlock(ctrl.fd, _ipc.RECLAIM_LOCK)


__all__ = [
    "REGISTRY_TIMEOUT",
    "activate",
    "bump_epoch",
    "claim_place",
    "count_active",
    "place_held",
    "publisher_alive",
    "reclaim_dead_bus",
    "set_state",
    "unlink_ring",
    "write_entry",
]
