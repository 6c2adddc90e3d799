"""Byte layout of a bus's shared memory: struct formats, offsets and bounds-checked parsing.

No I/O happens here, so everything can be tested on a ``bytearray``. All
integers are little-endian and naturally aligned. A field another process may
read while it changes is only ever stored through a ``memoryview.cast("Q")``
or ``cast("I")`` of the segment, at the indexes named below: one aligned store
each, so a concurrent reader sees the old value or the new one. Never through
``struct.pack_into``, which zero-fills the whole struct before it writes
(readers then see 0 for a field only ever set to 1 or 2). ``struct`` is used
only to lay out memory nobody else can see yet.

Control segment ``/dev/shm/shmcast.NAME``::

    off  size  field                    written by
    0    8     magic b"SHMCAST\\0"      publisher, last step of creation
    8    4     layout version (3)       publisher
    12   4     header size (128)        publisher
    16   8     nonce                    publisher (random; names the rings)
    24   4     publisher pid            publisher
    28   4     state 1 open, 2 closed   publisher
    32   4     default ring slots       publisher
    36   4     slot size (payload max)  publisher
    40   4     max subscribers          publisher
    44   4     overflow policy (_ring.Overflow: 0 overwrite, 1 drop_new)
    48   4     mode (permission bits)   publisher
    52   4     registry entry size (64) publisher
    56   8     created, time.time()     publisher
    64   32    codec name, NUL-padded   publisher
    96   8     version: last assigned   publisher
    104  8     drops of departed subscribers   publisher
    112  8     registry epoch           subscribers, under the registry lock
    120  4     max publishers (P)       publisher
    124  4     reserved
    128  64*M  registry, one entry per subscriber place
    ...  64*P  publisher places, from offset 128 + 64*M

Registry entry (64 bytes). The first half is written only by the subscriber
that holds the entry's place lock, the second only by the publisher::

    0    4     state 0 free, 1 joining, 2 active, 3 left     subscriber
    4    4     subscriber pid                                subscriber
    8    8     ring id (random; names the ring)              subscriber
    16   4     ring slots                                    subscriber
    20   4     reserved
    24   8     joined, time.time()                           subscriber
    32   4     served: 0 not yet, 1 served, 2 retrying, 3 refused   publisher
    36   4     errno of the last failure to serve it         publisher
    40   8     missed: events published while active, unserved      publisher
    48   16    reserved

Publisher place (64 bytes), written only by the ``Publisher`` holding the
place's lock. The inbox ring belongs to the place, not to its holder (the bus
creates one per place), so a new holder goes on where the last one stopped;
the baseline says where that was, and each holder's own counts are the
inbox's minus it::

    0    4     state 0 free, 1 joining, 2 active, 3 left     publisher
    4    4     publisher pid                                 publisher
    8    8     inbox w when it joined                        publisher
    16   8     inbox rejected when it joined                 publisher
    24   8     joined, time.time()                           publisher
    32   32    reserved

Ring segment ``/dev/shm/shmcast.NAME.<nonce>.<ring id>`` (one per subscriber,
created by it), and inbox ``/dev/shm/shmcast.NAME.<nonce>.inbox<i>`` (one per
publisher place, created by the bus, ring id ``i``), where the roles swap: the
``Publisher`` writes ``w`` and ``rejected``, the bus owner reads, and ``end``
is the owner's mark that it drains no more. The writer's and the reader's
fields sit on separate cache lines::

    0    8     magic b"SHMCRING"
    8    4     layout version (3)
    12   4     slots
    16   4     slot size (payload max)
    20   4     slot stride
    24   8     bus nonce
    32   8     ring id
    40   24    reserved
    64   8     w: events written so far        publisher
    72   8     rejected (drop_new drops)       publisher
    80   8     end: 0 open, 1 bus closed       publisher (inbox: the owner)
    88   40    reserved
    128  8     r: events consumed so far       subscriber
    136  8     delivered (r minus those lost)  subscriber
    144  48    reserved
    192  ...   slots, each ``stride`` bytes

Slot (event ``i`` of the ring lives in slot ``i % slots``)::

    0    8     seq: 2i+1 while event i is written, 2i+2 once complete
    8    8     version
    16   8     timestamp, time.time() at publish
    24   2     type length (<= 255)
    26   2     reserved
    28   4     data length (<= slot size)
    32   ...   type (UTF-8), then data
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ._errors import BusNotFoundError, ShmcastError
from ._names import (
    MAX_CODEC_NAME,
    MAX_PUBLISHERS,
    MAX_RING_BYTES,
    MAX_SLOT_SIZE,
    MAX_SLOTS,
    MAX_SUBSCRIBERS,
    MAX_TYPE_BYTES,
)

# 3: publisher places and inboxes (max publishers at 120). A version-2 process
# would reclaim a dead version-3 bus and leave its inboxes and drain semaphore.
LAYOUT_VERSION = 3

# Control segment.
CONTROL_MAGIC = b"SHMCAST\x00"
CONTROL_HEADER = struct.Struct("<8sIIQIIIIIIIId32s")
CONTROL_HEADER_SIZE = 128
STATE_OFF = 28
VERSION_OFF = 96
RETIRED_OFF = 104
EPOCH_OFF = 112
STATE_OPEN = 1
STATE_CLOSED = 2

ENTRY = struct.Struct("<IIQI4xd")
ENTRY_SIZE = 64
ENTRY_FREE, ENTRY_JOINING, ENTRY_ACTIVE, ENTRY_LEFT = 0, 1, 2, 3
# The publisher's half of an entry.
SERVED_OFF = 32  # u32
ERRNO_OFF = 36  # u32
MISSED_OFF = 40  # u64
SERVE_PENDING, SERVE_OK, SERVE_RETRYING, SERVE_REFUSED = 0, 1, 2, 3

MAX_PUBLISHERS_OFF = 120  # u32
# A publisher place: state and pid as in ENTRY, then the inbox baseline and when it joined.
PUB_ENTRY = struct.Struct("<IIQQd")
PUB_W0_OFF = 8  # u64
PUB_REJECTED0_OFF = 16  # u64
PUB_JOINED_OFF = 24  # f64


# Ring segment.
RING_MAGIC = b"SHMCRING"
RING_HEADER = struct.Struct("<8sIIIIQQ")
RING_HEADER_SIZE = 192
W_OFF = 64
REJECTED_OFF = 72
END_OFF = 80
R_OFF = 128
DELIVERED_OFF = 136
END_OPEN = 0
END_BUS_CLOSED = 1

SLOT_HEADER = struct.Struct("<QdHxxI")  # version, timestamp, type length, data length
SLOT_HEADER_SIZE = 32
SLOT_BODY_OFF = 8  # SLOT_HEADER is packed after the 8-byte seq

U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
TWO_U64 = struct.Struct("<QQ")

# Indexes of the shared scalars in the segments' ``cast("Q")`` and ``cast("I")``
# views: every store to a field another process reads goes through these.
Q_MAGIC = 0
I_STATE = STATE_OFF // 4
Q_VERSION = VERSION_OFF // 8
Q_RETIRED = RETIRED_OFF // 8
Q_EPOCH = EPOCH_OFF // 8
Q_W, Q_REJECTED, Q_END, Q_R, Q_DELIVERED = (
    o // 8 for o in (W_OFF, REJECTED_OFF, END_OFF, R_OFF, DELIVERED_OFF))
CONTROL_MAGIC_Q = int.from_bytes(CONTROL_MAGIC, "little")
RING_MAGIC_Q = int.from_bytes(RING_MAGIC, "little")


def entry_q(index: int, field_off: int) -> int:
    """Index in the control segment's ``cast("Q")`` view of a u64 field of entry *index*."""
    return (entry_offset(index) + field_off) // 8


