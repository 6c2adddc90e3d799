"""Control header packing and the checks that reject foreign or corrupt segments."""

from __future__ import annotations

import pytest

from shmcast import BusNotFoundError, ShmcastError
from shmcast._layout import (
    CONTROL_HEADER,
    CONTROL_HEADER_SIZE,
    CONTROL_MAGIC,
    ENTRY,
    ENTRY_SIZE,
    RING_HEADER,
    RING_HEADER_SIZE,
    SLOT_BODY_OFF,
    SLOT_HEADER,
    SLOT_HEADER_SIZE,
    U32,
    check_ring_header,
    control_size,
    pack_control_header,
    pack_ring_header,
    parse_control_header,
    ring_size,
)
from shmcast._ring import Overflow


def header(**over: object) -> bytearray:
    buf = bytearray(control_size(4))
    args: dict[str, object] = {"nonce": 7, "pid": 123, "slots": 8, "slot_size": 100,
                               "max_subscribers": 4, "overflow": 1, "mode": 0o640,
                               "created": 1.5, "codec": "json"}
    args.update(over)
    pack_control_header(buf, **args)  # type: ignore[arg-type]
    return buf


def test_struct_sizes_fit_the_documented_table() -> None:
    assert CONTROL_HEADER.size <= CONTROL_HEADER_SIZE
    assert ENTRY.size <= ENTRY_SIZE
    assert RING_HEADER.size <= 64
    assert SLOT_BODY_OFF + SLOT_HEADER.size == SLOT_HEADER_SIZE
    assert RING_HEADER_SIZE % 64 == 0


def test_round_trip() -> None:
    g = parse_control_header(header(), control_size(4))
    assert (g.nonce, g.pid, g.slots, g.slot_size, g.max_subscribers, g.overflow, g.mode,
            g.codec) == (7, 123, 8, 100, 4, 1, 0o640, "json")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.__setitem__(slice(0, 8), b"NOTABUS!"), "not a shmcast bus"),
        (lambda b: U32.pack_into(b, 8, 99), "layout version 99"),
        (lambda b: U32.pack_into(b, 32, 0), "slots 0"),
        (lambda b: U32.pack_into(b, 40, 10_000), "max_subscribers"),
        (lambda b: b.__setitem__(slice(64, 96), b"\xff" * 32), "codec"),
    ],
)
def test_rejects_corrupt_headers(mutate: object, message: str) -> None:
    buf = header()
    mutate(buf)  # type: ignore[operator]
    with pytest.raises(ShmcastError, match=message):
        parse_control_header(buf, len(buf))


def test_rejects_short_segment() -> None:
    with pytest.raises(ShmcastError, match="bytes"):
        parse_control_header(b"x" * 16, 16)


@pytest.mark.parametrize("size", [0, 16, CONTROL_HEADER_SIZE, control_size(4)])
def test_empty_or_zero_segment_is_a_bus_being_created(size: int) -> None:
    # A creator fills the header and stores the magic last: until then the
    # segment is empty or zero, and a subscriber must hear "not found".
    with pytest.raises(BusNotFoundError, match="being created"):
        parse_control_header(bytearray(size), size)


def test_overflow_policy_has_one_home() -> None:
    assert [Overflow.from_code(p.code) for p in Overflow] == list(Overflow)
    assert Overflow.from_code(len(Overflow)) is None
    assert Overflow.parse("drop_new") is Overflow.DROP_NEW
    with pytest.raises(ValueError, match="overflow must be one of"):
        Overflow.parse("newest")


def test_magic_written_last() -> None:
    buf = header()
    assert bytes(buf[:8]) == CONTROL_MAGIC


def test_ring_header_check() -> None:
    buf = bytearray(ring_size(4, 32))
    pack_ring_header(buf, slots=4, slot_size=32, nonce=1, ring_id=9)
    check_ring_header(buf, len(buf), slots=4, slot_size=32, nonce=1, ring_id=9)
    with pytest.raises(ShmcastError):
        check_ring_header(buf, len(buf), slots=4, slot_size=32, nonce=2, ring_id=9)
    with pytest.raises(ShmcastError):
        check_ring_header(buf, len(buf) - 1, slots=4, slot_size=32, nonce=1, ring_id=9)
