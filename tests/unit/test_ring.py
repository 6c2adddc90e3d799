"""The ring on a plain bytearray: ordering, lapping, drop counting, torn and corrupt slots."""

from __future__ import annotations

import pytest

from shmcast._layout import (
    Q_DELIVERED,
    Q_R,
    R_OFF,
    RING_HEADER_SIZE,
    U64,
    W_OFF,
    pack_ring_header,
    ring_size,
    slot_stride,
)
from shmcast._ring import INLINE_MAX, RingReader, RingWriter, drops, frame

SLOTS = 4
SLOT_SIZE = 32


def make(overwrite: bool = True) -> tuple[RingWriter, RingReader, memoryview]:
    buf = memoryview(bytearray(ring_size(SLOTS, SLOT_SIZE)))
    pack_ring_header(buf, slots=SLOTS, slot_size=SLOT_SIZE, nonce=1, ring_id=2)
    return (RingWriter(buf, SLOTS, SLOT_SIZE, overwrite),
            RingReader(buf, SLOTS, SLOT_SIZE, overwrite), buf)


def publish(writer: RingWriter, versions: range) -> None:
    for v in versions:
        writer.write(*frame(v, float(v), b"t", str(v).encode()))


def drain(reader: RingReader) -> list[int]:
    out = []
    while (item := reader.read()) is not None:
        out.append(item[0])
    return out


def test_in_order_without_loss() -> None:
    writer, reader, _ = make()
    publish(writer, range(1, 4))
    assert reader.read() == (1, 1.0, b"t", b"1")
    assert drain(reader) == [2, 3]
    assert reader.read() is None
    assert reader.drops() == writer.drops() == 0


def test_overwrite_counts_drops_before_the_reader_reads() -> None:
    writer, reader, _ = make()
    publish(writer, range(1, 11))
    assert writer.drops() == reader.drops() == 6  # 10 written, 4 slots
    assert drain(reader) == [7, 8, 9, 10]
    assert reader.drops() == writer.drops() == 6


def test_drop_new_rejects_when_full() -> None:
    writer, reader, _ = make(overwrite=False)
    publish(writer, range(1, 11))
    assert writer.drops() == reader.drops() == 6
    assert drain(reader) == [1, 2, 3, 4]
    publish(writer, range(11, 13))
    assert drain(reader) == [11, 12]
    assert reader.drops() == 6


def test_slot_being_rewritten_is_dropped_not_delivered() -> None:
    writer, reader, buf = make()
    publish(writer, range(1, 3))
    # Simulate the writer starting to overwrite slot 0 mid-copy: seq goes odd.
    real = reader.read

    def torn_read() -> object:
        U64.pack_into(buf, RING_HEADER_SIZE, 2 * 4 + 1)
        return real()

    item = torn_read()
    # Event 0's slot is being rewritten: it counts as dropped, event 1 comes next.
    assert item is not None
    assert item[0] == 2
    assert reader.r - reader.delivered == 1
    assert reader.drops() == 1
    assert drain(reader) == []


def test_corrupt_lengths_are_skipped_and_counted() -> None:
    writer, reader, buf = make()
    publish(writer, range(1, 3))
    # data length far beyond the slot
    U64.pack_into(buf, RING_HEADER_SIZE + 8 + 16 + 4 - 4, 0xFFFF_FFFF_0000_0000)
    assert drain(reader) == [2]
    assert reader.corrupt == 1
    assert reader.drops() == 1


def test_garbage_write_counter_never_raises() -> None:
    _, reader, buf = make()
    U64.pack_into(buf, W_OFF, 2**63)  # claims 2**63 events in a ring where none was written
    # No slot carries the seq of an event that far: nothing is delivered, the
    # reader steps over the lost ones (no exception, no endless scan) ...
    assert reader.read() is None
    assert reader.read() is None
    # ... and counts every one of them as dropped: received + dropped == written.
    assert reader.drops() == reader.written() == 2**63


def test_limit_stops_at_unsubscribe_point() -> None:
    writer, reader, _ = make()
    publish(writer, range(1, 4))
    assert reader.read(limit=2)[0] == 1  # type: ignore[index]
    assert reader.read(limit=2)[0] == 2  # type: ignore[index]
    assert reader.read(limit=2) is None


@pytest.mark.parametrize(
    ("w", "r", "delivered", "rejected", "overwrite", "want"),
    [
        (10, 0, 0, 0, True, 6),
        (10, 8, 5, 0, True, 3),
        (10, 20, 10, 0, True, 0),  # garbage r is clamped
        (10, 0, 0, 5, False, 5),
        (3, 0, -1, 0, True, 0),
        (3, 2, 9, 0, True, 0),  # garbage delivered is clamped
    ],
)
def test_drop_formula(w: int, r: int, delivered: int, rejected: int, overwrite: bool,
                      want: int) -> None:
    assert drops(w=w, rejected=rejected, r=r, delivered=delivered, slots=4,
                 overwrite=overwrite) == want


def test_a_lap_moves_r_alone() -> None:
    # A reader killed between two stores must leave a drop sum that is right:
    # stepping over lapped events is one store of r, nothing else.
    writer, reader, buf = make()
    publish(writer, range(1, 11))  # 10 into 4 slots: 6 overwritten
    q = memoryview(buf).cast("Q")
    before = q[Q_DELIVERED]
    item = reader.read()
    assert item is not None
    assert item[0] == 7
    assert q[Q_R] == 7
    assert q[Q_DELIVERED] == before + 1
    assert writer.drops() == reader.drops() == 6


def test_reader_persists_cursor_for_the_writer() -> None:
    writer, reader, buf = make()
    publish(writer, range(1, 3))
    drain(reader)
    assert U64.unpack_from(buf, R_OFF)[0] == 2
    assert slot_stride(SLOT_SIZE) % 8 == 0


def test_large_payloads_are_copied_as_head_and_tail() -> None:
    buf = memoryview(bytearray(ring_size(2, 4096)))
    pack_ring_header(buf, slots=2, slot_size=4096, nonce=1, ring_id=2)
    writer = RingWriter(buf, 2, 4096, True)
    reader = RingReader(buf, 2, 4096, True)
    big = bytes(range(256)) * 16
    head, tail = frame(1, 0.5, b"big", big)
    assert tail == big
    assert len(head) < INLINE_MAX
    writer.write(head, tail)
    assert reader.read() == (1, 0.5, b"big", big)