def entry_i(index: int, field_off: int) -> int:
    """Index in the control segment's ``cast("I")`` view of a u32 field of entry *index*."""
    return (entry_offset(index) + field_off) // 4


class Geometry(NamedTuple):
    """What the control header says about the bus."""

    nonce: int
    pid: int
    state: int
    slots: int
    slot_size: int
    max_subscribers: int
    overflow: int  # an _ring.Overflow code, checked by whoever applies it
    mode: int
    created: float
    codec: str
    max_publishers: int = 0


class Entry(NamedTuple):
    """One registry entry."""

    state: int
    pid: int
    ring_id: int
    slots: int
    joined: float


class PubEntry(NamedTuple):
    """One publisher place."""

    state: int
    pid: int
    w0: int  # the inbox's w when this holder joined
    rejected0: int  # the inbox's rejected when this holder joined
    joined: float


def control_size(max_subscribers: int, max_publishers: int = 0) -> int:
    """Bytes of a control segment with *max_subscribers* and *max_publishers* places."""
    return CONTROL_HEADER_SIZE + ENTRY_SIZE * (max_subscribers + max_publishers)


def slot_stride(slot_size: int) -> int:
    """Bytes one slot takes: header, the longest type, the payload, padded to 8."""
    return (SLOT_HEADER_SIZE + MAX_TYPE_BYTES + slot_size + 7) & ~7


