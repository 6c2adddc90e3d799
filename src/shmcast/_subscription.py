"""The subscriber: attaches to a bus by name and reads its own ring, blocking or async."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, NoReturn

import posix_ipc

from . import _ipc, _registry
from ._codecs import Codec, for_subscriber
from ._errors import BusNotFoundError, ShmcastError, StreamClosed, TooManySubscribersError
from ._event import Event, make_event
from ._layout import (
    CONTROL_HEADER_SIZE,
    ENTRY_JOINING,
    ENTRY_LEFT,
    STATE_CLOSED,
    Entry,
    control_size,
    pack_ring_header,
    parse_control_header,
    read_entry,
    ring_size,
)
from ._names import (
    MAX_RING_BYTES,
    MAX_SLOTS,
    MAX_SUBSCRIBERS,
    check_int,
    check_name,
    control_name,
    ring_name,
    touch,
)
from ._ring import RingReader

# A blocked get() wakes this often to check that the publisher is alive: the
# contract ends a dead publisher's streams within 2 s. It costs one fcntl call.
LIVENESS_PERIOD = 0.5

# How long get() watches the ring before it sleeps, when the previous event was
# already waiting for it. A wake-up through the semaphore costs the publisher a
# futex call of several microseconds; an idle subscriber never spins.
SPIN_SECONDS = 50e-6


class _Reader:
    """Everything a Subscription owns; kept apart so a finalizer can release it."""

    def __init__(self, name: str, slots: int | None, codec: object) -> None:
        self.name = name
        self.pid = os.getpid()
        self.forked = False  # set in the child of a fork(): the subscription is the parent's
        try:
            ctrl = _ipc.Segment.open(control_name(name),
                                     max_size=control_size(MAX_SUBSCRIBERS))
        except FileNotFoundError:
            raise BusNotFoundError(f"no bus named {name!r} on this host") from None
        self.ctrl: _ipc.Segment | None = ctrl
        self.ring: _ipc.Segment | None = None
        self.sem: posix_ipc.Semaphore | None = None
        self.index: int | None = None
        self.reader: RingReader | None = None
        self.nonce = 0
        self.ring_id = 0
        try:
            self._attach(slots, codec)
        except BaseException:
            self.release(unregister=True)
            raise
        _ipc.track_fork(self)

    def after_fork_in_child(self) -> None:
        self.forked = True

    def _attach(self, slots: int | None, codec: object) -> None:
        ctrl = self.ctrl
        if ctrl is None:
            raise ShmcastError("subscription already released")
        if ctrl.size < CONTROL_HEADER_SIZE:
            raise ShmcastError(
                f"/dev/shm{ctrl.name} is not a shmcast bus: {ctrl.size} bytes, "
                f"a bus header needs {CONTROL_HEADER_SIZE}"
            )
        geometry = parse_control_header(ctrl.buf, ctrl.size)
        if geometry.state == STATE_CLOSED:
            raise BusNotFoundError(f"bus {self.name!r} is closed")
        if not _registry.publisher_alive(ctrl):
            raise BusNotFoundError(
                f"bus {self.name!r} is dead: its publisher (pid {geometry.pid}) exited "
                "without closing it"
            )
        self.codec: Codec = for_subscriber(geometry.codec, codec)
        self.loads = self.codec.loads
        if slots is None:
            slots = geometry.slots
        check_int("slots", slots, 1, MAX_SLOTS)
        size = ring_size(slots, geometry.slot_size)
        if size > MAX_RING_BYTES:
            raise ValueError(f"a ring of {slots} slots of {geometry.slot_size} bytes is too large")
        self.nonce = geometry.nonce
        self.index = _registry.claim_place(ctrl, geometry.max_subscribers)
        if self.index is None:
            raise TooManySubscribersError(
                f"bus {self.name!r} has all its {geometry.max_subscribers} places taken"
            )
        previous = read_entry(ctrl.buf, self.index).ring_id
        if previous:
            # The place's last holder left or died; if it died, its names are ours to remove.
            _registry.unlink_ring(self.name, self.nonce, previous)
        self.ring_id = secrets.randbits(64) | 1
        # The ring id goes into the entry before the ring exists, so whoever
        # cleans up after us (if we die now) knows the names to remove.
        _registry.write_entry(ctrl, self.index,
                              Entry(ENTRY_JOINING, self.pid, self.ring_id, slots, time.time()))
        rname = ring_name(self.name, self.nonce, self.ring_id)
        self.ring = _ipc.Segment.create(rname, size, geometry.mode)
        pack_ring_header(self.ring.buf, slots=slots, slot_size=geometry.slot_size,
                         nonce=self.nonce, ring_id=self.ring_id)
        self.sem = _ipc.create_semaphore(rname, geometry.mode)
        self.reader = RingReader(self.ring.buf, slots, geometry.slot_size,
                                 geometry.overflow == "overwrite")
        if not _registry.activate(ctrl, self.index):
            raise BusNotFoundError(f"bus {self.name!r} is closed")

    def leave(self) -> None:
        """Give up our place in the registry and our ring's names; keep the mapping to drain."""
        ctrl = self.ctrl
        if ctrl is None or self.forked:
            return
        self.ctrl = None
        if self.index is not None:
            _registry.set_state(ctrl, self.index, ENTRY_LEFT)
            # If the registry lock is stuck, the publisher's periodic scan sees
            # the place freed instead.
            with contextlib.suppress(ShmcastError):
                _registry.bump_epoch(ctrl)
        if self.ring_id:
            _registry.unlink_ring(self.name, self.nonce, self.ring_id)
        if not _registry.publisher_alive(ctrl):
            _registry.reclaim_dead_bus(ctrl, self.name)
        ctrl.close()  # releases our place: another subscriber may take it now

    def release(self, unregister: bool = False) -> None:
        """Free every OS handle (idempotent); with *unregister*, leave the registry first."""
        if self.forked:
            return  # a forked copy: the subscription is not ours to end
        ctrl = self.ctrl
        if ctrl is not None:
            self.ctrl = None
            if self.index is not None and unregister:
                _registry.set_state(ctrl, self.index, ENTRY_LEFT)
            if self.ring_id:
                _registry.unlink_ring(self.name, self.nonce, self.ring_id)
            if not _registry.publisher_alive(ctrl):
                _registry.reclaim_dead_bus(ctrl, self.name)
            ctrl.close()
        if self.sem is not None:
            self.sem.close()
            self.sem = None
        if self.ring is not None:
            if self.reader is not None:
                self.reader.release()
            self.ring.close()
            self.ring = None


