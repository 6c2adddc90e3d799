"""One subscriber's ring: a single-writer, single-reader seqlock ring that never blocks the writer.

The writer (the publisher) owns ``w``, ``rejected`` and each slot's ``seq``; the
reader (the subscriber) owns ``r`` and ``delivered``. Neither ever waits for the
other:

* The writer marks a slot odd (``2i+1``) before it overwrites it and even
  (``2i+2``) after, then publishes ``w = i+1``.
* The reader reads ``seq``, copies the slot, and reads ``seq`` again. If it
  changed, the writer lapped it mid-copy: the copy is discarded and the event
  counted as dropped, exactly as if it had been overwritten a moment sooner.
  (Agrona's BroadcastReceiver validates a copy the same way: loss is not an
  error, a torn copy is never delivered.)

Drops are a function of the shared counters, so the same number is seen from
both sides without any shared read-modify-write::

    dropped = rejected + (r - delivered) + max(0, w - slots - r)   # last term: overwrite only

where ``w - slots - r`` counts the unread events already overwritten that the
reader has not yet stepped over. Stepping over lost events moves ``r`` alone,
one store, so a reader killed at any instant leaves a sum that is right (an
event it was killed while reading counts as lost, which it is). The functions
here touch nothing but the buffer they are given.

The overflow policy lives here too (:class:`Overflow`): the layout stores its
index, the writer applies it, and the drop formula depends on it.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable
from typing import Any

from ._event import Event
from ._layout import (
    Q_DELIVERED,
    Q_END,
    Q_R,
    Q_REJECTED,
    Q_W,
    RING_HEADER_SIZE,
    SLOT_HEADER,
    SLOT_HEADER_SIZE,
    slot_stride,
)
from ._names import MAX_TYPE_BYTES

_perf_counter = time.perf_counter
_new = object.__new__
_set = object.__setattr__

# 8-byte fields are read and written through a ``memoryview.cast("Q")`` of the
# ring: one aligned 8-byte copy each, and several times cheaper than
# ``struct.pack_into`` on the hot paths.
_W, _REJECTED, _END, _R, _DELIVERED = Q_W, Q_REJECTED, Q_END, Q_R, Q_DELIVERED
_hdr_unpack = SLOT_HEADER.unpack_from

# Payloads up to this size are sent as one copy with their header (joining them
# once per publish is cheaper than a second copy per ring); larger ones are
# copied straight from the caller's bytes into each ring.
INLINE_MAX = 1024

# Event types whose str a reader keeps (most streams have a handful).
_TYPE_CACHE = 32

#: What a reader calls for an event its codec cannot read: (version, type, data,
#: the codec's exception) -> the error to raise (or hand on in a batch).
Undecodable = Callable[[int, str, bytes, Exception], BaseException]


class Overflow(enum.Enum):
    """What a full ring (or a full feed) does with a new event; either way one drop counts."""

    OVERWRITE = "overwrite"  #: lose the oldest unread event
    DROP_NEW = "drop_new"  #: reject the new event (the Go eventbus semantics)

    @classmethod
    def parse(cls, value: object) -> Overflow:
        """The policy named *value* (a name or an Overflow).

        :raises ValueError: for anything else.
        """
        try:
            return cls(value)
        except ValueError:
            names = tuple(m.value for m in cls)
            raise ValueError(f"overflow must be one of {names}, got {value!r}") from None

    @property
    def code(self) -> int:
        """Its number in the control header."""
        return list(Overflow).index(self)

    @classmethod
    def from_code(cls, code: int) -> Overflow | None:
        """The policy stored as *code*, None if there is none."""
        members = list(cls)
        return members[code] if 0 <= code < len(members) else None


def frame(version: int, timestamp: float, type_: bytes, data: bytes) -> tuple[bytes, bytes]:
    """An event's slot bytes after its seq, as (head, tail) to copy one after the other."""
    head = SLOT_HEADER.pack(version, timestamp, len(type_), len(data)) + type_
    if len(data) <= INLINE_MAX:
        return head + data, b""
    return head, data


def write_all(writers: list[RingWriter], head: bytes, tail: bytes) -> None:
    """Write one framed event into every ring, then wake each reader that sleeps.

    ``RingWriter.write`` inlined: this loop is the publisher's hot path, and a
    method call per ring cost more than the copy for small events.
    """
    n = len(head)
    m = len(tail)
    for ring in writers:
        q = ring.q
        i = ring.w
        if not ring.overwrite and i - q[_R] >= ring.slots:
            ring.rejected += 1
            q[_REJECTED] = ring.rejected
            continue
        off = RING_HEADER_SIZE + (i % ring.slots) * ring.stride
        seq = off >> 3
        q[seq] = 2 * i + 1
        p = off + 8
        ring.buf[p : p + n] = head
        if m:
            ring.buf[p + n : p + n + m] = tail
        q[seq] = 2 * i + 2
        ring.w = i = i + 1
        q[_W] = i
    # Wake only once every ring has the event: a woken reader may preempt us, and
    # must not delay the others' copies.
    for ring in writers:
        sem = ring.sem
        # A reader asleep, or about to be: see docs/design.md, "Waking".
        if sem is not None and sem.value == 0:
            sem.release()