def ring_size(slots: int, slot_size: int) -> int:
    """Bytes of a ring segment."""
    return RING_HEADER_SIZE + slots * slot_stride(slot_size)


def entry_offset(index: int) -> int:
    """Offset of registry entry *index* in the control segment."""
    return CONTROL_HEADER_SIZE + ENTRY_SIZE * index


def pub_entry_index(max_subscribers: int, place: int) -> int:
    """Publisher place *place* as an entry index (the places follow the registry)."""
    return max_subscribers + place


def pack_control_header(
    buf: bytearray | memoryview,
    *,
    nonce: int,
    pid: int,
    slots: int,
    slot_size: int,
    max_subscribers: int,
    overflow: int,
    mode: int,
    created: float,
    codec: str,
    max_publishers: int = 0,
) -> None:
    """Write a complete control header, magic last, so a half-written one never parses."""
    CONTROL_HEADER.pack_into(
        buf, 0, b"\x00" * 8, LAYOUT_VERSION, CONTROL_HEADER_SIZE, nonce, pid, STATE_OPEN,
        slots, slot_size, max_subscribers, overflow, mode,
        ENTRY_SIZE, created, codec.encode("ascii"),
    )
    U32.pack_into(buf, MAX_PUBLISHERS_OFF, max_publishers)
    memoryview(buf).cast("B").cast("Q")[Q_MAGIC] = CONTROL_MAGIC_Q


def parse_control_header(buf: bytes | bytearray | memoryview, size: int) -> Geometry:
    """Read and check a control header against the segment's real *size*.

    :raises BusNotFoundError: if the segment is empty or its magic is still zero:
        its creator has not finished (or died before it did).
    :raises ShmcastError: if the segment is not a shmcast bus of this layout
        version, or its geometry is impossible.
    """
    if size == 0 or (size >= 8 and bytes(buf[0:8]) == b"\x00" * 8):
        raise BusNotFoundError("the bus is still being created")
    if size < CONTROL_HEADER_SIZE:
        raise ShmcastError(
            f"not a shmcast bus: segment is {size} bytes, a control header needs "
            f"{CONTROL_HEADER_SIZE}"
        )
    (magic, layout, header_size, nonce, pid, state, slots, slot_size, max_subs, overflow,
     mode, entry_size, created, codec) = CONTROL_HEADER.unpack_from(buf, 0)
    if magic != CONTROL_MAGIC:
        raise ShmcastError(f"not a shmcast bus: magic is {magic!r}, expected {CONTROL_MAGIC!r}")
    if layout != LAYOUT_VERSION:
        raise ShmcastError(
            f"bus has layout version {layout}; this shmcast understands version {LAYOUT_VERSION}"
        )
    problems = []
    if header_size != CONTROL_HEADER_SIZE or entry_size != ENTRY_SIZE:
        problems.append(f"header/entry size {header_size}/{entry_size}")
    if not 1 <= slots <= MAX_SLOTS:
        problems.append(f"slots {slots}")
    if not 1 <= slot_size <= MAX_SLOT_SIZE:
        problems.append(f"slot_size {slot_size}")
    elif 1 <= slots <= MAX_SLOTS and ring_size(slots, slot_size) > MAX_RING_BYTES:
        problems.append(f"rings of {slots} slots of {slot_size} bytes")
    max_pubs = U32.unpack_from(buf, MAX_PUBLISHERS_OFF)[0]
    if not 1 <= max_subs <= MAX_SUBSCRIBERS or control_size(max_subs) > size:
        problems.append(f"max_subscribers {max_subs} in a {size}-byte segment")
    elif max_pubs > MAX_PUBLISHERS or control_size(max_subs, max_pubs) > size:
        problems.append(f"max_publishers {max_pubs} in a {size}-byte segment")
    if state not in (STATE_OPEN, STATE_CLOSED):
        problems.append(f"state {state}")
    try:
        codec_name = codec.rstrip(b"\x00").decode("ascii")
    except UnicodeDecodeError:
        codec_name = ""
    if not codec_name or len(codec_name) > MAX_CODEC_NAME:
        problems.append(f"codec name {codec!r}")
    if problems:
        raise ShmcastError("corrupt shmcast bus header: " + ", ".join(problems))
    return Geometry(nonce, pid, state, slots, slot_size, max_subs, overflow, mode & 0o777,
                    created, codec_name, max_pubs)


