"""Hostile and corrupted bytes: a subscriber's own ring, the control segment, the registry.

A peer with write access to the bus's segments (a buggy or hostile subscriber
of the same user) must not be able to make the publisher or the other
subscribers crash, raise anything but ``ShmcastError``, stall, or miscount.

* Control segment: hypothesis rewrites its header and registry (random bytes,
  bit flips, absurd fields, a layout version from the future) and truncates or
  grows it, then a subscriber attaches in a forked child confined with
  ``RLIMIT_AS`` and ``RLIMIT_FSIZE`` (see ``_stress_helpers.confine``): it either
  attaches and behaves, or raises ``ShmcastError``; a segfault, SIGBUS, hang,
  stray exception or huge allocation fails the example through the child's
  exit code, and nothing of the child may be left in /dev/shm.
* Ring: hypothesis corrupts a ring built by the real writer (bytes, bit flips,
  counters, seqs, lengths) and the real reader reads it in a confined child:
  it terminates within ``slots + 1`` reads, returns only in-bounds events and a
  non-negative drop count. A live subscriber's ring is corrupted the same way
  under a live publisher.
* Registry: hypothesis writes garbage into a hostile subscriber's own entry
  and into free entries while a publisher (in a confined child) publishes to
  a good subscriber, which must receive every event, in order.
* Hostile peers (deterministic): a subscriber process keeps writing garbage
  into its own ring header (``r``, ``delivered``, the whole header) or its own
  registry entry (state, ring id, slots, the epoch) while the publisher
  publishes: every publish stays bounded, the good subscriber loses nothing,
  ``bus.dropped`` stays within ``[0, 2 x events]`` (the publisher clamps a
  ring's ``r`` to ``[0, w]`` and ``delivered`` to ``[0, r]``, and refuses a
  second ring id).

Known limitation, not tested on purpose: *shrinking* a segment that a process
has already mapped kills that process with SIGBUS at its next access to the
lost pages. POSIX shared memory on tmpfs cannot be sealed against shrinking
(``F_SEAL_SHRINK`` exists only for ``memfd``, which has no name to attach by),
so a peer of the same user can kill the publisher that way, as it can with
``kill -9``. The tests only truncate a segment before its victim maps it (the
control segment before a subscriber attaches, a ring before the publisher
adopts it), which shmcast must and does survive.

The short runs are part of the default suite; ``-m stress`` runs them long
(``SHMCAST_FUZZ_EXAMPLES_LONG`` examples each, default 1500).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import time
import tracemalloc
from collections.abc import Callable

import pytest
from _stress_helpers import (
    DEV_SHM,
    Children,
    bus_entries,
    remove_bus_entries,
    run_confined,
    stop_self,
    wait_stopped,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmcast import (
    Bus,
    BusNotFoundError,
    DecodeError,
    ShmcastError,
    StreamClosed,
    _ipc,
    subscribe,
)
from shmcast._layout import (
    DELIVERED_OFF,
    END_OFF,
    ENTRY,
    ENTRY_ACTIVE,
    EPOCH_OFF,
    LAYOUT_VERSION,
    R_OFF,
    REJECTED_OFF,
    RING_HEADER_SIZE,
    SLOT_HEADER_SIZE,
    U32,
    U64,
    W_OFF,
    control_size,
    entry_offset,
    pack_control_header,
    pack_ring_header,
    parse_control_header,
    read_entry,
    ring_size,
    slot_stride,
)
from shmcast._names import MAX_SLOT_SIZE, MAX_SLOTS, MAX_SUBSCRIBERS
from shmcast._ring import Overflow, RingReader, RingWriter, frame

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings(r"ignore:This process \(pid=\d+\) is multi-threaded"),
]

FUZZ_EXAMPLES = int(os.environ.get("SHMCAST_FUZZ_EXAMPLES", "25"))
FUZZ_EXAMPLES_LONG = int(os.environ.get("SHMCAST_FUZZ_EXAMPLES_LONG", "1500"))
PUBLISH_BOUND = 1.0  # seconds; a publish is microseconds, this only absorbs a loaded host

# Exit codes of the confined children.
ATTACHED = 0  # attached (or read) and behaved
REFUSED = 10  # refused with a ShmcastError
# posix_ipc's ValueError("The size is too large") (EFBIG): a header whose geometry is
# legal but whose ring is larger than the confined child's RLIMIT_FSIZE (64 MiB).
TOO_LARGE = 11
NO_END = 4  # a read loop did not terminate
BAD = 5  # an out-of-bounds event, a negative count, an event from nowhere


def _fuzz_settings(long: bool, short: int = FUZZ_EXAMPLES) -> Callable:
    return settings(max_examples=FUZZ_EXAMPLES_LONG if long else short,
                    deadline=None, database=None, derandomize=not long,
                    suppress_health_check=list(HealthCheck))


def _u64_values() -> st.SearchStrategy[int]:
    return st.sampled_from([0, 1, 2, 3, 7, 8, 63, 64, 255, 256, 1 << 31, 1 << 32,
                            (1 << 63) - 1, 1 << 63, (1 << 64) - 2, (1 << 64) - 1]) | \
        st.integers(0, (1 << 64) - 1)


def _u32_values() -> st.SearchStrategy[int]:
    return st.sampled_from([0, 1, 2, 3, 7, 8, 63, 64, 65, 255, 256, 1023, 1024, 1025,
                            MAX_SLOTS, MAX_SLOTS + 1, MAX_SLOT_SIZE, MAX_SLOT_SIZE + 1,
                            0x7FFF_FFFF, 0xFFFF_FFFF]) | st.integers(0, 0xFFFF_FFFF)


# ----------------------------------------------------------------------------- control segment

GEOMETRY = {"slots": 8, "slot_size": 64, "max_subscribers": 4}

# Fields of the control header a corruption may set: offset, struct format.
CONTROL_FIELDS = {
    "layout": (8, "<I"), "header_size": (12, "<I"), "nonce": (16, "<Q"), "pid": (24, "<I"),
    "state": (28, "<I"), "slots": (32, "<I"), "slot_size": (36, "<I"),
    "max_subscribers": (40, "<I"), "overflow": (44, "<I"), "mode": (48, "<I"),
    "entry_size": (52, "<I"), "created": (56, "<Q"), "version": (96, "<Q"),
    "retired": (104, "<Q"), "epoch": (112, "<Q"), "max_publishers": (120, "<I"),
}


def _good_control() -> bytes:
    buf = bytearray(control_size(GEOMETRY["max_subscribers"]))
    pack_control_header(buf, nonce=0x5EED_0000_0000_0001, pid=os.getpid(),
                        overflow=Overflow.OVERWRITE.code, mode=0o600, created=time.time(),
                        codec="json", **GEOMETRY)
    return bytes(buf)


class FakePublisher:
    """A control segment whose publisher lock this process holds through an fd it never maps.

    Subscribers take the bus for live, and the test may rewrite, truncate or
    grow the segment at will between attaches: nothing in this process maps it,
    so a shrink cannot SIGBUS us, and each subscriber maps it afresh.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = os.path.join(DEV_SHM, f"shmcast.{name}")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        assert _ipc.try_lock(self.fd, _ipc.PUBLISHER_LOCK)

    def write(self, data: bytes, size: int | None = None) -> None:
        size = len(data) if size is None else size
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data[:size], 0)
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@pytest.fixture
def fake_bus(bus_name):
    fake = FakePublisher(bus_name)
    try:
        yield fake
    finally:
        fake.close()
        remove_bus_entries(bus_name)