class Subscription:
    """One subscriber's stream of events from a bus; create it with :func:`subscribe`.

    Iterate it (``for`` or ``async for``) or call :meth:`get`. Thread-safe.

    :param name: the bus name.
    :param slots: ring size for this subscriber (default: the bus's).
    :param codec: required if the bus uses a custom codec: one of the same name.
    :raises BusNotFoundError: if no live bus has that name.
    :raises TooManySubscribersError: if the bus has no free place.
    :raises ShmcastError: if the segment is not a shmcast bus of this layout, or the
        codec does not match.
    """

    def __init__(self, name: str, *, slots: int | None = None,
                 codec: str | Codec | None = None) -> None:
        check_name(name)
        touch(name)
        self._r = _Reader(name, slots, codec)
        if self._r.reader is None:  # _Reader raises rather than leave this unset
            raise ShmcastError(f"could not attach to bus {name!r}")
        self._reader: RingReader = self._r.reader
        self._loads = self._r.loads
        self._types: dict[bytes, str] = {}
        self._streak = False  # the last get() found an event without waiting
        self._lock = threading.Lock()
        self._reason: str | None = None  # why the stream ends, once it is known
        self._limit: int | None = None  # ring index the stream ends at, once unsubscribed
        self._ended = False  # StreamClosed raised: every handle may go
        self._waiters = 0
        self._final_dropped = 0
        self._next_check = time.monotonic() + LIVENESS_PERIOD
        self._executor: ThreadPoolExecutor | None = None
        self._finalizer = weakref.finalize(self, self._r.release, True)

    @property
    def name(self) -> str:
        """The bus name."""
        return self._r.name

    # Reading.
    def _next(self) -> Event | None:
        """The next event, None if there is none yet; StreamClosed at the end. Lock held."""
        if self._ended or self._r.forked:
            self._raise_ended()
        while True:
            item = self._reader.read(self._limit)
            if item is None:
                item = self._check_end()
                if item is None:
                    return None
            version, timestamp, tb, data = item
            type_ = self._types.get(tb)
            if type_ is None:
                type_ = tb.decode("utf-8", "replace")
                if len(self._types) < 1024:
                    self._types[tb] = type_
            try:
                payload = self._loads(data)
            except Exception:  # noqa: BLE001 - bytes the codec cannot read: a counted drop
                self._reader.discard()
                continue
            return make_event(type_, payload, version, timestamp, data)

    def _check_end(self) -> tuple[int, float, bytes, bytes] | None:
        """Nothing to read: find out whether the stream ended (StreamClosed) or not (None).

        May return an event after all: one published just before the end mark.
        """
        reader = self._reader
        item = None
        if self._reason is None:
            # The end mark is written after the last event: once we see it, a
            # second read sees every event written before it.
            if reader.ended():
                self._reason = StreamClosed.BUS_CLOSED
                item = reader.read(self._limit)
            elif time.monotonic() >= self._next_check:
                self._next_check = time.monotonic() + LIVENESS_PERIOD
                ctrl = self._r.ctrl
                if ctrl is not None and not _registry.publisher_alive(ctrl):
                    self._reason = StreamClosed.PUBLISHER_DIED
                    item = reader.read(self._limit)  # what it wrote before dying
        if item is None and self._reason is not None:
            self._end()
            self._raise_ended()
        return item

    def _raise_ended(self) -> NoReturn:
        r = self._r
        if r.forked:
            raise ShmcastError(
                f"this subscription belongs to process {r.pid}; a forked child must subscribe "
                "on its own"
            )
        raise StreamClosed(self._reason or StreamClosed.UNSUBSCRIBED, r.name)

    def _end(self) -> None:
        r = self._r
        self._ended = True
        self._final_dropped = self._reader.drops(self._limit)
        r.leave()
        if self._waiters == 0:
            self._finalizer()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def get(self, timeout: float | None = None) -> Event:
        """The next event, waiting up to *timeout* seconds (forever if None).

        :raises TimeoutError: if no event arrives in time.
        :raises StreamClosed: once the stream ended and its buffered events were delivered.
        """
        with self._lock:
            event = self._next()
        if event is not None:
            self._streak = True
            return event
        if timeout is not None:
            if timeout < 0:
                raise ValueError("timeout must be non-negative")
            if timeout == 0:
                raise TimeoutError(f"no event ready on bus {self._r.name!r}")
            deadline = time.monotonic() + timeout
        if self._streak:
            # Events were arriving back to back: one may be a few microseconds
            # away, and catching it awake spares the publisher a futex wake-up.
            self._streak = False
            self._reader.poll(SPIN_SECONDS)
        while True:
            with self._lock:
                event = self._next()
                if event is not None:
                    return event
                if timeout is None:
                    wait = LIVENESS_PERIOD
                else:
                    wait = min(deadline - time.monotonic(), LIVENESS_PERIOD)
                    if wait <= 0:
                        raise TimeoutError(f"no event on bus {self._r.name!r} within {timeout} s")
                self._waiters += 1
            self._wait(wait)

    def get_nowait(self) -> Event:
        """The next event if one is ready.

        :raises TimeoutError: if none is.
        :raises StreamClosed: once the stream ended and its buffered events were delivered.
        """
        return self.get(0)

    def _wait(self, timeout: float) -> None:
        """Sleep on the ring's semaphore (caller registered as a waiter)."""
        sem = self._r.sem
        try:
            if sem is not None and not _ipc.wait(sem, timeout):
                self._next_check = 0.0  # a quiet slice: check the publisher next
        finally:
            with self._lock:
                self._waiters -= 1
                if self._ended and self._waiters == 0:
                    self._finalizer()

    def __iter__(self) -> Iterator[Event]:
        lock = self._lock
        next_ready = self._next
        while True:
            try:
                with lock:
                    event = next_ready()
                if event is None:
                    event = self.get()
            except StreamClosed:
                return
            yield event

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        """The next event without blocking the event loop; StopAsyncIteration at the end."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                try:
                    event = self._next()
                except StreamClosed:
                    raise StopAsyncIteration from None
                if event is not None:
                    return event
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="shmcast-wait")
                self._waiters += 1
                executor = self._executor
            try:
                await loop.run_in_executor(executor, self._wait, LIVENESS_PERIOD)
            except RuntimeError:
                # The executor was shut down by a concurrent unsubscribe.
                with self._lock:
                    self._waiters -= 1
                    if self._ended and self._waiters == 0:
                        self._finalizer()

    # Ending.
    def unsubscribe(self) -> None:
        """Leave the bus; the stream ends after the events already buffered. Idempotent.

        Threads blocked in :meth:`get` or iterating return within 100 ms.
        """
        with self._lock:
            r = self._r
            if self._reason is not None or self._ended or r.forked:
                return
            self._reason = StreamClosed.UNSUBSCRIBED
            self._limit = self._reader.written()
            r.leave()
            sem = r.sem
            if sem is not None:
                for _ in range(max(1, self._waiters)):
                    sem.release()

    close = unsubscribe

    @property
    def dropped(self) -> int:
        """Events this subscriber lost, counted when they are overwritten or rejected."""
        with self._lock:
            if self._ended or self._r.ring is None:
                return self._final_dropped
            return self._reader.drops(self._limit)

    @property
    def closed(self) -> bool:
        """Whether the stream has ended or is ending (unsubscribed, bus closed, publisher died)."""
        return self._reason is not None or self._ended

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.unsubscribe()

    def __reduce__(self) -> Any:
        raise TypeError("a Subscription cannot be pickled: subscribe in the other process")

    def __repr__(self) -> str:
        state = f"ended ({self._reason})" if self._reason else "open"
        return f"<shmcast.Subscription {self._r.name!r} {state}>"


def subscribe(name: str, *, slots: int | None = None,
              codec: str | Codec | None = None) -> Subscription:
    """Attach to the bus *name*; see :class:`Subscription`."""
    return Subscription(name, slots=slots, codec=codec)


__all__ = ["Subscription", "subscribe"]
