"""The publisher: creates a bus, writes every event into each subscriber's ring.

With ``max_publishers`` > 0 the bus also creates one inbox ring per publisher
place and a drain thread that publishes what other processes' ``Publisher``
objects put there (see docs/design.md, "Publishers").
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable
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
    I_STATE,
    Q_END,
    Q_EPOCH,
    Q_RETIRED,
    Q_VERSION,
    SERVE_OK,
    SERVE_REFUSED,
    SERVE_RETRYING,
    STATE_CLOSED,
    check_ring_header,
    control_size,
    pack_control_header,
    pack_ring_header,
    parse_control_header,
    ring_size,
)
from ._names import (
    MAX_PUBLISHERS,
    MAX_RING_BYTES,
    MAX_SLOT_SIZE,
    MAX_SLOTS,
    MAX_SUBSCRIBERS,
    check_int,
    check_name,
    control_name,
    drain_name,
    encode_type,
    inbox_name,
    ring_name,
    touch,
)
from ._ring import NATIVE, Overflow, RingReader, RingWriter, frame, write_all

# The drain's forward and wake-up in C, where the rings are the C core's.
_Forward = Callable[..., int]
_Wake = Callable[[list[Any]], None]
_NATIVE_DRAIN: tuple[_Forward, _Wake] | None = None
if NATIVE:
    from . import _native

    _NATIVE_DRAIN = (_native.forward, _native.wake_all)

# Deaths change no byte of the registry, so the publisher also re-reads it this
# often; the contract allows a dead subscriber to be counted for up to 1 s.
# A ring it failed to adopt (EMFILE, ENOMEM...) is retried as often.
LIVENESS_PERIOD = 0.25

# close() waits this long for a registry lock held by another process before
# it ends the streams without it (only a stopped holder makes it wait).
CLOSE_LOCK_TIMEOUT = 0.02

# The drain thread sleeps on the drain semaphore, which publishers post; this
# bound only caps what a lost wake-up could cost (one timed wake a second idle).
DRAIN_WAIT = 1.0
# Events taken from one inbox before the next inbox's turn, and between two
# releases of the lock (so the owner's own publish() is never held up for long).
DRAIN_BATCH = 64
# After a wake-up that found events arriving back to back, the drain thread
# watches the inboxes this long before it sleeps again: the next event is
# probably that close, and catching it awake spares its publisher a futex
# wake-up (as a subscriber's get() does; see docs/design.md, "Waking").
DRAIN_SPIN = 50e-6


@dataclass
class _Ring:
    index: int
    ring_id: int
    segment: _ipc.Segment
    sem: posix_ipc.Semaphore
    writer: RingWriter
    missed: int  # events it missed before it was served


@dataclass
class _Pending:
    """An active subscriber whose ring we could not adopt yet: what it misses is counted."""

    ring_id: int
    missed_q: int  # index of its missed counter in the control segment's u64 view
    missed: int = 0
    refused: bool = False


class _Publisher:
    """Everything a Bus owns; kept apart from Bus so a finalizer can close it.

    Locking: ``lock`` is reentrant so that close() called from a signal
    handler, while the interrupted code of the same thread is inside publish(),
    gets it at once instead of deadlocking. ``busy`` tells such a close() that
    the mappings are in use below it: it ends the streams and unlinks the names
    at once, and the interrupted call unmaps when it leaves. The lock is
    replaced in the child of a fork(): one held by a parent thread that does
    not exist in the child would be held forever.
    """

    def __init__(self, name: str, slots: int, slot_size: int, max_subscribers: int,
                 overflow: Overflow, codec: Codec, mode: int, max_publishers: int = 0) -> None:
        self.name = name
        self.slot_size = slot_size
        self.max_subscribers = max_subscribers
        self.max_publishers = max_publishers
        self.overwrite = overflow is Overflow.OVERWRITE
        self.codec = codec
        self.pid = os.getpid()
        self.forked = False  # set in the child of a fork(): the bus is the parent's
        self.lock = threading.RLock()
        self.busy = False
        self.closed = False  # close() began: streams ended, names unlinked
        self.closing = False  # close() is draining the inboxes, before it sets closed
        self.torn = False  # mappings released
        self.rings: dict[int, _Ring] = {}
        self.writers: list[RingWriter] = []
        self.pending: dict[int, _Pending] = {}
        self.removed: dict[int, int] = {}  # place -> ring id whose names we unlinked
        self.version = 0
        self.retired = 0
        self.epoch_seen = -1
        self.next_scan = 0.0
        self.types: dict[str, bytes] = {}
        self.nonce = secrets.randbits(64)
        self.inboxes: list[_ipc.Segment] = []
        self.readers: list[RingReader] = []  # the owner's end of each inbox
        self.inbox_q: list[memoryview] = []  # each inbox's u64 view, for its end mark
        self.drain_sem: posix_ipc.Semaphore | None = None
        self.drain_error: BaseException | None = None  # the last one, for a post-mortem
        self.ctrl = _create_control(name, control_size(max_subscribers, max_publishers), mode)
        pack_control_header(
            self.ctrl.buf, nonce=self.nonce, pid=self.pid, slots=slots, slot_size=slot_size,
            max_subscribers=max_subscribers, overflow=overflow.code, mode=mode,
            created=time.time(), codec=codec.name, max_publishers=max_publishers,
        )
        self.views = _registry.Views(self.ctrl)
        self.ctrl_q = self.views.q
        _ipc.track_fork(self)
        if max_publishers:
            try:
                self._open_inboxes(slots, mode)
            except BaseException:
                self._undo_creation()
                raise

    # Publishers' inboxes (see docs/design.md, "Publishers").
    def _open_inboxes(self, slots: int, mode: int) -> None:
        """Create every place's inbox and the drain semaphore (after the header: a
        reclaimer learns their names from it), then start the drain thread."""
        size = ring_size(slots, self.slot_size)
        for place in range(self.max_publishers):
            seg = _ipc.Segment.create(inbox_name(self.name, self.nonce, place), size, mode)
            self.inboxes.append(seg)
            pack_ring_header(seg.buf, slots=slots, slot_size=self.slot_size, nonce=self.nonce,
                             ring_id=place)
            seg.drop_fd()
            self.inbox_q.append(seg.buf.cast("Q"))
            self.readers.append(RingReader(seg.buf, slots, self.slot_size, False))
        self.drain_sem = _ipc.create_semaphore(drain_name(self.name, self.nonce), mode)
        threading.Thread(target=self._drain_loop, name=f"shmcast-drain-{self.name}",
                         daemon=True).start()

    def _undo_creation(self) -> None:
        _registry.unlink_publisher_objects(self.name, self.nonce, self.max_publishers)
        if self.drain_sem is not None:
            self.drain_sem.close()
        self._release_inboxes()
        if self.ctrl.still_named():
            _ipc.unlink_segment(control_name(self.name))
        self.views.release()
        self.ctrl.close()

    def _drain_loop(self) -> None:
        """The drain thread: sleep until a publisher posts, publish what the inboxes hold.

        It ends when the bus closes (close() posts the semaphore and never joins
        us) and closes the semaphore itself: closing one a thread is blocked on
        makes glibc write to an unmapped page.
        """
        sem = self.drain_sem
        if sem is None:
            return
        try:
            while True:
                _ipc.wait(sem, DRAIN_WAIT)
                total = 0
                while True:
                    with self.lock:
                        if self.closed or self.forked:
                            return
                        self.busy = True
                        try:
                            drained = self._drain_round()
                        except Exception as e:  # noqa: BLE001 - keep draining the others
                            self.drain_error = e
                            drained = 0
                        finally:
                            self.busy = False
                    total += drained
                    if not drained and not (total > 1 and self._inbox_soon(DRAIN_SPIN)):
                        break
        finally:
            with self.lock:
                self.drain_sem = None  # close() posts it no more
            if not self.forked:
                sem.close()

    def _inbox_soon(self, seconds: float) -> bool:
        """Watch the inboxes for up to *seconds* without sleeping; whether one has an event."""
        deadline = time.perf_counter() + seconds
        while True:
            with self.lock:
                if self.closed or self.forked:
                    return True  # the caller's next round sees it and ends
                if any(reader.unread() for reader in self.readers):
                    return True
            if time.perf_counter() >= deadline:
                return False

    def _drain_round(self, limits: list[int] | None = None) -> int:
        """Publish up to DRAIN_BATCH events of each inbox, in each inbox's order (lock
        held, busy set); how many. *limits*: read no inbox past these ring indexes."""
        drained = 0
        for place, reader in enumerate(self.readers):
            limit = None if limits is None else limits[place]
            if not reader.unread(limit):
                continue  # most inboxes are empty at any moment: one load each, not a call
            if _NATIVE_DRAIN is None:
                drained += self._drain_objects(reader, DRAIN_BATCH, limit)
            else:
                drained += self._drain_native(reader, DRAIN_BATCH, limit, *_NATIVE_DRAIN)
        return drained

    def _drain_objects(self, reader: RingReader, n: int, limit: int | None) -> int:
        """Publish up to *n* events of one inbox through Python objects; how many."""
        items = _read_many(reader, n, limit)
        if items:
            self._emit_many(items)
        return len(items)

    def _drain_native(self, reader: RingReader, n: int, limit: int | None, forward: _Forward,
                      wake_all: _Wake) -> int:
        """``_drain_objects`` in C: each slot copied into the rings with its version
        patched in, one wake-up per batch (lock held, busy set); how many.

        ``forward`` stops before an event when the registry epoch moved, so the
        scan comes between the same two events as in ``_emit_many``."""
        ctrl = self.ctrl_q
        if time.monotonic() >= self.next_scan:
            self._scan()
        done = 0
        while done < n:
            if ctrl[Q_EPOCH] != self.epoch_seen:
                self._scan()
            if self.pending:
                # A ring we could not adopt (yet, or ever: refused until its subscriber
                # leaves) counts each version as missed, event by event: the object
                # path does that; this state is rare.
                return done + self._drain_objects(reader, n - done, limit)
            writers = self.writers
            k = forward(reader, writers, self.version, n - done, limit, ctrl, self.epoch_seen)
            if k:
                self.version += k  # forward stored each one in ctrl[Q_VERSION] already
                done += k
                wake_all(writers)  # before a scan can retire one of them
            if ctrl[Q_EPOCH] == self.epoch_seen:
                break  # the inbox had no more, or the batch is done
        return done

    def _emit_many(self, items: list[tuple[int, float, bytes, bytes]]) -> None:
        """``_emit`` for events read from an inbox, keeping their type, data and
        timestamp (lock held, busy set). The registry epoch is still checked before
        each one: a subscriber that activated meanwhile gets every later version."""
        ctrl = self.ctrl_q
        if time.monotonic() >= self.next_scan:
            self._scan()
        writers = self.writers
        version = self.version
        for _, timestamp, type_bytes, data in items:
            if ctrl[Q_EPOCH] != self.epoch_seen:
                self._scan()
                writers = self.writers
            version += 1
            head, tail = frame(version, timestamp, type_bytes, data)
            write_all(writers, head, tail)
            if self.pending:
                for pend in self.pending.values():
                    pend.missed += 1
                    ctrl[pend.missed_q] = pend.missed
            self.version = ctrl[Q_VERSION] = version

    def _end_inboxes(self) -> None:
        """At close: publish what the inboxes hold now, then mark them ended.

        Only what is there when we start: a publisher that wrote on after the bus
        state said closed finds its event counted in its ``dropped`` (w - r once
        ``end`` is set), so the count stays exact without waiting for anyone.
        """
        self.views.i[I_STATE] = STATE_CLOSED  # publishers stop at their next publish
        try:
            if not self.busy:
                limits = [reader.written() for reader in self.readers]
                self.busy = True
                try:
                    while self._drain_round(limits):
                        pass
                finally:
                    self.busy = False
        finally:
            for q in self.inbox_q:
                q[Q_END] = END_BUS_CLOSED
            if self.drain_sem is not None:
                self.drain_sem.release()  # the drain thread sees the bus closed and ends

    def after_fork_in_child(self) -> None:
        self.forked = True
        self.lock = threading.RLock()

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
        return self.publish_encoded(tb, data, None)

    def publish_encoded(self, type_bytes: bytes, data: bytes, timestamp: float | None) -> int:
        """Publish an event already encoded (and checked); *timestamp* None: now."""
        with self.lock:
            # busy before the check: a handler that runs in between sees it and
            # defers the unmapping; one that ran before is seen by the check.
            self.busy = True
            try:
                if self.closed or self.forked:
                    self._raise_unusable()
                version = self._emit(type_bytes, data, timestamp)
            finally:
                self.busy = False
                if self.closed and not self.forked:
                    self._teardown()  # a signal handler closed the bus under us
        return version

    def _emit(self, type_bytes: bytes, data: bytes, timestamp: float | None) -> int:
        """Give the event the next version and write it to every ring (lock held, busy set)."""
        ctrl = self.ctrl_q
        if ctrl[Q_EPOCH] != self.epoch_seen or time.monotonic() >= self.next_scan:
            self._scan()
        version = self.version + 1
        head, tail = frame(version, time.time() if timestamp is None else timestamp,
                           type_bytes, data)
        write_all(self.writers, head, tail)
        if self.pending:
            for pend in self.pending.values():
                pend.missed += 1
                ctrl[pend.missed_q] = pend.missed
        self.version = ctrl[Q_VERSION] = version
        return version

    def _type_bytes(self, type_: str) -> bytes:
        tb = encode_type(type_)
        if len(self.types) < 1024:
            self.types[type_] = tb
        return tb

    def _raise_unusable(self) -> None:
        if self.forked:
            raise ShmcastError(
                f"bus {self.name!r} belongs to process {self.pid}; this process "
                f"({os.getpid()}) inherited it through fork() and cannot use it"
            )
        raise ShmcastError(f"bus {self.name!r} is closed")

    def _scan(self) -> None:
        """Adopt new rings, retire departed and dead ones (lock held, not torn)."""
        ctrl = self.ctrl
        self.epoch_seen = self.ctrl_q[Q_EPOCH]
        self.next_scan = time.monotonic() + LIVENESS_PERIOD
        for index, entry in _registry.entries(ctrl, self.max_subscribers):
            ring = self.rings.get(index)
            pend = self.pending.get(index)
            if ring is None and pend is None and entry.state not in (ENTRY_JOINING,
                                                                     ENTRY_ACTIVE):
                continue
            held = _registry.place_held(ctrl, index)
            live = held and entry.state == ENTRY_ACTIVE
            if ring is not None and (ring.ring_id != entry.ring_id or not live):
                self._retire(ring)
                ring = None
            if pend is not None and (pend.ring_id != entry.ring_id or not live):
                self._forget(index)
                pend = None
            if ring is not None or not entry.ring_id:
                continue
            if live:
                if pend is None:
                    _registry.start_service(self.views, index, entry.ring_id)
                    pend = self.pending[index] = _Pending(entry.ring_id,
                                                          _registry.missed_index(index))
                if not pend.refused:
                    self._adopt(index, pend, entry.slots)
            elif not held and self.removed.get(index) != entry.ring_id:
                # Its subscriber died before we adopted its ring (or we refused it):
                # nobody else will remove its names.
                _registry.unlink_ring(self.name, self.nonce, entry.ring_id)
                self.removed[index] = entry.ring_id

    def _adopt(self, index: int, pend: _Pending, slots: int) -> None:
        ring_id = pend.ring_id
        name = ring_name(self.name, self.nonce, ring_id)
        size = ring_size(slots, self.slot_size)
        if (not 1 <= slots <= MAX_SLOTS or size > MAX_RING_BYTES
                or any(ring.ring_id == ring_id for ring in self.rings.values())):
            # An impossible entry, or one naming another subscriber's ring (two
            # writers on one ring would corrupt it): garbage, or a hostile peer.
            self._refuse(index, pend, 0)
            return
        segment = sem = None
        try:
            # Map exactly what the geometry says, whatever the file's size now.
            segment = _ipc.Segment.open(name, size, max_size=size)
            check_ring_header(segment.buf, segment.size, slots=slots, slot_size=self.slot_size,
                              nonce=self.nonce, ring_id=ring_id)
            segment.drop_fd()
            sem = _ipc.open_semaphore(name)
            writer = RingWriter(segment.buf, slots, self.slot_size, self.overwrite, sem)
        except Exception as e:  # noqa: BLE001 - whatever a dying or hostile subscriber left
            if sem is not None:
                sem.close()
            if segment is not None:
                segment.close()
            if isinstance(e, ShmcastError):
                self._refuse(index, pend, 0)  # malformed: it will not get better
            else:
                # EMFILE, ENOMEM, a ring not there yet...: try again at the next scan,
                # and tell the subscriber, whose get() raises meanwhile.
                err = getattr(e, "errno", None) or errno.EIO
                _registry.set_service(self.views, index, SERVE_RETRYING, err)
            return
        del self.pending[index]
        self.rings[index] = _Ring(index, ring_id, segment, sem, writer, pend.missed)
        _registry.set_service(self.views, index, SERVE_OK)
        self._hot()

    def _refuse(self, index: int, pend: _Pending, err: int) -> None:
        pend.refused = True
        _registry.set_service(self.views, index, SERVE_REFUSED, err)

    def _forget(self, index: int) -> None:
        pend = self.pending.pop(index)
        self._add_retired(pend.missed)

    def _add_retired(self, drops: int) -> None:
        if drops:
            self.retired += drops
            self.ctrl_q[Q_RETIRED] = self.retired

    def _hot(self) -> None:
        """Rebuild the list publish() walks."""
        self.writers = [ring.writer for ring in self.rings.values()]

    def _retire(self, ring: _Ring) -> None:
        del self.rings[ring.index]
        self._hot()
        self._add_retired(ring.writer.drops() + ring.missed)
        _registry.unlink_ring(self.name, self.nonce, ring.ring_id)
        ring.sem.close()
        ring.writer.release()
        ring.segment.close()

    def _usable(self) -> bool:
        return not (self.closed or self.forked or self.busy)

    def dropped(self) -> int:
        with self.lock:
            if self.forked:
                self._raise_unusable()
            scan = self._usable()
            self.busy = True
            try:
                if self.torn:
                    return self.retired
                if scan and self.ctrl_q[Q_EPOCH] != self.epoch_seen:
                    self._scan()
                return self.retired + sum(ring.writer.drops() + ring.missed
                                          for ring in self.rings.values()) + \
                    sum(pend.missed for pend in self.pending.values())
            finally:
                self.busy = False
                if self.closed:
                    self._teardown()

    def subscriber_count(self) -> int:
        with self.lock:
            if self.forked:
                self._raise_unusable()
            self.busy = True
            try:
                if self.closed:
                    return 0
                return _registry.count_active(self.ctrl, self.max_subscribers)
            finally:
                self.busy = False
                if self.closed:
                    self._teardown()

    def publisher_count(self) -> int:
        with self.lock:
            if self.forked:
                self._raise_unusable()
            if self.closed:
                return 0
            return _registry.count_publishers(self.ctrl, self.max_subscribers,
                                              self.max_publishers)

    def close(self) -> None:
        """End every stream, unlink every name, then unmap once no call is using the maps.

        Safe from a signal handler and at interpreter exit: it never waits for
        more than a moment, and it never unmaps under the call it interrupted.
        """
        with self.lock:
            if self.forked:
                return  # a forked copy: the bus is not ours to end
            if not (self.closed or self.closing):
                # A close() from a signal handler while this one drains the inboxes
                # finds closing set and leaves the rest to us.
                self.closing = True
                try:
                    if self.readers:
                        self._end_inboxes()  # before closed is set: it publishes
                finally:
                    self.closed = True
                    self._end_streams()
            if self.closed and not self.busy:
                self._teardown()

    def _end_streams(self) -> None:
        ctrl = self.ctrl
        # The state first, so that a subscriber activating from now on sees it.
        self.views.i[I_STATE] = STATE_CLOSED
        # Every stream's end mark is written under the registry lock, so a
        # subscriber activating meanwhile either is seen here or sees the bus
        # closed. A stopped holder of the lock costs that guarantee, not a hang:
        # such a subscriber learns of the end when the publisher lock goes.
        locked = _ipc.lock_within(ctrl.fd, _ipc.REGISTRY_LOCK, CLOSE_LOCK_TIMEOUT)
        try:
            if not self.busy:
                self._scan()
            for ring in self.rings.values():
                ring.writer.end(END_BUS_CLOSED)
                _ipc.wake(ring.sem)
        finally:
            if locked:
                _ipc.unlock(ctrl.fd, _ipc.REGISTRY_LOCK)
        for _, entry in _registry.entries(ctrl, self.max_subscribers):
            if entry.ring_id:
                _registry.unlink_ring(self.name, self.nonce, entry.ring_id)
        _registry.unlink_publisher_objects(self.name, self.nonce, self.max_publishers)
        if ctrl.still_named():
            _ipc.unlink_segment(control_name(self.name))

    def _teardown(self) -> None:
        if self.torn:
            return
        self.torn = True
        for ring in list(self.rings.values()):
            self._retire(ring)
        for index in list(self.pending):
            self._forget(index)
        self._release_inboxes()
        self.views.release()
        self.ctrl.close()

    def _release_inboxes(self) -> None:
        for reader in self.readers:
            reader.release()
        for q in self.inbox_q:
            q.release()
        for seg in self.inboxes:
            seg.close()


def _read_many(reader: RingReader, n: int, limit: int | None,
               ) -> list[tuple[int, float, bytes, bytes]]:
    """Up to *n* ready events of *reader* (one call where the ring has ``read_many``)."""
    many = getattr(reader, "read_many", None)
    if many is not None:
        return many(n, limit)  # type: ignore[no-any-return]
    out: list[tuple[int, float, bytes, bytes]] = []
    while len(out) < n and (item := reader.read(limit)) is not None:
        out.append(item)
    return out


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
        old = _ipc.Segment.open(control_name(name), 0,
                                max_size=control_size(MAX_SUBSCRIBERS, MAX_PUBLISHERS))
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
    :param max_publishers: how many other processes may publish through
        :class:`Publisher` at once (0: none).
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
        max_publishers: int = 0,
        overflow: str = "overwrite",
        codec: str | Codec = "json",
        mode: int = 0o600,
    ) -> None:
        check_name(name)
        check_int("slots", slots, 1, MAX_SLOTS)
        check_int("slot_size", slot_size, 1, MAX_SLOT_SIZE)
        check_int("max_subscribers", max_subscribers, 1, MAX_SUBSCRIBERS)
        check_int("max_publishers", max_publishers, 0, MAX_PUBLISHERS)
        check_int("mode", mode, 0, 0o777)
        policy = Overflow.parse(overflow)
        if ring_size(slots, slot_size) > MAX_RING_BYTES:
            raise ValueError(
                f"a ring of {slots} slots of {slot_size} bytes exceeds {MAX_RING_BYTES} bytes"
            )
        chosen = resolve(codec)
        _ipc.check_memory_model()
        touch(name)
        self._core = _Publisher(name, slots, slot_size, max_subscribers, policy, chosen, mode,
                                max_publishers)
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
    def publisher_count(self) -> int:
        """:class:`Publisher` objects of other processes attached now (dead ones excluded)."""
        return self._core.publisher_count()

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
