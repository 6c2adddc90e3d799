"""Publishing from other processes: a Publisher writes into its place's inbox, never waiting.

The bus creates one inbox ring per publisher place. A ``Publisher`` takes a
place by its OFD lock, encodes each event once, in its own process, and
writes it into the inbox with the ring writer the bus uses for a subscriber's
ring (a seqlock, single writer: the place lock makes it so; ``resume``: it
goes on from the counters the place's last holder left), which then posts the
bus's drain semaphore if its value is 0. The bus owner's drain thread publishes the
inboxes' events in its own publish path, which gives them their versions. A
full inbox rejects the event, counted in ``dropped``: nothing on this path
waits for another process. See docs/design.md, "Publishers".
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from types import TracebackType
from typing import Any, NoReturn

import posix_ipc

from . import _ipc, _registry
from ._codecs import Codec, for_publisher
from ._errors import (
    BusNotFoundError,
    EventTooLargeError,
    ShmcastError,
    TooManyPublishersError,
)
from ._layout import (
    I_STATE,
    Q_END,
    Q_R,
    RING_HEADER_SIZE,
    SLOT_BODY_OFF,
    SLOT_HEADER,
    SLOT_HEADER_SIZE,
    STATE_CLOSED,
    U64,
    W_OFF,
    check_ring_header,
    control_size,
    ring_size,
    slot_stride,
)
from ._names import (
    MAX_PUBLISHERS,
    MAX_SUBSCRIBERS,
    check_int,
    check_name,
    control_name,
    drain_name,
    encode_type,
    inbox_name,
    touch,
)
from ._ring import RingWriter, frame

# publish() asks the kernel whether the bus owner still holds the bus at most
# this often (one fcntl call); the contract wants its death noticed within 2 s.
OWNER_CHECK_PERIOD = 0.5

_monotonic = time.monotonic
_time = time.time


class _Sender:
    """Everything a Publisher owns; kept apart so a finalizer can end it.

    Locking as in the bus: ``lock`` is reentrant so that close() from a signal
    handler, while the interrupted code of the same thread is inside
    publish(), gets it at once; ``busy`` then tells it that a write is under
    way below it, and the place is given up only when that write is done (a
    new holder writing into the same inbox meanwhile would tear the event).
    The inbox stays mapped after close(), so that ``dropped`` can still count
    the events the bus never drained if it closes first.
    """

    def __init__(self, name: str, codec: object, owner: int | None) -> None:
        self.name = name
        self.pid = os.getpid()
        self.forked = False
        self.lock = threading.RLock()
        self.busy = False
        self.closed = False
        self.left = False
        self.released = False
        self.ended: str | None = None  # why publish() raises from now on
        self.owner_dead = False
        self.parsed = False
        self.next_check = 0.0
        self.types: dict[str, bytes] = {}
        self.views: _registry.Views | None = None
        self.inbox: _ipc.Segment | None = None
        self.writer: RingWriter | None = None
        self.inbox_q: memoryview | None = None  # for r and the end mark, which the owner writes
        self.sem: posix_ipc.Semaphore | None = None
        self.place: int | None = None
        self.max_subscribers = 0
        self.w0 = self.rejected0 = 0
        self.final_dropped = 0
        try:
            ctrl = _ipc.Segment.open(control_name(name), 0,
                                     max_size=control_size(MAX_SUBSCRIBERS, MAX_PUBLISHERS))
        except FileNotFoundError:
            raise BusNotFoundError(f"no bus named {name!r} on this host") from None
        self.ctrl = ctrl
        try:
            self._attach(codec, owner)
        except BaseException:
            self._leave()
            self._release(unmap_inbox=True)
            raise
        _ipc.track_fork(self)

    def after_fork_in_child(self) -> None:
        self.forked = True
        self.lock = threading.RLock()

    def _attach(self, codec: object, owner: int | None) -> None:
        ctrl = self.ctrl
        g = _registry.check_attachable(ctrl, self.name, owner, "Publisher")
        self.parsed = True
        if g.max_publishers == 0:
            raise TooManyPublishersError(
                f"bus {self.name!r} allows no publishers: its owner must create it with "
                "Bus(..., max_publishers=N)"
            )
        self.codec: Codec = for_publisher(g.codec, codec)
        self.dumps = self.codec.dumps
        self.slot_size = g.slot_size
        self.max_subscribers = g.max_subscribers
        self.views = views = _registry.Views(ctrl)
        self.place = _registry.take_publisher_place(views, g.max_subscribers, g.max_publishers,
                                                    self.pid)
        if self.place is None:
            raise TooManyPublishersError(
                f"bus {self.name!r} has all its {g.max_publishers} publisher places taken"
            )
        iname = inbox_name(self.name, g.nonce, self.place)
        size = ring_size(g.slots, g.slot_size)
        try:
            # Map exactly what the geometry says, whatever the file's size now.
            self.inbox = _ipc.Segment.open(iname, size, max_size=size)
            self.inbox.drop_fd()  # no lock lives on it; fds are a limited resource
            check_ring_header(self.inbox.buf, self.inbox.size, slots=g.slots,
                              slot_size=g.slot_size, nonce=g.nonce, ring_id=self.place)
            self.sem = _ipc.open_semaphore(drain_name(self.name, g.nonce))
        except FileNotFoundError:
            # The bus creates its inboxes right after its header, and removes them when
            # it closes: either way, no bus to publish on.
            raise BusNotFoundError(
                f"bus {self.name!r} is closed or still being created") from None
        # drop_new: a full inbox rejects the event, counted, and nothing waits.
        self.writer = writer = RingWriter(self.inbox.buf, g.slots, g.slot_size, False, self.sem,
                                          resume=True)
        self.inbox_q = inbox_q = self.inbox.buf.cast("Q")
        self.w0, self.rejected0 = writer.w, writer.rejected
        if inbox_q[Q_END]:
            raise BusNotFoundError(f"bus {self.name!r} is closed")
        _registry.activate_publisher(views, g.max_subscribers, self.place, self.w0,
                                     self.rejected0)
        self.ctrl_i = views.i

    # The hot path.
    def publish(self, type_: str, payload: Any) -> None:
        tb = self.types.get(type_)
        if tb is None:
            tb = self._type_bytes(type_)
        data = self.dumps(payload)
        if len(data) > self.slot_size:
            raise EventTooLargeError(
                f"encoded event is {len(data)} bytes; this bus's slot_size is {self.slot_size}"
            )
        with self.lock:
            # busy before anything is touched: a signal handler's close() that runs
            # from here on defers the unmapping to the end of this call.
            self.busy = True
            try:
                self._publish_locked(tb, data)
            finally:
                self.busy = False
                if self.closed and not self.forked:
                    self._leave()
                    self._release()

    def _publish_locked(self, tb: bytes, data: bytes) -> None:
        if self.closed or self.forked or self.ended:
            self._raise_unusable()
        writer = self.writer
        inbox_q = self.inbox_q
        if writer is None or inbox_q is None:
            self._raise_unusable()
        if self.ctrl_i[I_STATE] == STATE_CLOSED or inbox_q[Q_END]:
            self._end("the bus was closed")
        now = _monotonic()
        if now >= self.next_check:
            self.next_check = now + OWNER_CHECK_PERIOD
            if not _registry.publisher_alive(self.ctrl):
                self.owner_dead = True
                self._end("its owner died")
        # The slot's version field carries our own count; the bus gives the real one.
        head, tail = frame(writer.w + 1, _time(), tb, data)
        writer.write(head, tail)  # a full inbox rejects it, counted; never waits

    def _type_bytes(self, type_: str) -> bytes:
        tb = encode_type(type_)
        if len(self.types) < 1024:
            self.types[type_] = tb
        return tb

    def _raise_unusable(self) -> NoReturn:
        if self.forked:
            raise ShmcastError(
                f"this Publisher of bus {self.name!r} belongs to process {self.pid}; a forked "
                "child must create its own"
            )
        if self.ended:
            raise ShmcastError(f"bus {self.name!r} cannot be published on: {self.ended}")
        raise ShmcastError(f"this Publisher of bus {self.name!r} is closed")

    def _end(self, why: str) -> NoReturn:
        """The bus is gone: give up the place and raise (lock held)."""
        self.ended = why
        self._leave()
        self._release()
        self._raise_unusable()

    def position(self) -> tuple[int, int] | None:
        """(place, write number) of the next event handed over, or None if not attached."""
        writer = self.writer
        if writer is None or self.place is None:
            return None
        return self.place, writer.w

    def dropped(self) -> int:
        """Events we could not hand over, plus, once the bus drains no more, those it left."""
        writer = self.writer
        inbox_q = self.inbox_q
        if writer is None or inbox_q is None or self.inbox is None or self.inbox.closed:
            return self.final_dropped
        mine = writer.rejected - self.rejected0
        if self.owner_dead or inbox_q[Q_END]:
            mine += max(0, writer.w - max(int(inbox_q[Q_R]), self.w0))
        return mine

    # Ending.
    def close(self) -> None:
        with self.lock:
            if self.forked or self.closed:
                return
            self.closed = True
            if not self.busy:
                self._leave()
                self._release()

    def _leave(self) -> None:
        """Give up our place (it frees at once); a dead bus is removed by whoever notices."""
        if self.left or self.forked:
            return
        self.left = True
        if self.views is not None and self.place is not None:
            _registry.leave_publisher(self.views, self.max_subscribers, self.place)
        if self.parsed and not self.ctrl.closed and not _registry.publisher_alive(self.ctrl):
            self.owner_dead = True
            _registry.reclaim_dead_bus(self.ctrl, self.name)

    def _release(self, *, unmap_inbox: bool = False) -> None:
        """Close every handle but the inbox's mapping (``dropped`` reads it). Idempotent."""
        if self.forked:
            return
        if not self.released:
            self.released = True
            if self.sem is not None:
                self.sem.close()
            if self.views is not None:
                self.views.release()
            self.ctrl.close()
        if unmap_inbox and self.inbox is not None and not self.inbox.closed:
            self.final_dropped = self.dropped()
            if self.writer is not None:
                self.writer.release()
            if self.inbox_q is not None:
                self.inbox_q.release()
            self.inbox.close()

    def finalize(self) -> None:
        """Leave the place when the Publisher is collected, or at interpreter exit."""
        if self.forked:
            return
        if not self.lock.acquire(timeout=1.0):
            return
        try:
            self.closed = True
            if not self.busy:
                self._leave()
                self._release(unmap_inbox=True)
        finally:
            self.lock.release()