def _attach_once(name: str) -> int:
    """Child: subscribe; if that works, find no event, unsubscribe. Exit code as above."""
    try:
        sub = subscribe(name)
    except ShmcastError:  # BusNotFoundError, TooManySubscribersError included
        return REFUSED
    except ValueError as exc:
        if "too large" in str(exc):
            return TOO_LARGE
        raise
    try:
        sub.get(timeout=0)
    except TimeoutError:
        pass
    else:
        return BAD  # nobody ever published on this bus
    finally:
        sub.unsubscribe()
    return ATTACHED


def _corrupt_control(data: bytearray, ops: list[tuple]) -> None:
    for op in ops:
        kind = op[0]
        if kind == "flip":
            data[op[1] // 8 % len(data)] ^= 1 << (op[1] % 8)
        elif kind == "bytes":
            off = op[1] % len(data)
            chunk = op[2][: len(data) - off]
            data[off : off + len(chunk)] = chunk
        elif kind == "field":
            off, fmt = CONTROL_FIELDS[op[1]]
            mask = 0xFFFF_FFFF if fmt == "<I" else (1 << 64) - 1
            struct.pack_into(fmt, data, off, op[2] & mask)
        elif kind == "codec":
            data[64:96] = op[1].ljust(32, b"\x00")
        elif kind == "entry":
            off = entry_offset(op[1])
            data[off : off + 64] = op[2]


_CONTROL_LEN = control_size(GEOMETRY["max_subscribers"])
_control_ops = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 8 * _CONTROL_LEN - 1)),
    st.tuples(st.just("bytes"), st.integers(0, _CONTROL_LEN - 1),
              st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("field"), st.sampled_from(sorted(CONTROL_FIELDS)),
              _u32_values() | _u64_values()),
    st.tuples(st.just("codec"), st.binary(max_size=32) | st.sampled_from(
        [b"json", b"pickle", b"raw", b"custom", b"JSON", b"json\xff"])),
    st.tuples(st.just("entry"), st.integers(0, GEOMETRY["max_subscribers"] - 1),
              st.binary(min_size=64, max_size=64)),
), max_size=6)
# Truncated or grown, before the subscriber maps it (see the module docstring); growing
# costs nothing on tmpfs, so terabytes too (test_huge_control_segment_... as well).
_control_sizes = st.none() | st.integers(0, _CONTROL_LEN + 256) | st.sampled_from(
    [0, 1, 7, 8, 127, 128, 129, 191, 192, _CONTROL_LEN - 1, _CONTROL_LEN + 1, 1 << 16, 1 << 20,
     1 << 40, (1 << 63) - 1])