def read_entry(buf: bytes | bytearray | memoryview, index: int) -> Entry:
    """Read registry entry *index* (the caller checked *index* against the geometry)."""
    return Entry(*ENTRY.unpack_from(buf, entry_offset(index)))


def read_pub_entry(buf: bytes | bytearray | memoryview, max_subscribers: int,
                   place: int) -> PubEntry:
    """Read publisher place *place* (checked against the geometry by the caller)."""
    return PubEntry(*PUB_ENTRY.unpack_from(buf, entry_offset(max_subscribers + place)))


def pack_ring_header(
    buf: bytearray | memoryview, *, slots: int, slot_size: int, nonce: int, ring_id: int
) -> None:
    """Write a ring header, magic last."""
    RING_HEADER.pack_into(buf, 0, b"\x00" * 8, LAYOUT_VERSION, slots, slot_size,
                          slot_stride(slot_size), nonce, ring_id)
    memoryview(buf).cast("B").cast("Q")[Q_MAGIC] = RING_MAGIC_Q


def check_ring_header(
    buf: bytes | bytearray | memoryview, size: int, *, slots: int, slot_size: int, nonce: int,
    ring_id: int,
) -> None:
    """Check that a ring segment is the one its registry entry announced.

    :raises ShmcastError: if it is not.
    """
    if size < RING_HEADER_SIZE:
        raise ShmcastError(f"not a shmcast ring: segment is {size} bytes")
    got = RING_HEADER.unpack_from(buf, 0)
    want = (RING_MAGIC, LAYOUT_VERSION, slots, slot_size, slot_stride(slot_size), nonce, ring_id)
    if got != want or size < ring_size(slots, slot_size):
        raise ShmcastError(f"ring segment does not match its registry entry: {got[:7]!r}")


__all__ = [
    "SERVE_REFUSED",
    "SERVE_RETRYING",
    "SERVE_OK",
    "SERVE_PENDING",
    "ENTRY_LEFT",
    "ENTRY_ACTIVE",
    "ENTRY_JOINING",
    "ENTRY_FREE",
    "Q_DELIVERED",
    "Q_R",
    "Q_END",
    "Q_REJECTED",
    "Q_W",
    "CONTROL_HEADER",
    "CONTROL_HEADER_SIZE",
    "CONTROL_MAGIC",
    "CONTROL_MAGIC_Q",
    "DELIVERED_OFF",
    "END_BUS_CLOSED",
    "END_OFF",
    "END_OPEN",
    "ENTRY",
    "ENTRY_SIZE",
    "EPOCH_OFF",
    "ERRNO_OFF",
    "Entry",
    "Geometry",
    "I_STATE",
    "LAYOUT_VERSION",
    "MAX_PUBLISHERS_OFF",
    "PUB_ENTRY",
    "PUB_JOINED_OFF",
    "PUB_REJECTED0_OFF",
    "PUB_W0_OFF",
    "PubEntry",
    "MISSED_OFF",
    "Q_EPOCH",
    "Q_MAGIC",
    "Q_RETIRED",
    "Q_VERSION",
    "REJECTED_OFF",
    "RETIRED_OFF",
    "RING_HEADER",
    "RING_HEADER_SIZE",
    "RING_MAGIC",
    "RING_MAGIC_Q",
    "R_OFF",
    "SERVED_OFF",
    "SLOT_BODY_OFF",
    "SLOT_HEADER",
    "SLOT_HEADER_SIZE",
    "STATE_CLOSED",
    "STATE_OFF",
    "STATE_OPEN",
    "TWO_U64",
    "U32",
    "U64",
    "VERSION_OFF",
    "W_OFF",
    "check_ring_header",
    "control_size",
    "entry_i",
    "entry_offset",
    "entry_q",
    "pack_control_header",
    "pack_ring_header",
    "parse_control_header",
    "pub_entry_index",
    "read_entry",
    "read_pub_entry",
    "ring_size",
    "slot_stride",
]
