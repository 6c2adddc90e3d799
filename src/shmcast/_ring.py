"""One subscriber's ring: a single-writer, single-reader seqlock ring that never blocks the writer.

The writer (the publisher) owns ``w`` and each slot's ``seq``; the reader (the
subscriber) owns ``r`` and ``skipped``. Neither ever waits for the other:

* The writer marks a slot odd (``2i+1``) before it overwrites it and even
  (``2i+2``) after, then publishes ``w = i+1``.
* The reader reads ``seq``, copies the slot, and reads ``seq`` again. If it
  changed, the writer lapped it mid-copy: the copy is discarded and the event
  counted as dropped, exactly as if it had been overwritten a moment sooner.
  (Agrona's BroadcastReceiver validates a copy the same way: loss is not an
  error, a torn copy is never delivered.)

Drops are a function of the shared counters, so the same number is seen from
both sides without any shared read-modify-write::

    dropped = rejected + skipped + max(0, w - slots - r)   # last term: overwrite only

where ``w - slots - r`` counts the unread events already overwritten that the
reader has not yet stepped over. The functions here touch nothing but the
buffer they are given.
"""

from __future__ import annotations

from ._layout import (
    END_OFF,
    R_OFF,
    REJECTED_OFF,
    RING_HEADER_SIZE,
    SLOT_HEADER,
    SLOT_HEADER_SIZE,
    TWO_U64,
    U32,
    U64,
    W_OFF,
    slot_stride,
)
from ._names import MAX_TYPE_BYTES

_u64_pack = U64.pack_into
_u64_unpack = U64.unpack_from
_hdr_pack = SLOT_HEADER.pack_into
_hdr_unpack = SLOT_HEADER.unpack_from


def drops(*, w: int, rejected: int, r: int, skipped: int, slots: int, overwrite: bool) -> int:
    """Events a ring's reader lost so far, from its counters (clamped against garbage)."""
    r = min(max(r, 0), w)
    lost = rejected + min(max(skipped, 0), w)
    if overwrite:
        lost += max(0, w - slots - r)
    return lost


class RingWriter:
    """The publisher's end of one ring."""

    __slots__ = ("buf", "overwrite", "rejected", "slots", "stride", "w")

    def __init__(self, buf: memoryview, slots: int, slot_size: int, overwrite: bool) -> None:
        self.buf = buf
        self.slots = slots
        self.stride = slot_stride(slot_size)
        self.overwrite = overwrite
        self.w: int = _u64_unpack(buf, W_OFF)[0]
        self.rejected: int = _u64_unpack(buf, REJECTED_OFF)[0]

    def write(self, version: int, timestamp: float, type_: bytes, data: bytes) -> bool:
        """Put one event in the ring; False if it was rejected (``drop_new`` and full)."""
        buf = self.buf
        i = self.w
        if not self.overwrite and i - _u64_unpack(buf, R_OFF)[0] >= self.slots:
            self.rejected += 1
            _u64_pack(buf, REJECTED_OFF, self.rejected)
            return False
        off = RING_HEADER_SIZE + (i % self.slots) * self.stride
        _u64_pack(buf, off, 2 * i + 1)
        lt = len(type_)
        ld = len(data)
        _hdr_pack(buf, off + 8, version, timestamp, lt, ld)
        p = off + SLOT_HEADER_SIZE
        buf[p : p + lt] = type_
        p += lt
        buf[p : p + ld] = data
        _u64_pack(buf, off, 2 * i + 2)
        self.w = i = i + 1
        _u64_pack(buf, W_OFF, i)
        return True

    def end(self, reason: int) -> None:
        """Mark the stream's end after the last event written (the sentinel)."""
        U32.pack_into(self.buf, END_OFF, reason)

    def drops(self) -> int:
        """What the reader lost so far."""
        r, skipped = TWO_U64.unpack_from(self.buf, R_OFF)
        return drops(w=self.w, rejected=self.rejected, r=r, skipped=skipped,
                     slots=self.slots, overwrite=self.overwrite)

    def lag(self) -> int:
        """Events written but not yet consumed or dropped."""
        r: int = _u64_unpack(self.buf, R_OFF)[0]
        return max(0, min(self.w - r, self.slots))


class RingReader:
    """The subscriber's end of one ring."""

    __slots__ = ("buf", "corrupt", "overwrite", "r", "skipped", "slot_size", "slots", "stride")

    def __init__(self, buf: memoryview, slots: int, slot_size: int, overwrite: bool) -> None:
        self.buf = buf
        self.slots = slots
        self.slot_size = slot_size
        self.stride = slot_stride(slot_size)
        self.overwrite = overwrite
        self.r, self.skipped = TWO_U64.unpack_from(buf, R_OFF)
        self.corrupt = 0  # slots skipped because their header was impossible

    def written(self) -> int:
        """The writer's count of events written."""
        return int(_u64_unpack(self.buf, W_OFF)[0])

    def ended(self) -> int:
        """The end mark (0 while open). Read it *before* the last read() that finds nothing."""
        return int(U32.unpack_from(self.buf, END_OFF)[0])

    def read(self, limit: int | None = None) -> tuple[int, float, bytes, bytes] | None:
        """The next event as ``(version, timestamp, type, data)``, or None if none is ready.

        :param limit: read no event whose ring index is *limit* or more.
        """
        buf = self.buf
        slots = self.slots
        while True:
            w = _u64_unpack(buf, W_OFF)[0]
            if limit is not None and w > limit:
                w = limit
            r = self.r
            if r >= w:
                return None
            if w - r > slots:  # lapped: the oldest unread were overwritten
                self.skipped += w - slots - r
                r = w - slots
            off = RING_HEADER_SIZE + (r % slots) * self.stride
            seq = _u64_unpack(buf, off)[0]
            if seq == 2 * r + 2:
                version, timestamp, lt, ld = _hdr_unpack(buf, off + 8)
                p = off + SLOT_HEADER_SIZE
                # Out-of-range lengths only shorten these slices; they are
                # checked once the copy is known to be untorn.
                type_ = bytes(buf[p : p + lt])
                data = bytes(buf[p + lt : p + lt + ld])
                if _u64_unpack(buf, off)[0] == seq:
                    if lt <= MAX_TYPE_BYTES and ld <= self.slot_size:
                        self.r = r + 1
                        TWO_U64.pack_into(buf, R_OFF, r + 1, self.skipped)
                        return version, timestamp, type_, data
                    self.corrupt += 1
            elif seq < 2 * r + 2:
                self.corrupt += 1  # the writer publishes seq before w, so this is garbage
            # Lapped mid-copy, or garbage: count it as dropped and move on.
            self.skipped += 1
            self.r = r + 1
            TWO_U64.pack_into(buf, R_OFF, r + 1, self.skipped)

    def drops(self, limit: int | None = None) -> int:
        """What this reader lost so far, counting overwritten events it has not reached yet."""
        w = self.written()
        if limit is not None:
            w = min(w, limit)
        rejected = _u64_unpack(self.buf, REJECTED_OFF)[0]
        return drops(w=w, rejected=int(rejected), r=self.r, skipped=self.skipped,
                     slots=self.slots, overwrite=self.overwrite)


__all__ = ["RingReader", "RingWriter", "drops"]
