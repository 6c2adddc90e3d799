"""The subscriber: attaches to a bus by name and reads its own ring, blocking or async."""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import threading
import time
import weakref
from typing import Any, NoReturn

import posix_ipc

from . import _ipc, _registry
from ._codecs import Codec, for_subscriber
from ._errors import (
    BusNotFoundError,
    DecodeError,
    Reason,
    ShmcastError,
    StreamClosed,
    TooManySubscribersError,
)
from ._event import Event
from ._layout import (
    I_STATE,
    Q_VERSION,
    SERVE_OK,
    SERVE_PENDING,
    SERVE_REFUSED,
    STATE_CLOSED,
    control_size,
    pack_ring_header,
    ring_size,
)
from ._names import (
    MAX_PUBLISHERS,
    MAX_RING_BYTES,
    MAX_SLOTS,
    MAX_SUBSCRIBERS,
    check_int,
    check_name,
    control_name,
    ring_name,
    touch,
)
from ._ring import Overflow, RingReader
from ._stream import Stream, wake_futures

# A blocked get() wakes this often to check that the publisher is alive (the
# contract ends a dead publisher's streams within 2 s) and that it serves our
# ring (a subscriber it cannot serve must learn it within 2 s).
LIVENESS_PERIOD = 0.5

# How long get() watches the ring before it sleeps, when the previous event was
# already waiting for it. A wake-up through the semaphore costs the publisher a
# futex call of several microseconds; an idle subscriber never spins.
SPIN_SECONDS = 50e-6

# The finalizer at interpreter exit waits at most this long for a thread that
# holds the lock (it only ever holds it for microseconds).
_EXIT_LOCK_TIMEOUT = 1.0


def _undecodable(bus: str, codec: str, version: int, type_: str, data: bytes,
                 e: Exception) -> DecodeError:
    """The error an event the codec cannot read becomes (the ring reader counts it dropped)."""
    return DecodeError(f"event {version} ({type_!r}) on bus {bus!r} does not decode with the "
                       f"{codec} codec: {e!r}", version, type_, data)