def _fuzz_control(fake: FakePublisher, ops: list[tuple], size: int | None) -> None:
    data = bytearray(_good_control())
    _corrupt_control(data, ops)
    fake.write(bytes(data), size)
    code = run_confined(lambda: _attach_once(fake.name))
    assert code in (ATTACHED, REFUSED, TOO_LARGE), f"subscriber exit code {code} for {ops} {size}"
    # Attached or not, the child left nothing of itself behind.
    assert bus_entries(fake.name) == [f"shmcast.{fake.name}"], bus_entries(fake.name)


def test_fuzzed_control_segment_attach(fake_bus):
    @_fuzz_settings(long=False)
    @given(ops=_control_ops, size=_control_sizes)
    def run(ops, size):
        _fuzz_control(fake_bus, ops, size)

    run()


@pytest.mark.stress
@pytest.mark.timeout(3600)
def test_fuzzed_control_segment_attach_long(fake_bus):
    @_fuzz_settings(long=True)
    @given(ops=_control_ops, size=_control_sizes)
    def run(ops, size):
        _fuzz_control(fake_bus, ops, size)

    run()


def test_intact_control_segment_attaches(fake_bus):
    """The fuzz's baseline: the untouched header of FakePublisher is a bus one can join."""
    fake_bus.write(_good_control())
    assert run_confined(lambda: _attach_once(fake_bus.name)) == ATTACHED
    assert bus_entries(fake_bus.name) == [f"shmcast.{fake_bus.name}"]


def _set(fmt: str, off: int, value: int) -> Callable[[bytearray], None]:
    return lambda b: struct.pack_into(fmt, b, off, value)


# Each corruption, and the words the error must contain.
CLEAR_ERRORS = {
    "layout-from-the-future": (_set("<I", 8, LAYOUT_VERSION + 1),
                               f"layout version {LAYOUT_VERSION + 1}"),
    "layout-from-the-past": (_set("<I", 8, LAYOUT_VERSION - 1),
                             f"layout version {LAYOUT_VERSION - 1}"),
    "layout-max": (_set("<I", 8, 0xFFFF_FFFF), "layout version 4294967295"),
    "magic": (lambda b: b.__setitem__(slice(0, 8), b"NOTABUS\x00"), "not a shmcast bus"),
    # Magic still zero: a creator that has not finished (or died before it did).
    "zeroed": (lambda b: b.__setitem__(slice(0, len(b)), bytes(len(b))),
               "the bus is still being created"),
    "header-size": (_set("<I", 12, 64), "header/entry size"),
    "entry-size": (_set("<I", 52, 4096), "header/entry size"),
    "state": (_set("<I", 28, 9), "state 9"),
    "slots-zero": (_set("<I", 32, 0), "slots 0"),
    "slots-huge": (_set("<I", 32, MAX_SLOTS + 1), f"slots {MAX_SLOTS + 1}"),
    "slot-size-zero": (_set("<I", 36, 0), "slot_size 0"),
    "slot-size-huge": (_set("<I", 36, 0xFFFF_FFFF), "slot_size 4294967295"),
    "max-subscribers-beyond-segment": (_set("<I", 40, 5), "max_subscribers 5"),
    "max-subscribers-absurd": (_set("<I", 40, MAX_SUBSCRIBERS + 1), "max_subscribers 1025"),
    "max-subscribers-zero": (_set("<I", 40, 0), "max_subscribers 0"),
    "overflow": (_set("<I", 44, 7), "overflow mode 7"),
    "codec-not-ascii": (lambda b: b.__setitem__(slice(64, 96), b"\xff" * 32), "codec name"),
    "codec-empty": (lambda b: b.__setitem__(slice(64, 96), bytes(32)), "codec name"),
    "codec-unknown": (lambda b: b.__setitem__(slice(64, 96), b"yaml".ljust(32, b"\x00")),
                      "custom codec 'yaml'"),
}


@pytest.mark.parametrize("case", sorted(CLEAR_ERRORS))
def test_corrupt_control_header_gets_a_clear_error(fake_bus, case):
    corrupt, words = CLEAR_ERRORS[case]
    data = bytearray(_good_control())
    corrupt(data)
    fake_bus.write(bytes(data))
    with pytest.raises(ShmcastError, match=words.replace("(", r"\(")):
        subscribe(fake_bus.name)
    assert bus_entries(fake_bus.name) == [f"shmcast.{fake_bus.name}"]


@pytest.mark.parametrize("size", [0, 1, 64, 127, 128, _CONTROL_LEN - 1])
def test_truncated_control_segment_gets_a_clear_error(fake_bus, size):
    """Truncated before the subscriber maps it: a ShmcastError naming the size (empty: the
    segment of a creator that has not sized it yet, BusNotFoundError)."""
    fake_bus.write(_good_control(), size)
    if size == 0:
        with pytest.raises(BusNotFoundError, match="the bus is still being created"):
            subscribe(fake_bus.name)
    else:
        with pytest.raises(ShmcastError, match=rf"\b{size} bytes|in a {size}-byte segment"):
            subscribe(fake_bus.name)
    assert bus_entries(fake_bus.name) == [f"shmcast.{fake_bus.name}"]