def drops(*, w: int, rejected: int, r: int, delivered: int, slots: int,
          overwrite: bool) -> int:
    """Events a ring's reader lost so far, from its counters (clamped against garbage)."""
    r = min(max(r, 0), w)
    lost = rejected + r - min(max(delivered, 0), r)
    if overwrite:
        lost += max(0, w - slots - r)
    return lost


class RingWriter:
    """The publisher's end of one ring, with the semaphore that wakes its reader."""

    __slots__ = ("buf", "overwrite", "q", "rejected", "sem", "slots", "stride", "w")

    def __init__(self, buf: memoryview, slots: int, slot_size: int, overwrite: bool,
                 sem: Any = None, *, resume: bool = False) -> None:
        self.buf = buf
        self.sem = sem
        self.q = buf.cast("Q")
        self.slots = slots
        self.stride = slot_stride(slot_size)
        self.overwrite = overwrite
        if resume:
            # A ring that outlives its writers (a publisher place's inbox): go on from
            # the counters the last one left.
            self.w, self.rejected = int(self.q[_W]), int(self.q[_REJECTED])
        else:
            # The writer owns these: a fresh ring starts at zero whatever its bytes say.
            self.w = self.rejected = 0
            self.q[_W] = self.q[_REJECTED] = 0

    def write(self, head: bytes, tail: bytes) -> bool:
        """Put one framed event in this ring alone; False if it was rejected (``drop_new``)."""
        rejected = self.rejected
        pure_write_all([self], head, tail)  # not write_all: that may be the native one
        return self.rejected == rejected

    def release(self) -> None:
        """Drop our view of the ring so its segment can be unmapped."""
        self.q.release()

    def end(self, reason: int) -> None:
        """Mark the stream's end after the last event written (the sentinel)."""
        self.q[_END] = reason

    def drops(self) -> int:
        """What the reader lost so far."""
        q = self.q
        return drops(w=self.w, rejected=self.rejected, r=q[_R], delivered=q[_DELIVERED],
                     slots=self.slots, overwrite=self.overwrite)