class _Reader:
    """Everything a Subscription owns, and all its state; kept apart so a finalizer can end it.

    Locking: ``lock`` is reentrant so that unsubscribe() from a signal handler,
    while the interrupted code of the same thread is inside a call, gets it at
    once. Nothing is unmapped or closed while a thread may use it: ``users``
    counts the threads reading the ring or sleeping on its semaphore outside
    the lock, and the last one out releases the handles once the stream has
    ended. (Closing a semaphore a thread is blocked on made glibc write to an
    unmapped page: SIGSEGV at exit.) The lock is replaced in the child of a
    fork(): a parent thread holding it does not exist there.
    """

    def __init__(self, name: str, slots: int | None, codec: object, owner: int | None) -> None:
        self.name = name
        self.pid = os.getpid()
        self.forked = False
        self.lock = threading.RLock()
        self.users = 0  # threads using the ring or the semaphore outside the lock
        self.sleepers = 0  # of those, the ones blocked on the semaphore
        self.reason: Reason | None = None  # why the stream ends, once it is known
        self.limit: int | None = None  # ring index the stream ends at, once unsubscribed
        self.ended = False  # StreamClosed raised: the handles go when the last user leaves
        self.released = False
        self.left = False
        self.final_dropped = 0
        self.frozen_missed: int | None = None
        self.served = False
        self.next_check = time.monotonic() + LIVENESS_PERIOD
        self.streak = False  # the last poll found an event without waiting
        self.futures: set[asyncio.Future[None]] = set()
        self.pump: threading.Thread | None = None
        self.pump_cv = threading.Condition(threading.Lock())
        self.ring: _ipc.Segment | None = None
        self.sem: posix_ipc.Semaphore | None = None
        self.reader: RingReader | None = None
        self.place: _registry.Place | None = None
        self.views: _registry.Views | None = None
        self.nonce = 0
        self.parsed = False  # a bus header was read: not a bus still being created
        try:
            ctrl = _ipc.Segment.open(control_name(name), 0,
                                     max_size=control_size(MAX_SUBSCRIBERS, MAX_PUBLISHERS))
        except FileNotFoundError:
            raise BusNotFoundError(f"no bus named {name!r} on this host") from None
        self.ctrl = ctrl
        try:
            self._attach(slots, codec, owner)
        except BaseException:
            self._leave()
            self._release()
            raise
        _ipc.track_fork(self)

    def after_fork_in_child(self) -> None:
        self.forked = True
        self.lock = threading.RLock()
        self.pump_cv = threading.Condition(threading.Lock())

    def _attach(self, slots: int | None, codec: object, owner: int | None) -> None:
        ctrl = self.ctrl
        geometry = _registry.check_attachable(ctrl, self.name, owner, "subscribe")
        self.parsed = True
        policy = Overflow.from_code(geometry.overflow)
        if policy is None:
            raise ShmcastError(f"corrupt shmcast bus header: overflow mode {geometry.overflow}")
        self.codec: Codec = for_subscriber(geometry.codec, codec)
        if slots is None:
            slots = geometry.slots
        check_int("slots", slots, 1, MAX_SLOTS)
        size = ring_size(slots, geometry.slot_size)
        if size > MAX_RING_BYTES:
            raise ValueError(f"a ring of {slots} slots of {geometry.slot_size} bytes is too large")
        self.nonce = geometry.nonce
        self.views = _registry.Views(ctrl)
        self.place = _registry.join(self.views, self.name, self.nonce, geometry.max_subscribers,
                                    slots, self.pid, secrets.randbits(64) | 1)
        if self.place is None:
            raise TooManySubscribersError(
                f"bus {self.name!r} has all its {geometry.max_subscribers} places taken"
            )
        rname = ring_name(self.name, self.nonce, self.place.ring_id)
        self.ring = _ipc.Segment.create(rname, size, geometry.mode)
        pack_ring_header(self.ring.buf, slots=slots, slot_size=geometry.slot_size,
                         nonce=self.nonce, ring_id=self.place.ring_id)
        self.ring.drop_fd()  # the mapping is all we need; fds are a limited resource
        self.sem = _ipc.create_semaphore(rname, geometry.mode)
        self.reader = RingReader(self.ring.buf, slots, geometry.slot_size,
                                 policy is Overflow.OVERWRITE, event=Event, loads=self.codec.loads,
                                 # Not a bound method: the C ring end is no gc container,
                                 # and a cycle through it would never be collected.
                                 undecodable=functools.partial(_undecodable, self.name,
                                                               self.codec.name))
        if not _registry.activate(self.views, self.place.index):
            raise BusNotFoundError(f"bus {self.name!r} is closed")

    # Reading (lock held).
    def next_event(self) -> Event | None:
        """The next event, None if there is none yet; StreamClosed at the end."""
        if self.ended or self.forked:
            self.raise_ended()
        reader = self.reader
        if reader is None:
            self.raise_ended()
        try:
            event = reader.get(self.limit)
        except DecodeError:
            self.pass_wake(reader)
            raise
        if event is None:
            return self._nothing_ready(reader)
        if self.sleepers:
            self.pass_wake(reader)
        return event

    def next_events(self, max: int) -> list[Event | DecodeError]:
        """Up to *max* events that are ready, a DecodeError in the place of each one that
        would not decode; StreamClosed at the end, once nothing is left."""
        if self.ended or self.forked:
            self.raise_ended()
        reader = self.reader
        if reader is None:
            self.raise_ended()
        batch: list[Any] = reader.get_many(max, self.limit)
        if not batch:
            event = self._nothing_ready(reader)
            return [] if event is None else [event]
        if self.sleepers:
            self.pass_wake(reader)
        return batch

    def pass_wake(self, reader: RingReader) -> None:
        """Pass a wake-up on to another waiting thread if events are left for it."""
        if self.sleepers and reader.unread(self.limit):
            _ipc.wake(self.sem)

    def _nothing_ready(self, reader: RingReader) -> Event | None:
        """Find out whether the stream ended (StreamClosed), is unserved (ShmcastError) or
        is merely quiet (None). May return an event after all: one written just before
        the end mark."""
        event = None
        if self.reason is None:
            # The end mark is written after the last event: once we see it, a
            # second read sees every event written before it.
            if reader.ended():
                self.reason = StreamClosed.BUS_CLOSED
                event = reader.get(self.limit)
            elif time.monotonic() >= self.next_check:
                self.next_check = time.monotonic() + LIVENESS_PERIOD
                if not _registry.publisher_alive(self.ctrl):
                    closed = self.views is not None and self.views.i[I_STATE] == STATE_CLOSED
                    self.reason = StreamClosed.BUS_CLOSED if closed else \
                        StreamClosed.PUBLISHER_DIED
                    event = reader.get(self.limit)  # what it wrote before it went
                elif not self.served:
                    self._check_service()
        if event is None and self.reason is not None:
            self._end()
            self.raise_ended()
        return event

    def _check_service(self) -> None:
        if self.views is None or self.place is None:
            return
        status, err, _ = _registry.service(self.views, self.place.index, self.place.ring_id)
        if status == SERVE_OK:
            self.served = True
        elif status != SERVE_PENDING:
            why = os.strerror(err) if err else "its ring is malformed"
            later = "for good" if status == SERVE_REFUSED else "until that clears"
            raise ShmcastError(
                f"the publisher of bus {self.name!r} cannot serve this subscriber ({why}): "
                f"events published meanwhile are counted as dropped, {later}"
            )

    def missed(self) -> int:
        if self.frozen_missed is not None:
            return self.frozen_missed
        if self.views is None or self.place is None or self.released:
            return 0
        return _registry.service(self.views, self.place.index, self.place.ring_id).missed

    def dropped(self) -> int:
        if self.ended or self.reader is None:
            return self.final_dropped
        return self.reader.drops(self.limit) + self.missed()

    def raise_ended(self) -> NoReturn:
        if self.forked:
            raise ShmcastError(
                f"this subscription belongs to process {self.pid}; a forked child must "
                "subscribe on its own"
            )
        raise StreamClosed(self.reason or StreamClosed.UNSUBSCRIBED, self.name)

    # Ending.
    def unsubscribe(self) -> None:
        with self.lock:
            if self.forked or self.reason is not None or self.ended:
                return
            self.reason = StreamClosed.UNSUBSCRIBED
            if self.reader is not None:
                self.limit = self.reader.written()
            self.frozen_missed = self.missed()
            if self.reader is None or not self.reader.unread(self.limit):
                self._end()  # nothing left to deliver: the handles go now, not at gc
            else:
                self._leave()
                self.wake_all()

    def _end(self) -> None:
        self.ended = True
        self.final_dropped = (self.reader.drops(self.limit) if self.reader else 0) + self.missed()
        self._leave()
        self.wake_all()
        if self.users == 0:
            self._release()

    def wake_all(self) -> None:
        """Wake every thread and task waiting on the stream, so it sees the end."""
        sem = self.sem
        if sem is not None and not self.released:
            for _ in range(max(1, self.sleepers)):
                sem.release()
        if self.futures:
            futures = list(self.futures)
            self.futures.clear()
            wake_futures(futures)

    def _leave(self) -> None:
        """Give up our place and our names at once; the mappings stay for the readers."""
        if self.left or self.forked:
            return
        self.left = True
        if self.views is not None and self.place is not None:
            _registry.leave(self.views, self.name, self.nonce, self.place)
        # A dead bus is removed by whoever notices; one still being created
        # (no header yet, no publisher lock yet) must be left to its creator.
        if self.parsed and not _registry.publisher_alive(self.ctrl):
            _registry.reclaim_dead_bus(self.ctrl, self.name)

    def _release(self) -> None:
        """Close every handle (no thread uses them any more). Idempotent."""
        if self.released or self.forked:
            return
        self.released = True
        if self.sem is not None:
            self.sem.close()
        if self.reader is not None:
            self.reader.release()
        if self.ring is not None:
            self.ring.close()
        if self.views is not None:
            self.views.release()
        self.ctrl.close()

    def enter(self) -> None:
        """Note a thread about to use the ring or semaphore outside the lock (lock held)."""
        self.users += 1

    def exit(self) -> None:
        """...and its leaving (lock held): the last one out after the end releases."""
        self.users -= 1
        if self.ended and self.users == 0:
            self._release()

    def finalize(self) -> None:
        """End the subscription when it is collected, or at interpreter exit.

        Threads may still be blocked in it at exit (daemon threads): their
        handles are then left to the process's end, after every name is gone.
        """
        if self.forked:
            return
        if not self.lock.acquire(timeout=_EXIT_LOCK_TIMEOUT):
            return
        try:
            if not self.ended:
                self.ended = True
                self.final_dropped = self.dropped() if not self.released else 0
                self._leave()
                self.wake_all()
            if self.users == 0:
                self._release()
        finally:
            self.lock.release()

    # The async pump: one thread per subscription that has tasks waiting.
    async def asleep(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self.lock:
            if self.ended or self.reason is not None or self.forked:
                return  # the next poll raises
            self.futures.add(fut)
            if self.pump is None:
                self.pump = threading.Thread(target=self._pump, name=f"shmcast-{self.name}",
                                             daemon=True)
                self.pump.start()
        with self.pump_cv:
            self.pump_cv.notify()
        try:
            await fut
        finally:
            self.futures.discard(fut)

    def _pump(self) -> None:
        """Sleep on the semaphore for the waiting tasks; linger a period, then go."""
        while True:
            with self.pump_cv:
                if not self.futures:
                    self.pump_cv.wait(LIVENESS_PERIOD)
            with self.lock:
                if self.forked:
                    return
                if not self.futures or self.ended:
                    self.pump = None
                    return
                self.enter()
                self.sleepers += 1
                sem = self.sem
            try:
                if sem is not None and not _ipc.wait(sem, LIVENESS_PERIOD):
                    self.next_check = 0.0
            finally:
                with self.lock:
                    self.sleepers -= 1
                    futures = list(self.futures)
                    self.futures.clear()
                    self.exit()
            wake_futures(futures)


class Subscription(Stream):
    """One subscriber's stream of events from a bus; create it with :func:`subscribe`.

    Iterate it (``for`` or ``async for``) or call :meth:`get`. Thread-safe; see
    the contract for signal handlers, fork() and exit.

    :param name: the bus name.
    :param slots: ring size for this subscriber (default: the bus's).
    :param codec: required if the bus uses a custom codec (one of the same name)
        or pickle (``"pickle"``: nothing in a bus header can make a process unpickle).
    :param owner: the uid whose bus this is, if not the caller's effective uid.
    :raises BusNotFoundError: if no live bus has that name (or it is still being created).
    :raises BusPermissionError: if the bus belongs to another user than *owner*.
    :raises TooManySubscribersError: if the bus has no free place.
    :raises ShmcastError: if the segment is not a shmcast bus of this layout, or the
        codec does not match.
    """

    __slots__ = ("__weakref__", "_finalizer", "_r", "name")

    def __init__(self, name: str, *, slots: int | None = None,
                 codec: str | Codec | None = None, owner: int | None = None) -> None:
        check_name(name)
        if owner is not None:
            check_int("owner", owner, 0, 2**32 - 1)
        _ipc.check_memory_model()
        touch(name)
        self.name = name
        self._r = _Reader(name, slots, codec, owner)
        self._finalizer = weakref.finalize(self, self._r.finalize)

    # What Stream builds on.
    def _poll(self) -> Event | None:
        r = self._r
        with r.lock:
            r.users += 1
            try:
                event = r.next_event()
            finally:
                # exit(), inlined: a call more is a twentieth of get() on the C core.
                r.users -= 1
                if r.ended and r.users == 0:
                    r._release()
        if event is not None:
            r.streak = True
        return event

    def _ready(self, max: int) -> list[Event | DecodeError]:
        """Up to *max* events that are ready, without waiting, in one call to the ring (a
        batch reader's get_nowait): a DecodeError stands in the place of each event that
        would not decode (counted as dropped). StreamClosed once the stream ended and
        nothing is left."""
        r = self._r
        with r.lock:
            r.enter()
            try:
                batch = r.next_events(max)
            finally:
                r.exit()
        if batch:
            r.streak = True
        return batch

    def _sleep(self, timeout: float | None) -> None:
        r = self._r
        wait = LIVENESS_PERIOD if timeout is None else min(timeout, LIVENESS_PERIOD)
        with r.lock:
            if r.ended or r.forked:
                return  # the next poll raises
            r.enter()
            sem = r.sem
            reader = r.reader
            spin = r.streak
            if not spin:
                r.sleepers += 1
        try:
            if spin:
                # Events were arriving back to back: one may be a few microseconds
                # away, and catching it awake spares the publisher a futex wake-up.
                r.streak = False
                if reader is not None:
                    reader.poll(SPIN_SECONDS)
            elif sem is not None and not _ipc.wait(sem, wait):
                r.next_check = 0.0  # a quiet slice: check the publisher next
        finally:
            with r.lock:
                if not spin:
                    r.sleepers -= 1
                r.exit()

    async def _asleep(self) -> None:
        await self._r.asleep()

    # Ending.
    def unsubscribe(self) -> None:
        """Leave the bus; the stream ends after the events already buffered. Idempotent.

        No event published after it returned is delivered. Threads blocked in
        :meth:`get` or iterating return within 100 ms. Safe from any thread and
        from a signal handler.
        """
        self._r.unsubscribe()

    @property
    def dropped(self) -> int:
        """Events this subscriber lost, counted when they are overwritten or rejected."""
        r = self._r
        with r.lock:
            return r.dropped()

    @property
    def closed(self) -> bool:
        """Whether the stream has ended or is ending (unsubscribed, bus closed, publisher died)."""
        return self._r.reason is not None or self._r.ended

    def _bus_version(self) -> int:
        """The bus's last assigned version, from its control segment (0 once released)."""
        r = self._r
        with r.lock:
            if r.released or r.forked or r.views is None:
                return 0
            return int(r.views.q[Q_VERSION])

    def __reduce__(self) -> Any:
        raise TypeError("a Subscription cannot be pickled: subscribe in the other process")

    def __repr__(self) -> str:
        reason = self._r.reason
        state = f"ended ({reason})" if reason else "open"
        return f"<shmcast.Subscription {self.name!r} {state}>"


def subscribe(name: str, *, slots: int | None = None, codec: str | Codec | None = None,
              owner: int | None = None) -> Subscription:
    """Attach to the bus *name*; see :class:`Subscription`."""
    return Subscription(name, slots=slots, codec=codec, owner=owner)

__all__ = ["Subscription", "subscribe"]