@pytest.mark.parametrize("size", [_CONTROL_LEN + 1, _CONTROL_LEN + 3, _CONTROL_LEN + 4])
def test_control_segment_of_any_length_is_attached_or_refused(fake_bus, size):
    """Grown to a length that is no multiple of 8: the u64 views of the segment must not
    make subscribe raise TypeError (found by the fuzz above at 385 bytes)."""
    fake_bus.write(_good_control(), size)
    assert run_confined(lambda: _attach_once(fake_bus.name)) == ATTACHED
    assert bus_entries(fake_bus.name) == [f"shmcast.{fake_bus.name}"]


@pytest.mark.parametrize("size", [1 << 40, (1 << 63) - 1], ids=["1TiB", "8EiB"])
def test_huge_control_segment_is_refused_with_shmcast_error(fake_bus, size):
    fake_bus.write(_good_control(), size)
    assert run_confined(lambda: _attach_once(fake_bus.name)) in (ATTACHED, REFUSED)


def test_absurd_ring_geometry_is_refused_with_shmcast_error(fake_bus):
    data = bytearray(_good_control())
    struct.pack_into("<II", data, 32, MAX_SLOTS, MAX_SLOT_SIZE)
    fake_bus.write(bytes(data))
    assert run_confined(lambda: _attach_once(fake_bus.name)) == REFUSED


def test_layout_from_the_future_is_parsed_as_an_error_not_guessed():
    """parse_control_header itself: every layout version but ours is refused."""
    data = bytearray(_good_control())
    assert parse_control_header(data, len(data)).slots == GEOMETRY["slots"]
    for layout in (0, LAYOUT_VERSION - 1, LAYOUT_VERSION + 1, 0xFFFF_FFFF):
        struct.pack_into("<I", data, 8, layout)
        with pytest.raises(ShmcastError, match=f"layout version {layout}"):
            parse_control_header(data, len(data))


# ----------------------------------------------------------------------------- ring

# Fields of a ring a corruption may set (offset of a u64); slot fields are per slot.
RING_FIELDS = {"w": W_OFF, "rejected": REJECTED_OFF, "end": END_OFF, "r": R_OFF,
               "delivered": DELIVERED_OFF}


@st.composite
def _ring_cases(draw: st.DrawFn) -> tuple[int, int, bool, bytes, list]:
    slots = draw(st.sampled_from([1, 2, 3, 8]))
    slot_size = draw(st.sampled_from([1, 16, 64]))
    overwrite = draw(st.booleans())
    buf = bytearray(ring_size(slots, slot_size))
    pack_ring_header(buf, slots=slots, slot_size=slot_size, nonce=1, ring_id=1)
    writer = RingWriter(memoryview(buf), slots, slot_size, overwrite)
    for v in range(1, draw(st.integers(0, 3 * slots)) + 1):
        writer.write(*frame(v, 0.0, b"e", b"x" * min(v, slot_size)))
    writer.release()
    n, stride = len(buf), slot_stride(slot_size)
    ops = draw(st.lists(st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 8 * n - 1)),
        st.tuples(st.just("bytes"), st.integers(0, n - 1), st.binary(min_size=1, max_size=48)),
        st.tuples(st.just("field"), st.sampled_from(sorted(RING_FIELDS)), _u64_values()),
        st.tuples(st.just("seq"), st.integers(0, slots - 1), _u64_values()),
        st.tuples(st.just("lengths"), st.integers(0, slots - 1), st.integers(0, 0xFFFF),
                  _u32_values()),
    ), max_size=6))
    return slots, slot_size, overwrite, bytes(buf), [(stride, *op) for op in ops]


