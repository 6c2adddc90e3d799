"""The drain's C forward against its object path on the same bytes: same versions, counters, bytes.

The reference is the bus's own object path (``_Publisher._drain_objects``, so
``_emit_many``) over the pure ring classes; the other side is
``_Publisher._drain_native`` over the C ones. Both run on a stand-in for the bus
that has only what those methods touch.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from shmcast import _bus
from shmcast._layout import (
    CONTROL_HEADER_SIZE,
    Q_EPOCH,
    Q_VERSION,
    RING_HEADER_SIZE,
    SLOT_BODY_OFF,
    pack_ring_header,
    ring_size,
    slot_stride,
)
from shmcast._ring import PureRingReader, PureRingWriter, frame, pure_write_all

native: Any = pytest.importorskip("shmcast._native", reason="the C extension is not built here")
pytestmark = pytest.mark.timeout(60)


def ring(slots: int, slot_size: int) -> memoryview:
    buf = bytearray(ring_size(slots, slot_size))
    pack_ring_header(buf, slots=slots, slot_size=slot_size, nonce=1, ring_id=2)
    return memoryview(buf)


class Owner:
    """What ``_drain_objects`` / ``_drain_native`` use of a ``_Publisher``."""

    _emit_many = _bus._Publisher._emit_many
    _drain_objects = _bus._Publisher._drain_objects
    _drain_native = _bus._Publisher._drain_native

    def __init__(self, native_rings: bool, slot_size: int, sub_slots: list[int],
                 overwrite: list[bool]) -> None:
        self.native_rings = native_rings
        self.slot_size = slot_size
        self.ctrl = memoryview(bytearray(CONTROL_HEADER_SIZE))
        self.ctrl_q = self.ctrl.cast("Q")
        self.epoch_seen = 0
        self.next_scan = math.inf
        self.pending: dict[int, Any] = {}
        self.version = 0
        self.scans = 0
        self.rings: list[tuple[memoryview, Any, PureRingReader]] = []  # served now
        self.made: list[tuple[memoryview, Any, PureRingReader]] = []  # every one, in order
        self.writers: list[Any] = []
        self.roster = [self.make_ring(s, o) for s, o in zip(sub_slots, overwrite, strict=True)]
        self._scan()

    def make_ring(self, slots: int, overwrite: bool) -> tuple[memoryview, Any, PureRingReader]:
        buf = ring(slots, self.slot_size)
        cls = native.RingWriter if self.native_rings else PureRingWriter
        made = (buf, cls(buf, slots, self.slot_size, overwrite),
                PureRingReader(buf, slots, self.slot_size, overwrite))
        self.made.append(made)
        return made

    def _scan(self) -> None:
        """The registry changed: serve the rings of the roster now."""
        self.scans += 1
        self.epoch_seen = self.ctrl_q[Q_EPOCH]
        self.rings = list(self.roster)
        self.writers = [w for _, w, _ in self.rings]


class Twin:
    """One inbox drained into the same subscriber rings twice: object path and C forward."""

    def __init__(self, rng: random.Random, *, inbox_slots: int, slot_size: int,
                 inbox_overwrite: bool, subs: int) -> None:
        self.slot_size = slot_size
        sub_slots = [rng.choice([1, 2, 4, 16]) for _ in range(subs)]
        overwrite = [rng.random() < 0.5 for _ in range(subs)]
        self.owners = (Owner(False, slot_size, sub_slots, overwrite),
                       Owner(True, slot_size, sub_slots, overwrite))
        self.inboxes = (ring(inbox_slots, slot_size), ring(inbox_slots, slot_size))
        # The publisher's end is the same class on both sides: only the drain differs.
        self.inbox_writers = [PureRingWriter(b, inbox_slots, slot_size, inbox_overwrite)
                              for b in self.inboxes]
        self.readers = (PureRingReader(self.inboxes[0], inbox_slots, slot_size, False),
                        native.RingReader(self.inboxes[1], inbox_slots, slot_size, False))

    def publish(self, type_: bytes, data: bytes, timestamp: float) -> None:
        head, tail = frame(self.inbox_writers[0].w + 1, timestamp, type_, data)
        for w in self.inbox_writers:
            pure_write_all([w], head, tail)

    def drain(self, n: int, limit: int | None) -> None:
        pure, nat = self.owners
        got = pure._drain_objects(self.readers[0], n, limit)
        want = nat._drain_native(self.readers[1], n, limit, native.forward, native.wake_all)
        assert got == want
        self.check()

    def read_subs(self, rng: random.Random) -> None:
        for k in range(len(self.owners[0].made)):
            n = rng.randrange(0, 4)
            got = [o.made[k][2].read_many(n) for o in self.owners]
            assert got[0] == got[1]

    def scribble(self, rng: random.Random) -> None:
        """Garbage on one byte of an inbox slot (not the timestamp: a NaN's bits may move)."""
        stride = slot_stride(self.slot_size)
        while True:
            off = rng.randrange(RING_HEADER_SIZE, len(self.inboxes[0]))
            if not 8 <= (off - RING_HEADER_SIZE) % stride - SLOT_BODY_OFF < 16:
                break
        value = rng.randrange(256)
        for b in self.inboxes:
            b[off] = value

    def new_roster(self, rng: random.Random) -> None:
        """A subscriber joins or leaves: the registry epoch moves on both sides."""
        slots, overwrite, leave = rng.choice([1, 2, 8]), rng.random() < 0.5, rng.random() < 0.3
        for owner in self.owners:
            if owner.roster and leave:
                owner.roster = owner.roster[1:]
            else:
                owner.roster = [*owner.roster, owner.make_ring(slots, overwrite)]
            owner.ctrl_q[Q_EPOCH] += 1

    def toggle_pending(self) -> None:
        """A subscriber whose ring is not adopted yet appears or goes: each version
        published meanwhile is counted as its miss (the C side then takes the object path)."""
        for owner in self.owners:
            if owner.pending:
                owner.pending.clear()
            else:
                owner.pending[5] = _bus._Pending(ring_id=9, missed_q=2)

    def check(self) -> None:
        pure, nat = self.owners
        assert pure.version == nat.version == pure.ctrl_q[Q_VERSION] == nat.ctrl_q[Q_VERSION]
        assert bytes(pure.ctrl) == bytes(nat.ctrl)
        assert bytes(self.inboxes[0]) == bytes(self.inboxes[1])
        a, b = self.readers
        assert (a.r, a.delivered, a.corrupt, a.drops()) == (b.r, b.delivered, b.corrupt, b.drops())
        # The C path may scan a little earlier (with no event in between): compare
        # every ring either side ever served.
        for (pb, pw, _), (nb, nw, _) in zip(pure.made, nat.made, strict=True):
            assert bytes(pb) == bytes(nb)
            assert (pw.w, pw.rejected, pw.drops()) == (nw.w, nw.rejected, nw.drops())


@pytest.fixture
def pure_emit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The object path writes pure rings with the pure write_all, as under SHMCAST_PURE=1
    (and the C rings, when the C side takes it, with the C one)."""

    def write_all(writers: list[Any], head: bytes, tail: bytes) -> None:
        if any(isinstance(w, native.RingWriter) for w in writers):
            native.write_all(writers, head, tail)
        else:
            pure_write_all(writers, head, tail)

    monkeypatch.setattr(_bus, "write_all", write_all)


@pytest.mark.usefixtures("pure_emit")
@pytest.mark.parametrize("inbox_overwrite", [False, True], ids=["inbox-drop_new", "inbox-lapped"])
@pytest.mark.parametrize("seed", range(8))
def test_forward_matches_the_object_path(seed: int, inbox_overwrite: bool) -> None:
    rng = random.Random(seed)
    slot_size = rng.choice([16, 64, 1100])
    twin = Twin(rng, inbox_slots=rng.choice([1, 3, 8, 64]), slot_size=slot_size,
                inbox_overwrite=inbox_overwrite, subs=rng.randrange(0, 4))
    for _ in range(400):
        op = rng.random()
        if op < 0.45:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(slot_size + 1)))
            twin.publish(rng.choice([b"", b"e", b"members" * 30]), data, rng.random() * 1e9)
        elif op < 0.70:
            w = twin.inbox_writers[0].w
            twin.drain(rng.choice([1, 2, 64]), rng.choice([None, None, w // 2, w + 3]))
        elif op < 0.85:
            twin.read_subs(rng)
        elif op < 0.91:
            twin.scribble(rng)
        elif op < 0.96:
            twin.new_roster(rng)
        else:
            twin.toggle_pending()
        twin.check()
    twin.drain(64, None)
    assert twin.owners[1].version > 0


@pytest.mark.usefixtures("pure_emit")
def test_full_drop_new_rings_count_each_rejection_and_lapped_rings_each_overwrite() -> None:
    rng = random.Random(1)
    twin = Twin(rng, inbox_slots=64, slot_size=32, inbox_overwrite=False, subs=0)
    for owner, cls in zip(twin.owners, (PureRingWriter, native.RingWriter), strict=True):
        for overwrite in (False, True):
            buf = ring(4, 32)
            owner.roster.append((buf, cls(buf, 4, 32, overwrite), PureRingReader(buf, 4, 32,
                                                                                 overwrite)))
        owner.ctrl_q[Q_EPOCH] += 1
    for i in range(10):
        twin.publish(b"e", b"%d" % i, float(i))
    twin.drain(64, None)
    nat = twin.owners[1]
    (_, drop_new, _), (_, overwrite, _) = nat.rings
    assert nat.version == 10
    assert (drop_new.w, drop_new.rejected, drop_new.drops()) == (4, 6, 6)
    assert (overwrite.w, overwrite.rejected, overwrite.drops()) == (10, 0, 6)
    got = nat.rings[0][2].read_many(10)
    assert [(v, ts, t, d) for v, ts, t, d in got] == [(v, v - 1.0, b"e", b"%d" % (v - 1))
                                                      for v in range(1, 5)]
    assert [e[0] for e in nat.rings[1][2].read_many(10)] == [7, 8, 9, 10]


def test_forward_stops_before_an_event_once_the_epoch_moved() -> None:
    buf = ring(8, 32)
    inbox = PureRingWriter(buf, 8, 32, False)
    reader = native.RingReader(buf, 8, 32, False)
    sub = ring(8, 32)
    writer = native.RingWriter(sub, 8, 32, True)
    ctrl = memoryview(bytearray(CONTROL_HEADER_SIZE)).cast("Q")
    for i in range(5):
        inbox.write(*frame(99, 1.5, b"e", b"%d" % i))
    ctrl[Q_EPOCH] = 7
    assert native.forward(reader, [writer], 10, 64, None, ctrl, 6) == 0
    assert (reader.r, writer.w, ctrl[Q_VERSION]) == (0, 0, 0)  # nothing taken
    assert native.forward(reader, [writer], 10, 2, None, ctrl, 7) == 2
    assert native.forward(reader, [writer], 12, 64, 4, ctrl, 7) == 2  # the limit
    assert (reader.r, reader.delivered, writer.w, ctrl[Q_VERSION]) == (4, 4, 4, 14)
    got = PureRingReader(sub, 8, 32, True).read_many(10)
    assert got == [(11 + i, 1.5, b"e", b"%d" % i) for i in range(4)]


def test_wake_all_posts_once_per_batch_only_at_zero() -> None:
    class Sem:
        def __init__(self, value: int) -> None:
            self.value, self.posts = value, 0

        def release(self) -> None:
            self.value += 1
            self.posts += 1

    sems = [Sem(0), Sem(1)]
    writers = [native.RingWriter(ring(2, 32), 2, 32, True, s) for s in sems]
    native.wake_all(writers)
    native.wake_all(writers)
    assert [s.posts for s in sems] == [1, 0]


def test_bad_arguments_forward_nothing() -> None:
    buf = ring(4, 32)
    inbox = PureRingWriter(buf, 4, 32, False)
    inbox.write(*frame(1, 0.0, b"e", b"x"))
    reader = native.RingReader(buf, 4, 32, False)
    ctrl = memoryview(bytearray(CONTROL_HEADER_SIZE)).cast("Q")
    small = native.RingWriter(ring(4, 16), 4, 16, True)  # a slot too small for this inbox
    with pytest.raises(ValueError, match="does not fit"):
        native.forward(reader, [small], 0, 64, None, ctrl, 0)
    with pytest.raises(TypeError, match="native RingWriter"):
        native.forward(reader, [PureRingWriter(ring(4, 32), 4, 32, True)], 0, 64, None, ctrl, 0)
    with pytest.raises(TypeError, match="native RingReader"):
        native.forward(PureRingReader(buf, 4, 32, False), [], 0, 64, None, ctrl, 0)
    with pytest.raises(ValueError, match="control header"):
        native.forward(reader, [], 0, 64, None, memoryview(bytearray(64)), 0)
    with pytest.raises(TypeError, match="native RingWriter"):
        native.wake_all([object()])
    assert (reader.r, small.w) == (0, 0)
    reader.release()
    with pytest.raises(ValueError, match="released"):
        native.forward(reader, [], 0, 64, None, ctrl, 0)
