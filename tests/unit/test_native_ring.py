"""The C ring against the pure one on plain bytearrays: same results, same counters, same bytes."""

from __future__ import annotations

import importlib
import random
import threading
from types import ModuleType
from typing import Any

import pytest

from shmcast import _ring
from shmcast._event import Event
from shmcast._layout import (
    Q_DELIVERED,
    Q_R,
    Q_W,
    RING_HEADER_SIZE,
    pack_ring_header,
    ring_size,
    slot_stride,
)
from shmcast._ring import INLINE_MAX, PureRingReader, PureRingWriter, frame, pure_write_all

try:
    _native: ModuleType | None = importlib.import_module("shmcast._native")
except ImportError:
    _native = None

pytestmark = pytest.mark.skipif(_native is None, reason="the C extension is not built here")
native: Any = _native
READERS = [pytest.param(lambda: native.RingReader, id="native"),
           pytest.param(lambda: PureRingReader, id="pure")]


def ring(slots: int, slot_size: int) -> bytearray:
    buf = bytearray(ring_size(slots, slot_size))
    pack_ring_header(buf, slots=slots, slot_size=slot_size, nonce=1, ring_id=2)
    return buf


class Undecodable(Exception):
    """What the tests' readers raise for an event their codec refuses."""

    def __init__(self, version: int, type_: str, data: bytes, e: Exception) -> None:
        super().__init__(version, type_, data, repr(e))


def loads(data: bytes) -> Any:
    """A codec that refuses payloads starting with a zero byte."""
    if data[:1] == b"\0":
        raise ValueError(f"cannot read {data[:4]!r}")
    return [len(data), data[-3:].hex()]


DECODING: dict[str, Any] = {"event": Event, "loads": loads, "undecodable": Undecodable}


def seen(item: Any) -> tuple[Any, ...]:
    """What a get() result shows a caller: every field of an Event, the args of an error."""
    if isinstance(item, Event):
        return ("event", item.type, item.payload, item.version, item.timestamp, item.data)
    if isinstance(item, Undecodable):
        assert isinstance(item.__cause__, ValueError)
        assert item.__context__ is item.__cause__
        return ("undecodable", *item.args)
    return ("other", item)


def outcome(get: Any, limit: int | None) -> tuple[Any, ...]:
    try:
        return seen(get(limit))
    except Undecodable as e:
        return seen(e)


def state(writer: Any, reader: Any) -> tuple[int, ...]:
    return (writer.w, writer.rejected, writer.drops(), reader.r, reader.delivered, reader.corrupt,
            reader.drops(), reader.written(), reader.ended())


class Twin:
    """The same operations on a pure ring and a native one, compared after each."""

    def __init__(self, slots: int, slot_size: int, overwrite: bool, wn: bool, rn: bool) -> None:
        self.slots, self.slot_size = slots, slot_size
        self.pure_buf = ring(slots, slot_size)
        self.mixed_buf = ring(slots, slot_size)
        pw = memoryview(self.pure_buf)
        mw = memoryview(self.mixed_buf)
        self.pure = (PureRingWriter(pw, slots, slot_size, overwrite),
                     PureRingReader(pw, slots, slot_size, overwrite, **DECODING))
        self.other = ((native.RingWriter if wn else PureRingWriter)(mw, slots, slot_size,
                                                                    overwrite),
                      (native.RingReader if rn else PureRingReader)(mw, slots, slot_size,
                                                                    overwrite, **DECODING))
        self.native_writer = wn

    def check(self) -> None:
        assert state(*self.pure) == state(*self.other)
        assert self.pure_buf == self.mixed_buf

    def write(self, version: int, type_: bytes, data: bytes) -> None:
        head, tail = frame(version, version / 8, type_, data)
        pure_write_all([self.pure[0]], head, tail)
        (native.write_all if self.native_writer else pure_write_all)([self.other[0]], head, tail)

    def read(self, limit: int | None) -> None:
        assert self.pure[1].read(limit) == self.other[1].read(limit)

    def read_many(self, n: int) -> None:
        assert self.pure[1].read_many(n) == self.other[1].read_many(n)

    def get(self, limit: int | None) -> None:
        assert outcome(self.pure[1].get, limit) == outcome(self.other[1].get, limit)

    def get_many(self, n: int, limit: int | None) -> None:
        assert [seen(x) for x in self.pure[1].get_many(n, limit)] == \
            [seen(x) for x in self.other[1].get_many(n, limit)]

    def garbage(self, rng: random.Random) -> None:
        """Scribble on one byte of a slot, or on r's neighbour: both rings alike."""
        off = rng.randrange(RING_HEADER_SIZE, len(self.pure_buf))
        value = rng.randrange(256)
        self.pure_buf[off] = self.mixed_buf[off] = value


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "drop_new"])
@pytest.mark.parametrize(("wn", "rn"), [(True, True), (True, False), (False, True)],
                         ids=["native-native", "native-pure", "pure-native"])