def _corrupt_ring(buf: bytearray, ops: list[tuple]) -> None:
    n = len(buf)
    for stride, kind, *args in ops:
        if kind == "flip":
            buf[args[0] // 8] ^= 1 << (args[0] % 8)
        elif kind == "bytes":
            chunk = args[1][: n - args[0]]
            buf[args[0] : args[0] + len(chunk)] = chunk
        elif kind == "field":
            U64.pack_into(buf, RING_FIELDS[args[0]], args[1])
        elif kind == "seq":
            U64.pack_into(buf, RING_HEADER_SIZE + args[0] * stride, args[1])
        else:  # type and data lengths of a slot's header
            struct.pack_into("<HxxI", buf, RING_HEADER_SIZE + args[0] * stride + 24, *args[1:])


def _read_corrupt_ring(slots: int, slot_size: int, overwrite: bool, data: bytes,
                       ops: list[tuple]) -> int:
    """Child: attach the real reader to a ring, corrupt the ring, read it to the end.

    The reader is made before the corruption, as in shmcast, where a subscriber
    makes it on the ring it just created (a reader made on a ring already
    corrupt is test_reader_made_on_a_corrupt_ring_...).
    """
    buf = bytearray(data)
    reader = RingReader(memoryview(buf), slots, slot_size, overwrite)
    _corrupt_ring(buf, ops)
    for _ in range(slots + 2):
        item = reader.read()
        if item is None:
            break
        _version, _timestamp, type_, payload = item
        if len(type_) > 255 or len(payload) > slot_size:
            return BAD
    else:
        return NO_END  # a ring of `slots` slots cannot hold more than `slots` events
    if reader.drops() < 0 or reader.corrupt < 0 or not 0 <= reader.delivered <= reader.r:
        return BAD
    return ATTACHED


def _fuzz_ring(case: tuple) -> None:
    slots, slot_size, overwrite, data, ops = case
    code = run_confined(lambda: _read_corrupt_ring(slots, slot_size, overwrite, data, ops))
    assert code == ATTACHED, f"reader exit code {code} for {ops}"


def test_fuzzed_ring_read():
    @_fuzz_settings(long=False)
    @given(case=_ring_cases())
    def run(case):
        _fuzz_ring(case)

    run()


@pytest.mark.stress
@pytest.mark.timeout(3600)
def test_fuzzed_ring_read_long():
    @_fuzz_settings(long=True)
    @given(case=_ring_cases())
    def run(case):
        _fuzz_ring(case)

    run()


def test_corrupt_data_length_does_not_copy_the_rest_of_the_ring():
    slots, slot_size = 4096, 16
    buf = bytearray(ring_size(slots, slot_size))  # 1.2 MB for 16-byte events
    pack_ring_header(buf, slots=slots, slot_size=slot_size, nonce=1, ring_id=1)
    writer = RingWriter(memoryview(buf), slots, slot_size, True)
    writer.write(*frame(1, 0.0, b"e", b"x"))
    writer.release()
    struct.pack_into("<I", buf, RING_HEADER_SIZE + 28, 0xFFFF_FFFF)  # slot 0's data length
    reader = RingReader(memoryview(buf), slots, slot_size, True)
    tracemalloc.start()
    try:
        assert reader.read() is None  # the slot is skipped ...
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # ... and counted: stepped over (r) but not delivered, so one drop.
    assert (reader.corrupt, reader.r, reader.delivered, reader.drops()) == (1, 1, 0, 1)
    assert peak < 64 * 1024, f"reading one corrupt 16-byte slot allocated {peak} bytes"


def test_reader_made_on_a_corrupt_ring_skips_and_counts():
    slots, slot_size = 2, 16
    buf = bytearray(ring_size(slots, slot_size))
    pack_ring_header(buf, slots=slots, slot_size=slot_size, nonce=1, ring_id=1)
    writer = RingWriter(memoryview(buf), slots, slot_size, True)
    writer.write(*frame(1, 0.0, b"e", b"x"))
    writer.release()
    U64.pack_into(buf, R_OFF, (1 << 64) - 1)
    U64.pack_into(buf, DELIVERED_OFF, (1 << 64) - 1)
    U64.pack_into(buf, RING_HEADER_SIZE, 0)  # slot 0's seq: garbage, to be skipped
    reader = RingReader(memoryview(buf), slots, slot_size, True)
    assert reader.read() is None
    assert reader.corrupt == 1
    # The garbage counters were reset, not believed: the one event is one drop.
    assert (reader.r, reader.delivered, reader.drops()) == (1, 0, 1)


def _live_ring_corruption(name: str, ops: list[tuple]) -> int:
    """Child: a live bus and subscriber; corrupt the subscriber's ring; read, publish on."""
    with Bus(name, slots=4, slot_size=64) as bus, subscribe(name) as sub:
        for v in range(1, 7):  # laps the 4-slot ring once
            bus.publish("e", {"v": v})
        ring = sub._r.ring.buf
        for where, garbage in ops:
            off = where % len(ring)
            chunk = garbage[: len(ring) - off]
            ring[off : off + len(chunk)] = chunk
        got = 0
        ended = False
        for v in range(7, 40):
            t0 = time.monotonic()
            bus.publish("e", {"v": v})
            if time.monotonic() - t0 > PUBLISH_BOUND:
                return BAD
            for _ in range(8):  # read what there is; never more than a ring holds
                if ended:
                    break
                try:
                    sub.get(timeout=0)
                except TimeoutError:
                    break
                except StreamClosed:
                    ended = True  # a nonzero `end` field reads as "bus closed": fine
                except ShmcastError:
                    continue
                else:
                    got += 1
            else:
                return NO_END
        if sub.dropped < 0 or bus.dropped < 0 or got > bus.version:
            return BAD
    return ATTACHED


def _fuzz_live_ring(name: str, ops: list[tuple]) -> None:
    try:
        code = run_confined(lambda: _live_ring_corruption(name, ops))
        assert code == ATTACHED, f"exit code {code} for {ops}"
        assert bus_entries(name) == []
    finally:
        remove_bus_entries(name)


_live_ring_ops = st.lists(st.tuples(
    st.integers(0, 1 << 16) | st.sampled_from([0, W_OFF, R_OFF, DELIVERED_OFF,
                                               RING_HEADER_SIZE]),
    st.binary(min_size=1, max_size=32)), min_size=1, max_size=5)


def test_fuzzed_live_ring(bus_name):
    @_fuzz_settings(long=False)
    @given(ops=_live_ring_ops)
    def run(ops):
        _fuzz_live_ring(bus_name, ops)

    run()


@pytest.mark.stress
@pytest.mark.timeout(3600)
def test_fuzzed_live_ring_long(bus_name):
    @_fuzz_settings(long=True)
    @given(ops=_live_ring_ops)
    def run(ops):
        _fuzz_live_ring(bus_name, ops)

    run()


# ----------------------------------------------------------------------------- registry


def _registry_corruption(name: str, garbage: list[tuple[int, bytes]], epoch: bool) -> int:
    """Child: publisher, a good and a hostile subscriber; garbage in the registry; publish on."""
    with Bus(name, slots=64, slot_size=64, max_subscribers=6) as bus:
        good = subscribe(name)
        hostile = subscribe(name)
        bus.publish("e", {"v": 1})  # both rings adopted
        assert good.get(timeout=5).version == 1
        ctrl = hostile._r.ctrl.buf  # the hostile's own mapping of the control segment
        for place, entry in garbage:
            # The hostile's own entry (place 1) or a free one (2..5); never the good one's.
            off = entry_offset(1 + place % 5)
            ctrl[off : off + 64] = entry
        if epoch:
            U64.pack_into(ctrl, EPOCH_OFF, U64.unpack_from(ctrl, EPOCH_OFF)[0] + 1)
        for v in range(2, 40):
            t0 = time.monotonic()
            assert bus.publish("e", {"v": v}) == v
            assert time.monotonic() - t0 < PUBLISH_BOUND
            ev = good.get(timeout=5)
            assert (ev.version, ev.payload) == (v, {"v": v})
            if v == 20:  # let a liveness scan happen too, not only epoch-triggered ones
                time.sleep(0.26)
        assert good.dropped == 0
        assert 0 <= bus.dropped <= 2 * bus.version * 6, bus.dropped
        assert 1 <= bus.subscriber_count <= 2
        good.unsubscribe()
        hostile.unsubscribe()
    return ATTACHED


_entries = st.one_of(
    st.binary(min_size=64, max_size=64),
    st.builds(lambda state, ring_id, slots: struct.pack("<IIQI44x", state, 0, ring_id, slots),
              st.sampled_from([0, 1, 2, 3, 4, ENTRY_ACTIVE, 0xFFFF_FFFF]), _u64_values(),
              _u32_values()),
)


def _fuzz_registry(name: str, garbage: list, epoch: bool) -> None:
    try:
        code = run_confined(lambda: _registry_corruption(name, garbage, epoch))
        assert code == ATTACHED, f"exit code {code} for {garbage}"
        assert bus_entries(name) == []
    finally:
        remove_bus_entries(name)


def test_fuzzed_registry(bus_name):
    @_fuzz_settings(long=False, short=max(1, FUZZ_EXAMPLES // 2))  # 0.3 s an example
    @given(garbage=st.lists(st.tuples(st.integers(0, 4), _entries), min_size=1, max_size=5),
           epoch=st.booleans())
    def run(garbage, epoch):
        _fuzz_registry(bus_name, garbage, epoch)

    run()


@pytest.mark.stress
@pytest.mark.timeout(3600)
def test_fuzzed_registry_long(bus_name):
    @_fuzz_settings(long=True)
    @given(garbage=st.lists(st.tuples(st.integers(0, 4), _entries), min_size=1, max_size=5),
           epoch=st.booleans())
    def run(garbage, epoch):
        _fuzz_registry(bus_name, garbage, epoch)

    run()


# ----------------------------------------------------------------------------- hostile peers

KILLED = -signal.SIGKILL
HOSTILE_PUBLISHES = int(os.environ.get("SHMCAST_HOSTILE_PUBLISHES", "120"))


def _u64(buf: memoryview, off: int, value: int) -> None:
    U64.pack_into(buf, off, value)


# What a hostile subscriber keeps writing into its own ring (ring) or its own registry
# entry (ctrl at off), as fast as it can, while the publisher publishes.
HOSTILE: dict[str, Callable] = {
    "ring-r-max": lambda ring, ctrl, off, rng, good: _u64(ring, R_OFF, (1 << 64) - 1),
    "ring-r-zero": lambda ring, ctrl, off, rng, good: _u64(ring, R_OFF, 0),
    "ring-r-random": lambda ring, ctrl, off, rng, good: _u64(ring, R_OFF, rng.getrandbits(64)),
    "ring-delivered-max": lambda ring, ctrl, off, rng, good: _u64(ring, DELIVERED_OFF,
                                                                 (1 << 64) - 1),
    "ring-r-delivered-random": lambda ring, ctrl, off, rng, good: ring.__setitem__(
        slice(R_OFF, R_OFF + 16), rng.randbytes(16)),
    "ring-header-random": lambda ring, ctrl, off, rng, good: ring.__setitem__(
        slice(0, RING_HEADER_SIZE), rng.randbytes(RING_HEADER_SIZE)),
    "ring-all-random": lambda ring, ctrl, off, rng, good: ring.__setitem__(
        slice(0, len(ring)), rng.randbytes(len(ring))),
    "entry-state-random": lambda ring, ctrl, off, rng, good: U32.pack_into(
        ctrl, off, rng.getrandbits(32)),
    "entry-state-cycle": lambda ring, ctrl, off, rng, good: U32.pack_into(
        ctrl, off, rng.randrange(5)),
    "entry-ring-id-random": lambda ring, ctrl, off, rng, good: _u64(ctrl, off + 8,
                                                                   rng.getrandbits(64)),
    "entry-ring-id-zero": lambda ring, ctrl, off, rng, good: _u64(ctrl, off + 8, 0),
    # Claims the good subscriber's ring as its own (same id, same slots): refused, two
    # writers on one ring would corrupt it.
    "entry-ring-id-of-good": lambda ring, ctrl, off, rng, good: ENTRY.pack_into(
        ctrl, off, ENTRY_ACTIVE, 1, good[0], good[1], 0.0),
    "entry-slots-random": lambda ring, ctrl, off, rng, good: U32.pack_into(
        ctrl, off + 16, rng.getrandbits(32)),
    "entry-random": lambda ring, ctrl, off, rng, good: ctrl.__setitem__(
        slice(off, off + 64), rng.randbytes(64)),
    # Bumps the epoch without the registry lock: the publisher re-scans every publish.
    "epoch-storm": lambda ring, ctrl, off, rng, good: _u64(
        ctrl, EPOCH_OFF, U64.unpack_from(ctrl, EPOCH_OFF)[0] + 1),
}


def _resize_own_ring(sub: object, size: int) -> None:
    """ftruncate *sub*'s ring through a fd of its own (the subscription keeps none)."""
    fd = os.open(DEV_SHM + sub._r.ring.name, os.O_RDWR)  # type: ignore[attr-defined]
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


# Done once, before the publisher ever maps the hostile's ring.
HOSTILE_BEFORE_ADOPTION: dict[str, Callable] = {
    "ring-shrunk": lambda sub: _resize_own_ring(sub, RING_HEADER_SIZE // 2),
    "ring-grown": lambda sub: _resize_own_ring(sub, sub._r.ring.size + (1 << 20)),
    "ring-magic": lambda sub: sub._r.ring.buf.__setitem__(slice(0, 8), b"SHMCAST\x00"),
    "ring-slots": lambda sub: U32.pack_into(sub._r.ring.buf, 12, 1 << 20),
}


def _hostile(name: str, case: str, good: tuple[int, int]) -> int:
    """Child: subscribe, stop; then write garbage for ever (the test SIGKILLs us)."""
    sub = subscribe(name)
    r = sub._r
    ring, ctrl, off = r.ring.buf, r.ctrl.buf, entry_offset(r.place.index)
    if case in HOSTILE_BEFORE_ADOPTION:
        HOSTILE_BEFORE_ADOPTION[case](sub)
        stop_self()
        stop_self()
        time.sleep(60)  # parked, never touching its ring again, until the test SIGKILLs it
        return 9
    stop_self()  # the test publishes once: the publisher adopts our ring
    garbage = HOSTILE[case]
    rng = random.Random(case)
    garbage(ring, ctrl, off, rng, good)
    stop_self()  # garbage in place; from here on the test publishes while we scribble
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        garbage(ring, ctrl, off, rng, good)
    return 9


_HOSTILE_CASES = [("overwrite", c) for c in sorted(HOSTILE) + sorted(HOSTILE_BEFORE_ADOPTION)]
_HOSTILE_CASES += [("drop_new", c) for c in sorted(HOSTILE) if c.startswith("ring-")]


@pytest.mark.parametrize(("overflow", "case"), _HOSTILE_CASES)
def test_hostile_subscriber_cannot_crash_stall_or_skew_the_publisher(bus_name, overflow, case):
    with Children() as kids:
        try:
            with Bus(bus_name, slots=8, slot_size=64, overflow=overflow) as bus, \
                    subscribe(bus_name) as good:
                good_ring = (good._r.place.ring_id, 8)
                pid = kids.fork(lambda: _hostile(bus_name, case, good_ring))
                wait_stopped(pid)
                assert bus.subscriber_count == 2
                hostile_id = read_entry(bus._core.ctrl.buf, 1).ring_id
                published = 0
                if case in HOSTILE:
                    published = bus.publish("e", {"v": 1})
                    assert good.get(timeout=5).version == 1
                    assert len(bus._core.rings) == 2  # the hostile's ring is adopted
                os.kill(pid, signal.SIGCONT)
                wait_stopped(pid)
                os.kill(pid, signal.SIGCONT)  # it scribbles on while we publish

                worst = 0.0
                for i in range(HOSTILE_PUBLISHES):
                    t0 = time.perf_counter()
                    v = bus.publish("e", {"v": published + 1})
                    worst = max(worst, time.perf_counter() - t0)
                    assert v == published + 1
                    published = v
                    ev = good.get(timeout=5)
                    assert (ev.version, ev.type, ev.payload) == (v, "e", {"v": v})
                    if i == HOSTILE_PUBLISHES // 2:
                        time.sleep(0.3)  # let a periodic liveness scan happen as well
                assert worst < PUBLISH_BOUND, f"a publish took {worst:.3f}s"
                assert good.dropped == 0
                # The hostile's own counters are clamped to [0, w]: it can claim at most
                # 2 drops per event; the good ring (never claimed twice) has none.
                assert 0 <= bus.dropped <= 2 * published, bus.dropped
                assert 1 <= bus.subscriber_count <= 2

                assert kids.kill(pid) == KILLED
                wait_until(lambda: bus.subscriber_count == 1, 2, "the dead hostile uncounted")

                def hostile_ring_gone() -> bool:
                    v = bus.publish("e", {"v": bus.version + 1})  # publishing drives the scans
                    assert good.get(timeout=5).version == v
                    time.sleep(0.01)
                    return not [e for e in bus_entries(bus_name) if f"{hostile_id:016x}" in e]

                # Adopted then retired, or refused: either way the publisher's next scan
                # (<= 0.25 s) unlinks the ring's names once its subscriber is gone
                # (docs/design.md, "Publishing"), and the good subscriber goes on.
                wait_until(hostile_ring_gone, 3, "the dead hostile's ring removed")
                assert 0 <= bus.dropped <= 2 * bus.version, bus.dropped
                assert good.dropped == 0
            assert bus_entries(bus_name) == []
        finally:
            remove_bus_entries(bus_name)



def _ring_path(name: str, sub: object) -> str:
    """The /dev/shm path of *sub*'s ring segment (its name ends with the ring id)."""
    ring_id = f"{sub._r.place.ring_id:016x}"  # type: ignore[attr-defined]
    (entry,) = [e for e in bus_entries(name) if e.startswith("shmcast.") and
                e.endswith(ring_id)]
    return os.path.join(DEV_SHM, entry)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_hostile_subscriber_resizing_its_ring_cannot_break_publish(bus_name):
    try:
        with Bus(bus_name, slots=4) as bus, subscribe(bus_name) as good:
            hostile = subscribe(bus_name)
            path = _ring_path(bus_name, hostile)
            fd = os.open(path, os.O_RDWR)
            try:
                os.ftruncate(fd, os.fstat(fd).st_size + 3)
            finally:
                os.close(fd)
            bus.publish("e", {"v": 1})  # adopts both rings: the hostile one may be refused
            assert good.get(timeout=5).payload == {"v": 1}
            fds = _fds()
            published = 1
            deadline = time.monotonic() + 0.8  # spans three of the publisher's liveness scans
            while time.monotonic() < deadline:
                bus.publish("e", {"v": published + 1})
                published += 1
                ev = good.get(timeout=5)
                assert ev.payload == {"v": published}
                time.sleep(0.005)
            assert _fds() <= fds, "the publisher leaks fds on the hostile ring"
            hostile.unsubscribe()
    finally:
        remove_bus_entries(bus_name)


def test_garbage_payload_in_a_complete_slot_raises_decode_error_and_is_counted(bus_name):
    try:
        with Bus(bus_name, slots=8, slot_size=64) as bus, subscribe(bus_name) as sub:
            for v in (1, 2, 3):
                bus.publish("e", {"v": v})
            # Event index 1 sits in slot 1; overwrite the first payload bytes, keep its seq.
            off = RING_HEADER_SIZE + 1 * slot_stride(64) + SLOT_HEADER_SIZE + len(b"e")
            fd = os.open(_ring_path(bus_name, sub), os.O_RDWR)
            try:
                os.pwrite(fd, b"\xff\xfe\x00", off)
            finally:
                os.close(fd)
            received, undecodable = [], []
            for _ in range(4):  # at most 3 events, one of them a DecodeError
                try:
                    received.append(sub.get(timeout=0).version)
                except TimeoutError:
                    break
                except DecodeError as exc:
                    undecodable.append((exc.version, exc.type, exc.data[:3]))
            assert received == [1, 3]
            assert undecodable == [(2, "e", b"\xff\xfe\x00")]
            assert sub.dropped == 1  # the undecodable event, counted once
            assert bus.dropped == 1
            assert len(received) + sub.dropped == 3, (received, sub.dropped)
    finally:
        remove_bus_entries(bus_name)


@pytest.mark.parametrize("case", ["ring-magic", "ring-shrunk"])
def test_refused_ring_of_a_dead_subscriber_is_removed(bus_name, case):
    with Children() as kids:
        try:
            with Bus(bus_name, slots=8, slot_size=64) as bus:
                pid = kids.fork(lambda: _hostile(bus_name, case, (0, 0)))
                wait_stopped(pid)
                hostile_id = read_entry(bus._core.ctrl.buf, 0).ring_id
                bus.publish("e", {"v": 1})
                assert bus._core.rings == {}  # refused
                assert kids.kill(pid) == KILLED

                def gone() -> bool:
                    bus.publish("e", {"v": bus.version + 1})
                    time.sleep(0.01)
                    return not [e for e in bus_entries(bus_name) if f"{hostile_id:016x}" in e]

                wait_until(gone, 1.2, "the dead subscriber's refused ring removed")
            assert bus_entries(bus_name) == []
        finally:
            remove_bus_entries(bus_name)
