"""The publisher: creates a bus, writes every event into each subscriber's ring."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import posix_ipc

from . import _ipc, _registry
from ._codecs import Codec, resolve
from ._errors import BusExistsError, EventTooLargeError, ShmcastError
from ._layout import (
    CONTROL_HEADER_SIZE,
    END_BUS_CLOSED,
    ENTRY_ACTIVE,
    ENTRY_JOINING,
    EPOCH_OFF,
    OVERFLOW_MODES,
    RETIRED_OFF,
    STATE_CLOSED,
    STATE_OFF,
    U32,
    U64,
    VERSION_OFF,
    check_ring_header,
    control_size,
    pack_control_header,
    parse_control_header,
    read_entry,
    ring_size,
)
from ._names import (
    MAX_RING_BYTES,
    MAX_SLOT_SIZE,
    MAX_SLOTS,
    MAX_SUBSCRIBERS,
    MAX_TYPE_BYTES,
    check_int,
    check_name,
    control_name,
    ring_name,
    touch,
)
from ._ring import RingWriter, frame, write_all

_EPOCH = EPOCH_OFF // 8
_VERSION = VERSION_OFF // 8

# Deaths change no byte of the registry, so the publisher also re-reads it this
# often; the contract allows a dead subscriber to be counted for up to 1 s.
LIVENESS_PERIOD = 0.25


@dataclass
class _Ring:
    index: int
    ring_id: int
    segment: _ipc.Segment
    sem: posix_ipc.Semaphore
    writer: RingWriter


class _Publisher:
    """Everything a Bus owns; kept apart from Bus so a finalizer can close it."""

    def __init__(self, name: str, slots: int, slot_size: int, max_subscribers: int,
                 overflow: str, codec: Codec, mode: int) -> None:
        self.name = name
        self.slot_size = slot_size
        self.max_subscribers = max_subscribers
        self.overwrite = overflow == "overwrite"
        self.codec = codec
        self.pid = os.getpid()
        self.forked = False  # set in the child of a fork(): the bus is the parent's
        self.lock = threading.Lock()
        self.rings: dict[int, _Ring] = {}
        self.writers: list[RingWriter] = []
        self.refused: dict[int, int] = {}  # place -> ring id we could not adopt
        self.removed: dict[int, int] = {}  # place -> ring id whose names we unlinked
        self.version = 0
        self.retired = 0
        self.closed = False
        self.epoch_seen = -1
        self.next_scan = 0.0
        self.types: dict[str, bytes] = {}
        self.nonce = secrets.randbits(64)
        self.ctrl = _create_control(name, control_size(max_subscribers), mode)
        pack_control_header(
            self.ctrl.buf, nonce=self.nonce, pid=self.pid, slots=slots, slot_size=slot_size,
            max_subscribers=max_subscribers, overflow=overflow, mode=mode,
            created=time.time(), codec=codec.name,
        )
        self.ctrl_q = self.ctrl.buf.cast("Q")
        _ipc.track_fork(self)

    def after_fork_in_child(self) -> None:
        self.forked = True

    # The hot path.
    def publish(self, type_: str, payload: Any) -> int:
        tb = self.types.get(type_)
        if tb is None:
            tb = self._type_bytes(type_)
        data = self.codec.dumps(payload)
        if len(data) > self.slot_size:
            raise EventTooLargeError(
                f"encoded event is {len(data)} bytes; this bus's slot_size is {self.slot_size}"
            )
        with self.lock:
            if self.closed or self.forked:
                self._raise_unusable()
            ctrl = self.ctrl_q
            if ctrl[_EPOCH] != self.epoch_seen or time.monotonic() >= self.next_scan:
                self._scan()
            version = self.version + 1
            head, tail = frame(version, time.time(), tb, data)
            write_all(self.writers, head, tail)
            self.version = ctrl[_VERSION] = version
        return version

    def _type_bytes(self, type_: str) -> bytes:
        if not isinstance(type_, str):
            raise TypeError(f"event type must be a str, not {type(type_).__name__}")
        tb = type_.encode()
        if len(tb) > MAX_TYPE_BYTES:
            raise ValueError(f"event type is {len(tb)} bytes in UTF-8; at most {MAX_TYPE_BYTES}")
        if len(self.types) < 1024:
            self.types[type_] = tb
        return tb

    def _raise_unusable(self) -> None:
        if self.closed:
            raise ShmcastError(f"bus {self.name!r} is closed")
        raise ShmcastError(
            f"bus {self.name!r} belongs to process {self.pid}; this process ({os.getpid()}) "
            "inherited it through fork() and cannot publish on it"
        )

    def _scan(self) -> None:
        """Adopt new rings, retire departed and dead ones (called with the lock held)."""
        ctrl = self.ctrl
        self.epoch_seen = self.ctrl_q[_EPOCH]
        self.next_scan = time.monotonic() + LIVENESS_PERIOD
        for index in range(self.max_subscribers):
            entry = read_entry(ctrl.buf, index)
            ring = self.rings.get(index)
            if ring is None and entry.state not in (ENTRY_JOINING, ENTRY_ACTIVE):
                continue
            held = _registry.place_held(ctrl, index)
            if ring is not None and (ring.ring_id != entry.ring_id or
                                     entry.state != ENTRY_ACTIVE or not held):
                self._retire(ring)
                ring = None
            if ring is not None or not entry.ring_id:
                continue
            if held:
                if entry.state == ENTRY_ACTIVE and self.refused.get(index) != entry.ring_id:
                    self._adopt(index, entry.ring_id, entry.slots)
            elif self.removed.get(index) != entry.ring_id:
                # Its subscriber died before we adopted its ring (or we refused it):
                # nobody else will remove its names.
                _registry.unlink_ring(self.name, self.nonce, entry.ring_id)
                self.removed[index] = entry.ring_id

    def _adopt(self, index: int, ring_id: int, slots: int) -> None:
        name = ring_name(self.name, self.nonce, ring_id)
        size = ring_size(slots, self.slot_size)
        if (not 1 <= slots <= MAX_SLOTS or size > MAX_RING_BYTES
                or any(ring.ring_id == ring_id for ring in self.rings.values())):
            # An impossible entry, or one naming another subscriber's ring (two
            # writers on one ring would corrupt it): garbage, or a hostile peer.
            self.refused[index] = ring_id
            return
        segment = sem = None
        try:
            # Map exactly what the geometry says, whatever the file's size now.
            segment = _ipc.Segment.open(name, size, max_size=size)
            check_ring_header(segment.buf, segment.size, slots=slots, slot_size=self.slot_size,
                              nonce=self.nonce, ring_id=ring_id)
            sem = _ipc.open_semaphore(name)
            writer = RingWriter(segment.buf, slots, self.slot_size, self.overwrite, sem)
        except Exception:  # noqa: BLE001 - whatever a dying or hostile subscriber left, skip it
            if sem is not None:
                sem.close()
            if segment is not None:
                segment.close()
            self.refused[index] = ring_id
            return
        self.rings[index] = _Ring(index, ring_id, segment, sem, writer)
        self._hot()

    def _hot(self) -> None:
        """Rebuild the list publish() walks."""
        self.writers = [ring.writer for ring in self.rings.values()]

    def _retire(self, ring: _Ring) -> None:
        del self.rings[ring.index]
        self._hot()
        self.retired += ring.writer.drops()
        U64.pack_into(self.ctrl.buf, RETIRED_OFF, self.retired)
        _registry.unlink_ring(self.name, self.nonce, ring.ring_id)
        ring.sem.close()
        ring.writer.release()
        ring.segment.close()

    def dropped(self) -> int:
        with self.lock:
            if not self.closed and not self.forked and \
                    self.ctrl_q[_EPOCH] != self.epoch_seen:
                self._scan()
            return self.retired + sum(ring.writer.drops() for ring in self.rings.values())

    def subscriber_count(self) -> int:
        with self.lock:
            if self.closed or self.ctrl.fd < 0:
                return 0
            return _registry.count_active(self.ctrl, self.max_subscribers)

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            if self.forked:
                return  # a forked copy: the bus is not ours to end
            ctrl = self.ctrl
            try:
                _ipc.lock(ctrl.fd, _ipc.REGISTRY_LOCK, _registry.REGISTRY_TIMEOUT, "registry lock")
                locked = True
            except ShmcastError:
                locked = False  # a stopped subscriber holds it: close all the same
            try:
                U32.pack_into(ctrl.buf, STATE_OFF, STATE_CLOSED)
                self._scan()
                for ring in self.rings.values():
                    ring.writer.end(END_BUS_CLOSED)
                    _ipc.wake(ring.sem)
                for ring in list(self.rings.values()):
                    self._retire(ring)
                for index in range(self.max_subscribers):
                    entry = read_entry(ctrl.buf, index)
                    if entry.ring_id:
                        _registry.unlink_ring(self.name, self.nonce, entry.ring_id)
                if ctrl.still_named():
                    _ipc.unlink_segment(control_name(self.name))
            finally:
                if locked:
                    _ipc.unlock(ctrl.fd, _ipc.REGISTRY_LOCK)
                self.ctrl_q.release()
                ctrl.close()


def _create_control(name: str, size: int, mode: int) -> _ipc.Segment:
    """Create the control segment, reclaiming a dead bus of the same name first."""
    cname = control_name(name)
    for _ in range(5):
        try:
            ctrl = _ipc.Segment.create(cname, size, mode)
        except FileExistsError:
            _reclaim_or_raise(name)
            continue
        # Until we hold the publisher lock another creator may take the segment
        # for a dead bus and unlink it. Reclaimers decide and unlink under the
        # reclaim lock, so taking the publisher lock under it too makes the two
        # exclusive: either it unlinked first (the name no longer resolves to
        # ours: start over), or it will find the publisher alive.
        try:
            _ipc.lock(ctrl.fd, _ipc.RECLAIM_LOCK, _registry.REGISTRY_TIMEOUT, "reclaim lock")
        except ShmcastError:
            ctrl.close()
            continue
        try:
            won = _ipc.try_lock(ctrl.fd, _ipc.PUBLISHER_LOCK) and ctrl.still_named()
        finally:
            _ipc.unlock(ctrl.fd, _ipc.RECLAIM_LOCK)
        if won:
            return ctrl
        ctrl.close()
    raise BusExistsError(f"bus {name!r} is being created by another process")


def _reclaim_or_raise(name: str) -> None:
    try:
        old = _ipc.Segment.open(control_name(name), 0, max_size=control_size(MAX_SUBSCRIBERS))
    except FileNotFoundError:
        return
    try:
        if _registry.publisher_alive(old):
            pid = ""
            if old.size >= CONTROL_HEADER_SIZE:
                with contextlib.suppress(ShmcastError):
                    pid = f" (publisher pid {parse_control_header(old.buf, old.size).pid})"
            raise BusExistsError(f"bus {name!r} already exists{pid}")
        _registry.reclaim_dead_bus(old, name)
    finally:
        old.close()


class Bus:
    """The publishing end of a bus: create it, publish to every subscriber, close it.

    :param name: 1 to 64 ASCII letters, digits, ``_`` or ``-``; the control segment
        is ``/dev/shm/shmcast.NAME``.
    :param slots: events each subscriber's ring holds (a subscriber may ask for another size).
    :param slot_size: the largest encoded payload, in bytes.
    :param max_subscribers: how many subscribers may be attached at once.
    :param overflow: ``"overwrite"`` (a full ring loses its oldest unread event) or
        ``"drop_new"`` (a full ring rejects the new event); either way, one drop is counted.
    :param codec: ``"json"``, ``"pickle"``, ``"raw"`` or an object with ``name``,
        ``dumps`` and ``loads``.
    :param mode: permission bits of every segment and semaphore of the bus.
    :raises ValueError: for a bad name or argument.
    :raises BusExistsError: if a live bus of that name exists (a dead one is reclaimed).
    """

    __slots__ = ("__weakref__", "_core", "_finalizer")

    def __init__(
        self,
        name: str,
        *,
        slots: int = 64,
        slot_size: int = 4096,
        max_subscribers: int = 64,
        overflow: str = "overwrite",
        codec: str | Codec = "json",
        mode: int = 0o600,
    ) -> None:
        check_name(name)
        check_int("slots", slots, 1, MAX_SLOTS)
        check_int("slot_size", slot_size, 1, MAX_SLOT_SIZE)
        check_int("max_subscribers", max_subscribers, 1, MAX_SUBSCRIBERS)
        check_int("mode", mode, 0, 0o777)
        if overflow not in OVERFLOW_MODES:
            raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
        if ring_size(slots, slot_size) > MAX_RING_BYTES:
            raise ValueError(
                f"a ring of {slots} slots of {slot_size} bytes exceeds {MAX_RING_BYTES} bytes"
            )
        touch(name)
        self._core = _Publisher(name, slots, slot_size, max_subscribers, overflow,
                                resolve(codec), mode)
        self._finalizer = weakref.finalize(self, self._core.close)

    @property
    def name(self) -> str:
        """The bus name."""
        return self._core.name

    def publish(self, type: str, payload: Any = None) -> int:
        """Encode *payload* once and write it to every subscriber's ring; never waits on one.

        :returns: the event's version (1 for the first event, then +1 per publish).
        :raises EventTooLargeError: if the encoded payload exceeds ``slot_size``;
            nothing is published.
        :raises TypeError: if the codec cannot encode *payload* (json); nothing is published.
        :raises ShmcastError: if the bus is closed, or this process inherited it by fork().
        """
        return self._core.publish(type, payload)

    @property
    def version(self) -> int:
        """The last version assigned (0 before any publish)."""
        return self._core.version

    @property
    def dropped(self) -> int:
        """Events dropped so far, summed over every subscriber that ever attached."""
        return self._core.dropped()

    @property
    def subscriber_count(self) -> int:
        """Subscribers attached now (dead ones excluded)."""
        return self._core.subscriber_count()

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._core.closed

    def close(self) -> None:
        """End every stream after its buffered events, then remove the bus. Idempotent."""
        self._core.close()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise TypeError("a Bus cannot be pickled: subscribers attach by name with subscribe()")

    def __repr__(self) -> str:
        state = "closed" if self._core.closed else f"version={self._core.version}"
        return f"<shmcast.Bus {self._core.name!r} {state}>"


__all__ = ["Bus"]