@pytest.mark.parametrize("seed", range(6))
def test_same_results_counters_and_bytes(seed: int, overwrite: bool, wn: bool, rn: bool) -> None:
    rng = random.Random(seed)
    slots = rng.choice([1, 2, 3, 8])
    slot_size = rng.choice([16, 64, INLINE_MAX + 64])
    twin = Twin(slots, slot_size, overwrite, wn, rn)
    version = 0
    for _ in range(600):
        op = rng.random()
        if op < 0.45:
            version += 1
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(slot_size + 1)))
            if data and rng.random() < 0.2:
                data = b"\0" + data[1:]  # one the codec refuses
            types = [b"", b"t", b"members" * 30, b"\xff\xfe"]  # the last is no UTF-8
            twin.write(version, rng.choice(types), data)
        elif op < 0.60:
            twin.read(rng.choice([None, None, version // 2, version + 3]))
        elif op < 0.70:
            twin.get(rng.choice([None, None, version // 2, version + 3]))
        elif op < 0.78:
            twin.read_many(rng.randrange(1, 5))
        elif op < 0.85:
            twin.get_many(rng.randrange(1, 5), rng.choice([None, version // 2]))
        elif op < 0.90 and twin.pure[1].delivered:
            twin.pure[1].discard()
            twin.other[1].discard()
        elif op < 0.93:
            twin.garbage(rng)
        twin.check()
    for writer in (twin.pure[0], twin.other[0]):
        writer.end(1)
    twin.check()


def test_torn_and_lapped_copies_are_never_delivered() -> None:
    slots, slot_size = 2, 64
    buf = memoryview(ring(slots, slot_size))
    writer = native.RingWriter(buf, slots, slot_size, True)
    reader = native.RingReader(buf, slots, slot_size, True)
    writer.write(*frame(1, 1.0, b"t", b"x"))
    q = buf.cast("Q")
    seq = (RING_HEADER_SIZE) // 8
    q[seq] = 1  # the writer is inside event 0 again
    assert reader.read() is None
    assert (reader.r, reader.delivered, reader.drops()) == (1, 0, 1)


def test_read_many_stops_at_max_and_limit() -> None:
    buf = memoryview(ring(8, 32))
    writer = native.RingWriter(buf, 8, 32, True)
    reader = native.RingReader(buf, 8, 32, True)
    for v in range(1, 7):
        writer.write(*frame(v, 0.0, b"e", b"%d" % v))
    assert [e[0] for e in reader.read_many(2)] == [1, 2]
    assert [e[0] for e in reader.read_many(10, limit=4)] == [3, 4]
    assert [e[0] for e in reader.read_many(max=10)] == [5, 6]
    assert reader.read_many(10) == []


def test_released_ends_refuse_and_the_buffer_export_is_held() -> None:
    backing = bytearray(ring_size(2, 32))
    buf = memoryview(backing)
    writer = native.RingWriter(buf, 2, 32, True)
    reader = native.RingReader(buf, 2, 32, True)
    buf.release()  # the caller's view may go: ours pins the buffer
    with pytest.raises(BufferError):
        backing.extend(b"x")  # a bytearray with exports cannot be resized (nor an mmap closed)
    writer.write(*frame(1, 0.0, b"e", b"1"))
    assert reader.read() == (1, 0.0, b"e", b"1")
    writer.release()
    reader.release()
    reader.release()  # idempotent
    backing.extend(b"x")  # no export left
    with pytest.raises(ValueError, match="released"):
        reader.read()
    with pytest.raises(ValueError, match="released"):
        native.write_all([writer], b"", b"")


def test_geometry_and_frames_are_checked() -> None:
    buf = memoryview(ring(2, 32))
    with pytest.raises(ValueError, match="needs"):
        native.RingWriter(buf, 3, 32, True)
    with pytest.raises(ValueError, match="geometry"):
        native.RingReader(buf, 0, 32, True)
    writer = native.RingWriter(buf, 2, 32, True)
    with pytest.raises(ValueError, match="does not fit"):
        writer.write(b"x" * slot_stride(32), b"")
    with pytest.raises(TypeError, match="native RingWriter"):
        native.write_all([object()], b"", b"")
    assert writer.w == 0


class FakeSem:
    """A semaphore as write_all sees one without a name: value and release()."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.posts = 0

    def release(self) -> None:
        self.value += 1
        self.posts += 1


def test_wake_posts_only_a_semaphore_at_zero() -> None:
    sems = [FakeSem(0), FakeSem(1)]
    writers = []
    for sem in sems:
        buf = memoryview(ring(2, 32))
        writers.append(native.RingWriter(buf, 2, 32, True, sem))
    assert not any(w.native_wake for w in writers)
    native.write_all(writers, *frame(1, 0.0, b"e", b"1"))
    assert [s.posts for s in sems] == [1, 0]
    native.write_all(writers, *frame(2, 0.0, b"e", b"2"), False)  # the caller wakes
    assert [s.posts for s in sems] == [1, 0]


def test_native_wake_through_a_named_semaphore(bus_name: str) -> None:
    posix_ipc = pytest.importorskip("posix_ipc")
    name = f"/shmcast.{bus_name}.wake"
    sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, 0o600, 0)
    try:
        buf = memoryview(ring(2, 32))
        writer = native.RingWriter(buf, 2, 32, True, sem)
        assert writer.native_wake
        for v in (1, 2, 3):
            native.write_all([writer], *frame(v, 0.0, b"e", b"x"))
        assert sem.value == 1  # a wake-up is a hint, never a count
        sem.acquire(0)
        writer.write(*frame(4, 0.0, b"e", b"x"))
        assert sem.value == 1
        writer.release()
    finally:
        sem.unlink()
        sem.close()


def test_poll_releases_the_gil_and_sees_a_write() -> None:
    buf = memoryview(ring(4, 32))
    writer = native.RingWriter(buf, 4, 32, True)
    reader = native.RingReader(buf, 4, 32, True)
    assert reader.poll(0.0) is False
    timer = threading.Timer(0.05, lambda: writer.write(*frame(1, 0.0, b"e", b"1")))
    timer.start()
    try:
        assert reader.poll(5.0) is True  # the timer thread ran while we spun
    finally:
        timer.join(5)
    assert reader.read() is not None


def test_release_during_poll_is_deferred() -> None:
    buf = memoryview(ring(4, 32))
    reader = native.RingReader(buf, 4, 32, True)
    timer = threading.Timer(0.02, reader.release)
    timer.start()
    try:
        assert reader.poll(0.2) is False
    finally:
        timer.join(5)
    with pytest.raises(ValueError, match="released"):
        reader.read()


def test_memory_model_check_follows_the_core() -> None:
    from shmcast import ShmcastError, _ipc

    _ipc.check_memory_model("aarch64", native=True)  # release/acquire order it there
    _ipc.check_memory_model("x86_64", native=False)
    with pytest.raises(ShmcastError, match="aarch64"):
        _ipc.check_memory_model("aarch64", native=False)
    with pytest.raises(ShmcastError, match="ppc64le"):
        _ipc.check_memory_model("ppc64le", native=True)


def test_garbage_counters_match_python_ints() -> None:
    for wn in (True, False):
        buf = memoryview(ring(4, 32))
        writer = (native.RingWriter if wn else PureRingWriter)(buf, 4, 32, False)
        q = buf.cast("Q")
        q[Q_R] = 2**64 - 1  # a reader's r beyond w: the ring is not full
        q[Q_DELIVERED] = 2**64 - 1
        assert writer.write(*frame(1, 0.0, b"e", b"1"))
        assert q[Q_W] == 1
        q.release()


def test_dispatch_flag() -> None:
    import shmcast

    assert shmcast.native is _ring.NATIVE
    if _ring.NATIVE:
        assert _ring.RingWriter is native.RingWriter
        assert _ring.write_all is native.write_all
    else:
        assert _ring.RingWriter is PureRingWriter



def test_writer_resumes_a_ring_like_the_pure_one() -> None:
    for cls in (native.RingWriter, PureRingWriter):
        buf = memoryview(ring(2, 32))
        q = buf.cast("Q")
        q[Q_W], q[Q_W + 1] = 5, 3  # w and rejected of a writer that went away
        writer = cls(buf, 2, 32, False, resume=True)
        assert (writer.w, writer.rejected) == (5, 3)
        q[Q_R] = 4
        assert writer.write(*frame(6, 0.0, b"e", b"x"))
        assert not writer.write(*frame(7, 0.0, b"e", b"x"))  # full: 6 - 4 == 2 slots
        assert (q[Q_W], q[Q_W + 1]) == (6, 4)
        q.release()


def ends(reader_class: Any, slots: int, slot_size: int, **decoding: Any) -> tuple[Any, Any]:
    """A native writer and a decoding reader of *reader_class* on one new ring."""
    buf = memoryview(ring(slots, slot_size))
    return (native.RingWriter(buf, slots, slot_size, True),
            reader_class()(buf, slots, slot_size, True, **{**DECODING, **decoding}))


@pytest.mark.parametrize("reader_class", READERS)
def test_get_builds_the_event_and_counts_what_does_not_decode(reader_class: Any) -> None:
    writer, reader = ends(reader_class, 8, 64)
    assert reader.get() is None
    for v, (type_, data) in enumerate([(b"a", b"xyz"), (b"a", b"\0bad"), (b"b\xff", b"q"),
                                       (b"a", b"\0"), (b"a", b"last")], 1):
        writer.write(*frame(v, v / 4, type_, data))
    first = reader.get()
    assert first == Event("a", loads(b"xyz"), 1, 0.25, b"xyz")
    assert type(first) is Event
    assert first.data == b"xyz"
    with pytest.raises(Undecodable) as raised:
        reader.get()
    assert raised.value.args == (2, "a", b"\0bad", "ValueError(\"cannot read b'\\\\x00bad'\")")
    assert isinstance(raised.value.__cause__, ValueError)
    assert raised.value.__suppress_context__
    assert (reader.r, reader.delivered, reader.drops()) == (2, 1, 1)  # counted as dropped
    batch = reader.get_many(10)
    assert [seen(x)[:4] for x in batch] == [("event", "b\ufffd", loads(b"q"), 3),
                                             ("undecodable", 4, "a", b"\0"),
                                             ("event", "a", loads(b"last"), 5)]
    assert batch[2].type is first.type  # one str per event type, kept
    assert (reader.r, reader.delivered, reader.drops()) == (5, 3, 2)
    assert reader.get_many(10) == []
    reader.release()
    with pytest.raises(ValueError, match="released"):
        reader.get()


@pytest.mark.parametrize("reader_class", READERS)
def test_get_many_stops_at_max_and_limit_and_keeps_many_types(reader_class: Any) -> None:
    writer, reader = ends(reader_class, 64, 32)
    for v in range(1, 51):  # more types than any cache keeps
        writer.write(*frame(v, 0.0, b"type-%d" % (v % 40), b"%d" % v))
    assert [e.version for e in reader.get_many(2)] == [1, 2]
    assert [e.version for e in reader.get_many(10, limit=4)] == [3, 4]
    assert reader.get(limit=4) is None
    rest = reader.get_many(max=100)
    assert [(e.version, e.type) for e in rest] == [(v, f"type-{v % 40}") for v in range(5, 51)]


@pytest.mark.parametrize("reader_class", READERS)
def test_an_error_that_is_not_the_codecs_propagates_and_a_batch_it_ends_counts_dropped(
        reader_class: Any) -> None:
    def interrupted(data: bytes) -> Any:
        if data == b"stop":
            raise KeyboardInterrupt
        return loads(data)

    writer, reader = ends(reader_class, 8, 32, loads=interrupted)
    for v, data in enumerate([b"stop", b"1", b"\0", b"stop", b"2"], 1):
        writer.write(*frame(v, 0.0, b"e", data))
    with pytest.raises(KeyboardInterrupt):
        reader.get()  # as from Python code: the event counts as delivered, not dropped
    assert (reader.r, reader.delivered, reader.drops()) == (1, 1, 0)
    with pytest.raises(KeyboardInterrupt):
        reader.get_many(10)  # 2 taken and lost with the batch, 3 dropped already
    assert (reader.r, reader.delivered, reader.drops()) == (4, 2, 2)
    assert [e.version for e in reader.get_many(10)] == [5]



@pytest.mark.parametrize("reader_class", READERS)
def test_a_failing_error_factory_propagates_its_error(reader_class: Any) -> None:
    def broken(version: int, type_: str, data: bytes, e: Exception) -> BaseException:
        raise RuntimeError("the factory fails")

    writer, reader = ends(reader_class, 2, 32, undecodable=broken)
    writer.write(*frame(1, 0.0, b"e", b"\0"))
    with pytest.raises(RuntimeError, match="factory"):
        reader.get()
    assert reader.drops() == 1  # the event was not handed on either way


@pytest.mark.parametrize("reader_class", READERS)
def test_release_while_the_codec_runs_is_deferred_and_ends_the_batch(reader_class: Any) -> None:
    holder: list[Any] = []

    def releasing(data: bytes) -> Any:
        holder[0].release()
        return data

    writer, reader = ends(reader_class, 8, 32, loads=releasing)
    holder.append(reader)
    for v in range(1, 4):
        writer.write(*frame(v, 0.0, b"e", b"x"))
    assert [e.version for e in reader.get_many(10)] == [1]
    with pytest.raises(ValueError, match="released"):
        reader.get()


@pytest.mark.parametrize("reader_class", READERS)
def test_get_needs_the_three_decoding_arguments(reader_class: Any) -> None:
    buf = memoryview(ring(2, 32))
    with pytest.raises(TypeError, match="together"):
        reader_class()(buf, 2, 32, True, event=Event, loads=loads)
    plain = reader_class()(buf, 2, 32, True)
    with pytest.raises(TypeError, match="without event"):
        plain.get()