class Publisher:
    """Publish on a bus from any process of the same user; the bus owner's process delivers.

    Needs a bus created with ``Bus(..., max_publishers=N)``, N > 0. Each event
    is encoded here, once, and handed to the bus without waiting for anything:
    an event that cannot be handed over at once (the owner is stopped or far
    behind) is dropped and counted in :attr:`dropped`. The bus gives every
    event its version, so all subscribers see one total order, in which each
    publisher's events keep their order. Thread-safe.

    :param name: the bus name.
    :param codec: needed only for a bus with a custom codec (one of the same name);
        json, raw and pickle buses are known by name.
    :param owner: the uid whose bus this is, if not the caller's effective uid.
    :raises BusNotFoundError: if no live bus has that name (or it is closed, or
        still being created).
    :raises BusPermissionError: if the bus belongs to another user than *owner*.
    :raises TooManyPublishersError: if every publisher place is taken, or the bus
        allows none.
    :raises ShmcastError: if the segment is not a shmcast bus of this layout, or the
        codec does not match.
    """

    __slots__ = ("__weakref__", "_finalizer", "_s", "name")

    def __init__(self, name: str, *, codec: str | Codec | None = None,
                 owner: int | None = None) -> None:
        check_name(name)
        if owner is not None:
            check_int("owner", owner, 0, 2**32 - 1)
        _ipc.check_memory_model()
        touch(name)
        self.name = name
        self._s = _Sender(name, codec, owner)
        self._finalizer = weakref.finalize(self, self._s.finalize)

    def publish(self, type: str, payload: Any = None) -> None:
        """Encode *payload* once and hand the event to the bus; never waits.

        An event that cannot be handed over at once is dropped and counted in
        :attr:`dropped`.

        :raises EventTooLargeError: if the encoded payload exceeds the bus's
            ``slot_size``; nothing is published.
        :raises TypeError: if the codec cannot encode *payload* (json); nothing is published.
        :raises ShmcastError: if the bus was closed or its owner died (noticed
            within 0.5 s), if this Publisher is closed, or if this process
            inherited it by fork().
        """
        self._s.publish(type, payload)

    @property
    def dropped(self) -> int:
        """Events given to :meth:`publish` that no subscriber will ever get from the bus:
        rejected by a full inbox, or left in it when the bus closed or its owner died."""
        s = self._s
        with s.lock:
            return s.dropped()

    # Internal, for shmcast.bridge (which must not read our attributes): a process
    # that may be killed inside publish() notes _position before it, and after a
    # restart asks _landed whether that event reached the inbox.
    @property
    def _position(self) -> tuple[int, int] | None:
        """Internal: ``(place, w)``, where the next event handed over lands (write number
        *w* of place *place*'s inbox), or None if this Publisher is not attached."""
        s = self._s
        with s.lock:
            return s.position()

    @staticmethod
    def _landed(name: str, position: tuple[int, int], type: str | bytes) -> bool | None:
        """Internal: did the publish noted at *position* (see :attr:`_position`) reach the
        inbox, with an event of *type*? True, False, or None if it cannot be told (the bus
        or the inbox is gone, or later writes of a new holder of the place went round the
        ring since). Reads the inbox read-only, attaching to nothing."""
        from ._inspect import read_geometry

        place, w = position
        tb = type if isinstance(type, bytes) else type.encode()
        try:
            g = read_geometry(name)
            if not 0 <= place < g.max_publishers:
                return None
            size = ring_size(g.slots, g.slot_size)
            with _ipc.open_readonly(inbox_name(name, g.nonce, place), size) as seg:
                check_ring_header(seg.buf, seg.size, slots=g.slots, slot_size=g.slot_size,
                                  nonce=g.nonce, ring_id=place)
                w_now, = U64.unpack_from(seg.buf, W_OFF)
                if w_now <= w:
                    return False  # never written (a full inbox rejected it, or not reached)
                off = RING_HEADER_SIZE + (w % g.slots) * slot_stride(g.slot_size)
                seq, = U64.unpack_from(seg.buf, off)
                if seq != 2 * w + 2:  # overwritten since (or torn): cannot tell
                    return None
                tlen = SLOT_HEADER.unpack_from(seg.buf, off + SLOT_BODY_OFF)[2]
                start = off + SLOT_HEADER_SIZE
                return bytes(seg.buf[start:start + tlen]) == tb
        except (OSError, ShmcastError):
            return None

    @property
    def closed(self) -> bool:
        """Whether close() was called or the bus ended."""
        return self._s.closed or self._s.ended is not None

    def close(self) -> None:
        """Detach from the bus (the place frees at once); the bus lives on. Idempotent.

        Events already handed over are still delivered. Safe from any thread and
        from a signal handler.
        """
        self._s.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise TypeError("a Publisher cannot be pickled: create one in the other process")

    def __repr__(self) -> str:
        s = self._s
        state = f"ended ({s.ended})" if s.ended else "closed" if s.closed else "open"
        return f"<shmcast.Publisher {self.name!r} {state}>"


__all__ = ["Publisher"]