class RingReader:
    """The subscriber's end of one ring.

    Given *event* (the Event class), *loads* (the codec's) and *undecodable* (which
    makes the error an event the codec cannot read becomes, from its version, type,
    data and the codec's exception), it also hands on whole events: :meth:`get` and
    :meth:`get_many`.
    """

    __slots__ = ("buf", "corrupt", "delivered", "event", "failed", "loads", "overwrite", "q",
                 "r", "released", "slot_size", "slots", "stride", "types", "undecodable")

    def __init__(self, buf: memoryview, slots: int, slot_size: int, overwrite: bool, *,
                 event: type[Event] | None = None, loads: Callable[[bytes], Any] | None = None,
                 undecodable: Undecodable | None = None) -> None:
        if (event is None) != (loads is None) or (event is None) != (undecodable is None):
            raise TypeError("event, loads and undecodable go together")
        self.event, self.loads, self.undecodable = event, loads, undecodable
        self.types: dict[bytes, str] = {}
        self.failed: BaseException | None = None  # the error get() raised last, for get_many
        self.released = False
        self.buf = buf
        self.q = q = buf.cast("Q")
        self.slots = slots
        self.slot_size = slot_size
        self.stride = slot_stride(slot_size)
        self.overwrite = overwrite
        # The reader owns these: a fresh ring starts at zero whatever its bytes say.
        self.r = self.delivered = 0
        q[_R] = q[_DELIVERED] = 0
        self.corrupt = 0  # slots skipped because their header was impossible

    def release(self) -> None:
        """Drop our view of the ring so its segment can be unmapped."""
        self.released = True
        self.q.release()

    def poll(self, seconds: float) -> bool:
        """Watch ``w`` for up to *seconds* without sleeping; whether an event arrived."""
        q = self.q
        r = self.r
        if q[_W] != r:
            return True
        deadline = _perf_counter() + seconds
        while _perf_counter() < deadline:
            if q[_W] != r:
                return True
        return False

    def written(self) -> int:
        """The writer's count of events written."""
        return int(self.q[_W])

    def ended(self) -> int:
        """The end mark (0 while open). Read it *before* the last read() that finds nothing."""
        return int(self.q[_END] & 0xFFFF_FFFF)

    def read(self, limit: int | None = None) -> tuple[int, float, bytes, bytes] | None:
        """The next event as ``(version, timestamp, type, data)``, or None if none is ready.

        :param limit: read no event whose ring index is *limit* or more.
        """
        buf = self.buf
        q = self.q
        slots = self.slots
        while True:
            w = q[_W]
            if limit is not None and w > limit:
                w = limit
            r = self.r
            if r >= w:
                return None
            if w - r > slots:  # lapped: the oldest unread were overwritten
                r = w - slots
            off = RING_HEADER_SIZE + (r % slots) * self.stride
            want = 2 * r + 2
            seq = q[off >> 3]
            if seq == want:
                version, timestamp, lt, ld = _hdr_unpack(buf, off + 8)
                if lt <= MAX_TYPE_BYTES and ld <= self.slot_size:
                    p = off + SLOT_HEADER_SIZE
                    type_ = bytes(buf[p : p + lt])
                    data = bytes(buf[p + lt : p + lt + ld])
                    if q[off >> 3] == want:
                        # r first: killed between the two, the event counts as lost.
                        self.r = q[_R] = r + 1
                        self.delivered = q[_DELIVERED] = self.delivered + 1
                        return version, timestamp, type_, data
                elif q[off >> 3] == want:
                    self.corrupt += 1  # impossible lengths in a slot nobody is writing
            elif seq < want:
                self.corrupt += 1  # the writer publishes seq before w, so this is garbage
            # Lapped mid-copy, or garbage: step over it, which counts it as dropped.
            self.r = q[_R] = r + 1

    def read_many(self, max: int, limit: int | None = None
                  ) -> list[tuple[int, float, bytes, bytes]]:
        """Up to *max* events that are ready, as a list of :meth:`read`'s tuples."""
        out: list[tuple[int, float, bytes, bytes]] = []
        while len(out) < max and (item := self.read(limit)) is not None:
            out.append(item)
        return out

    def get(self, limit: int | None = None) -> Event | None:
        """The next event decoded, or None if none is ready.

        :raises Exception: what ``undecodable(version, type, data, exc)`` returns, from
            the codec's *exc*, for an event the codec cannot read (counted as dropped).
        """
        if self.event is None:
            raise TypeError("this RingReader was made without event, loads and undecodable")
        item = self.read(limit)
        if item is None:
            return None
        version, timestamp, tb, data = item
        type_ = self.types.get(tb)
        if type_ is None:
            type_ = tb.decode("utf-8", "replace")
            if len(self.types) < _TYPE_CACHE:
                self.types[tb] = type_
        try:
            payload = self.loads(data)  # type: ignore[misc]
        except Exception as e:
            self.discard()
            self.failed = error = self.undecodable(version, type_, data, e)  # type: ignore[misc]
            raise error from e
        # make_event inlined: a call more per event was a tenth of the pure get.
        event = _new(self.event)
        _set(event, "__dict__", {"type": type_, "payload": payload, "version": version,
                                 "timestamp": timestamp, "_data": data})
        return event

    def get_many(self, max: int, limit: int | None = None) -> list[Event | BaseException]:
        """Up to *max* ready events decoded; for one the codec cannot read, the error
        :meth:`get` would raise stands in its place (counted as dropped).

        Any other error loses the batch: its events count as dropped.
        """
        out: list[Event | BaseException] = []
        try:
            while len(out) < max and not self.released:  # a codec may release() us
                try:
                    event = self.get(limit)
                except Exception as e:
                    if e is not self.failed:
                        raise
                    out.append(e)
                    continue
                if event is None:
                    break
                out.append(event)
        except BaseException:
            events = sum(not isinstance(x, BaseException) for x in out)
            self.delivered = self.q[_DELIVERED] = self.delivered - events
            raise
        finally:
            self.failed = None
        return out

    def discard(self) -> None:
        """Count the event last returned by read() as dropped (it would not decode)."""
        self.delivered = self.q[_DELIVERED] = self.delivered - 1

    def unread(self, limit: int | None = None) -> bool:
        """Whether an event may be ready (cheap: one load)."""
        w = self.q[_W]
        return (w if limit is None else min(w, limit)) > self.r

    def drops(self, limit: int | None = None) -> int:
        """What this reader lost so far, counting overwritten events it has not reached yet."""
        q = self.q
        w = q[_W] if limit is None else min(q[_W], limit)
        return drops(w=w, rejected=q[_REJECTED], r=self.r, delivered=self.delivered,
                     slots=self.slots, overwrite=self.overwrite)


# The C core, when it was built and SHMCAST_PURE is not 1: the same classes and
# write_all on the same bytes, with acquire/release ordering (see _native.c).
# The pure ones stay reachable under these names, whichever is in use.
PureRingWriter, PureRingReader, pure_write_all = RingWriter, RingReader, write_all
NATIVE = False
if os.environ.get("SHMCAST_PURE") != "1":
    try:
        from . import _native
    except ImportError:
        pass
    else:
        RingWriter = _native.RingWriter  # type: ignore[misc,assignment]
        RingReader = _native.RingReader  # type: ignore[misc,assignment]
        write_all = _native.write_all  # type: ignore[assignment]
        NATIVE = True

__all__ = ["INLINE_MAX", "NATIVE", "Overflow", "PureRingReader", "PureRingWriter", "RingReader",
           "RingWriter", "Undecodable", "drops", "frame", "pure_write_all", "write_all"]
