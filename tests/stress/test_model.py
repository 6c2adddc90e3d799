"""Model-based test: random sequences of bus operations checked against an exact model.

The model keeps, for every subscriber, the ring it should have: which versions
are buffered and how many were dropped, under the bus's overflow mode and the
subscriber's own ring size. After every step the real bus must agree with it:
``bus.version``, ``bus.subscriber_count``, each ``sub.dropped``, ``bus.dropped``
(the sum over every subscriber that ever attached), what each ``get`` returns
(version, type, payload, ``event.data`` byte for byte, timestamp), that
oversize, unencodable or badly typed events publish nothing, and that nothing
of a closed bus is left in /dev/shm. Subscribers in forked children stand for
subscribers that die: they subscribe, stop themselves, and are SIGKILLed.

Publishers (``Publisher``) join the machine, in this process and in forked
children (which publish a burst, stop themselves, and are resumed with SIGCONT
for another burst or SIGKILLed). Each of their publishes is followed by a wait
for the bus's drain thread to give the events their versions, which keeps the
model exact; a burst made while the test holds the bus owner's lock (the drain
thread cannot run) fills the inbox, so exactly ``slots`` events of it are
handed over and the rest are counted in ``pub.dropped``. Checked: every
publisher's events get the versions the model gives them, in its order, at
every subscriber; ``bus.publisher_count``; and the contract's accounting line,
given == versions assigned + ``pub.dropped`` for every publisher (read from
outside, as ``shmcast stat`` does, for those in children), with each
subscriber's received + dropped covering every version.

The short run (derandomized, a few examples) is part of the default suite; the
long one is marked ``stress``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import pytest
from _stress_helpers import (
    Children,
    bus_entries,
    remove_bus_entries,
    stop_self,
    wait_stopped,
    wait_until,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from shmcast import (
    Bus,
    BusNotFoundError,
    EventTooLargeError,
    Publisher,
    ShmcastError,
    StreamClosed,
    TooManyPublishersError,
    TooManySubscribersError,
    _inspect,
    subscribe,
)

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:This process \(pid=\d+\) is multi-threaded"),
]

SLOT_SIZE = 48
MAX_SUBSCRIBERS = 4
DEFAULT_SLOTS = 3  # also what each publisher inbox holds
MAX_PUBLISHERS = 3
DRAIN_BOUND = 5.0  # seconds for the drain thread to publish a handed-over event (loaded host)
PLACE_BOUND = 1.5  # a dead publisher's place frees within 1 s (the contract), plus scheduling

_names = count()
_bus_prefix = ["t0-unset"]


def _encode(payload: Any) -> bytes:
    """What the json codec puts in the ring (compact, UTF-8, not ASCII-escaped)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False, width=32) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=6,
)
event_types = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)


@dataclass
class ModelSub:
    """One in-process subscription and the ring the model says it has."""

    sub: Any
    gen: int
    slots: int
    buffered: list[int] = field(default_factory=list)  # versions in the ring, oldest first
    dropped: int = 0
    last: int = 0
    window: int = 0  # events published while it was subscribed
    received: int = 0  # events get() returned
    subscribed: bool = True  # False once unsubscribed or its bus closed
    ended: bool = False  # StreamClosed seen
    pub_last: dict[int, int] = field(default_factory=dict)  # last index read of each source

    def deliver(self, version: int, overwrite: bool) -> None:
        self.window += 1
        if len(self.buffered) < self.slots:
            self.buffered.append(version)
        elif overwrite:
            self.buffered.pop(0)
            self.buffered.append(version)
            self.dropped += 1
        else:
            self.dropped += 1


@dataclass
class ModelChild:
    """A subscriber in a forked child, stopped right after subscribing; it never reads."""

    pid: int
    gen: int
    slots: int
    received: int = 0  # events written into its ring while it was alive
    alive: bool = True
    after_death: int = 0  # publishes since it died (its ring may still get them, briefly)

    @property
    def dropped(self) -> int:
        return max(0, self.received - self.slots)


@dataclass
class ModelPub:
    """A publisher, in this process (``pub``) or in a stopped forked child (``pid``)."""

    src: int
    gen: int
    pub: Any = None
    pid: int = 0
    given: int = 0  # events given to publish
    versions: list[int] = field(default_factory=list)  # those the bus gave a version, in order
    dropped: int = 0
    attached: bool = True  # holds its place (False once closed, killed, or its bus closed)
    burst: int = 0  # in a child: events it publishes each time it runs

    def payload(self, i: int) -> list[int]:
        return [self.src, i]


class BusMachine(RuleBasedStateMachine):
    subs = Bundle("subs")
    kids = Bundle("kids")
    pubs = Bundle("pubs")

    def __init__(self) -> None:
        super().__init__()
        self.children = Children()
        self.name = f"{_bus_prefix[0]}-m{next(_names)}"
        self.bus: Bus | None = None
        self.gen = 0
        self.overwrite = True
        self.version = 0
        self.closed = False
        self.payloads: dict[tuple[int, int], tuple[str, bytes, float, float]] = {}
        self.all_subs: list[ModelSub] = []
        self.all_kids: list[ModelChild] = []
        self.all_pubs: list[ModelPub] = []
        self.max_publishers = 0
        self.sources = count(1)
        # (gen, source, index) -> version: one version per publisher event, at every subscriber
        self.pub_versions: dict[tuple[int, int, int], int] = {}

    # ------------------------------------------------------------------ setup
    @initialize(target=pubs, overflow=st.sampled_from(["overwrite", "drop_new"]),
                child=st.integers(0, 2 * DEFAULT_SLOTS))
    def start(self, overflow: str, child: int) -> Any:
        """The first bus, with a publisher attached and, unless *child* is 0, one in a
        child process (so that the publishing rules get their chance in a short run)."""
        self.create(overflow, MAX_PUBLISHERS)
        if child:
            self.pub_child(child)
        return self._attach()

    def create(self, overflow: str, publishers: int) -> None:
        self.overwrite = overflow == "overwrite"
        self.max_publishers = publishers
        self.bus = Bus(self.name, slots=DEFAULT_SLOTS, slot_size=SLOT_SIZE,
                       max_subscribers=MAX_SUBSCRIBERS, overflow=overflow,
                       max_publishers=publishers)
        assert self.bus.version == 0
        assert self.bus.subscriber_count == 0
        assert self.bus.publisher_count == 0

    def _current_subs(self) -> list[ModelSub]:
        return [s for s in self.all_subs if s.gen == self.gen and s.subscribed]

    def _current_kids(self) -> list[ModelChild]:
        return [k for k in self.all_kids if k.gen == self.gen and k.alive]

    def _places_taken(self) -> int:
        return len(self._current_subs()) + len(self._current_kids())

    def _current_pubs(self) -> list[ModelPub]:
        return [p for p in self.all_pubs if p.gen == self.gen and p.attached]

    # ------------------------------------------------------------------ subscribers
    @rule(target=subs, slots=st.sampled_from([None, 1, 2, 5]))
    def subscribe(self, slots: int | None) -> Any:
        if self.closed:
            try:
                subscribe(self.name, slots=slots)
            except BusNotFoundError:
                return None
            raise AssertionError("subscribe to a closed bus succeeded")
        if self._places_taken() == MAX_SUBSCRIBERS:
            try:
                subscribe(self.name, slots=slots)
            except TooManySubscribersError:
                return None
            raise AssertionError("subscribe succeeded with every place taken")
        m = ModelSub(subscribe(self.name, slots=slots), self.gen, slots or DEFAULT_SLOTS)
        self.all_subs.append(m)
        return m

    @rule(m=subs)
    def unsubscribe(self, m: ModelSub | None) -> None:
        if m is None:
            return
        m.sub.unsubscribe()
        m.subscribed = False
        m.sub.unsubscribe()  # idempotent

    @rule(m=subs, n=st.integers(1, 6))
    def read(self, m: ModelSub | None, n: int) -> None:
        if m is None:
            return
        for _ in range(n):
            self._read_one(m)

    def _read_one(self, m: ModelSub) -> bool:
        """One get(timeout=0) checked against the model; False when nothing was there."""
        if m.buffered:
            ev = m.sub.get(timeout=0)
            want = m.buffered.pop(0)
            type_, data, t0, t1 = self.payloads[(m.gen, want)]
            assert ev.version == want, (ev.version, want, m)
            assert ev.version > m.last
            m.last = ev.version
            m.received += 1
            assert ev.type == type_
            assert ev.data == data
            assert ev.payload == json.loads(data)
            assert t0 <= ev.timestamp <= t1
            if type_ == "pub":  # [source, index]: one version per event, each source in order
                src, i = ev.payload
                assert self.pub_versions[(m.gen, src, i)] == ev.version
                assert i > m.pub_last.get(src, -1), (src, i, m.pub_last)
                m.pub_last[src] = i
            return True
        if m.subscribed:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                m.sub.get(timeout=0)
            assert time.monotonic() - t0 < 1.0
        else:
            with pytest.raises(StreamClosed):
                m.sub.get(timeout=5)
            m.ended = True
            assert list(m.sub) == []
        return False

    @rule(slots=st.sampled_from([1, 2]))
    def child_subscribes(self, slots: int) -> None:
        """A subscriber in another process: subscribes, stops itself, waits to be killed."""
        if self.closed or self._places_taken() == MAX_SUBSCRIBERS:
            return
        name = self.name

        def body() -> int:
            sub = subscribe(name, slots=slots)
            stop_self()
            return 0 if sub else 1

        pid = self.children.fork(body)
        wait_stopped(pid)
        self.all_kids.append(ModelChild(pid, self.gen, slots))

    @precondition(lambda self: any(k.alive for k in self.all_kids))
    @rule(data=st.data())
    def child_dies(self, data: st.DataObject) -> None:
        kid = data.draw(st.sampled_from([k for k in self.all_kids if k.alive]))
        assert self.children.kill(kid.pid) == -signal.SIGKILL
        kid.alive = False

    # ------------------------------------------------------------------ publishing
    def _publish_ok(self, type_: str, payload: Any) -> None:
        assert self.bus is not None
        data = _encode(payload)
        t0 = time.time()
        v = self.bus.publish(type_, payload)
        t1 = time.time()
        assert v == self.version + 1 == self.bus.version
        self._deliver(type_, data, t0, t1)

    def _deliver(self, type_: str, data: bytes, t0: float, t1: float) -> int:
        """The model's side of one event the bus gave the next version: every ring gets it."""
        self.version += 1
        v = self.version
        self.payloads[(self.gen, v)] = (type_, data, t0, t1)
        for m in self._current_subs():
            m.deliver(v, self.overwrite)
        for k in self.all_kids:
            if k.gen != self.gen:
                continue
            if k.alive:
                k.received += 1
            else:
                k.after_death += 1
        return v

    def _publish_rejected(self, exc: Any, type_: Any, payload: Any) -> None:
        assert self.bus is not None
        before = self.bus.version
        with pytest.raises(exc):
            self.bus.publish(type_, payload)
        assert self.bus.version == before == self.version

    @rule(type_=event_types, payload=json_values)
    def publish(self, type_: str, payload: Any) -> None:
        if self.closed:
            self._publish_rejected(ShmcastError, type_, payload)
        elif len(_encode(payload)) > SLOT_SIZE:
            self._publish_rejected(EventTooLargeError, type_, payload)
        else:
            self._publish_ok(type_, payload)

    @rule(delta=st.integers(-2, 3))
    def publish_near_slot_size(self, delta: int) -> None:
        payload = "x" * (SLOT_SIZE - 2 + delta)  # encodes to SLOT_SIZE + delta bytes
        if self.closed:
            self._publish_rejected(ShmcastError, "big", payload)
        elif delta > 0:
            self._publish_rejected(EventTooLargeError, "big", payload)
            self._publish_rejected(ValueError, "big", payload)  # EventTooLargeError is one
        else:
            self._publish_ok("big", payload)

    @rule(payload=st.sampled_from([{1, 2}, object(), b"bytes", {"k": 1j}, [float]]))
    def publish_unencodable(self, payload: Any) -> None:
        # On a closed bus either error is a clear one (the payload is encoded first).
        self._publish_rejected((ShmcastError, TypeError) if self.closed else TypeError,
                               "bad", payload)

    @precondition(lambda self: not self.closed)
    @rule(type_=st.sampled_from(["\ud800", "t" * 256, "é" * 128, 7, None]))
    def publish_bad_type(self, type_: Any) -> None:
        exc = TypeError if not isinstance(type_, str) else ValueError
        self._publish_rejected(exc, type_, {"ok": 1})

    # ------------------------------------------------------------------ publishers
    def _handed_over(self, p: ModelPub, first: int, n: int, t0: float, t1: float) -> None:
        """Events *first* .. *first+n-1* of *p* are in its inbox: wait until the drain
        thread published them, then give them the model's next versions, in order."""
        assert self.bus is not None
        want = self.version + n
        wait_until(lambda: self.bus.version >= want, DRAIN_BOUND,  # type: ignore[union-attr]
                   lambda: f"the drain thread to reach version {want}")
        assert self.bus.version == want
        for i in range(first, first + n):
            v = self._deliver("pub", _encode(p.payload(i)), t0, t1)
            self.pub_versions[(self.gen, p.src, i)] = v
            p.versions.append(v)

    def _pub_places_free(self) -> bool:
        return len(self._current_pubs()) < self.max_publishers

    @rule(target=pubs)
    def attach_publisher(self) -> Any:
        return self._attach()

    def _attach(self) -> ModelPub | None:
        if self.closed:
            with pytest.raises(BusNotFoundError):
                Publisher(self.name)
            return None
        if not self._pub_places_free():
            with pytest.raises(TooManyPublishersError):
                Publisher(self.name)
            return None
        p = ModelPub(next(self.sources), self.gen, pub=Publisher(self.name))
        self.all_pubs.append(p)
        return p

    def _pub_ended(self, p: ModelPub) -> bool:
        """Whether publish() on *p* must raise: closed by us, or its bus closed."""
        return not p.attached or p.gen != self.gen or self.closed

    @rule(p=pubs, n=st.integers(1, 4))
    def pub_publish(self, p: ModelPub | None, n: int) -> None:
        """Publish one at a time: the drain thread empties the inbox in between, nothing drops."""
        if p is None:
            return
        if self._pub_ended(p):
            with pytest.raises(ShmcastError):
                p.pub.publish("pub", p.payload(p.given))
            return
        for _ in range(n):
            t0 = time.time()
            p.pub.publish("pub", p.payload(p.given))
            t1 = time.time()
            p.given += 1
            self._handed_over(p, p.given - 1, 1, t0, t1)

    @rule(p=pubs, n=st.integers(1, 2 * DEFAULT_SLOTS))
    def pub_burst(self, p: ModelPub | None, n: int) -> None:
        """A burst while the owner's lock is held: the inbox takes `slots`, the rest drop."""
        if p is None or self._pub_ended(p):
            return
        assert self.bus is not None
        first = p.given
        t0 = time.time()
        with self.bus._core.lock:
            for _ in range(n):
                p.pub.publish("pub", p.payload(p.given))
                p.given += 1
            taken = min(n, DEFAULT_SLOTS)
            p.dropped += n - taken
            assert p.pub.dropped == p.dropped
            assert self.bus.version == self.version  # nothing drained meanwhile
        t1 = time.time()
        # Only the first `taken` got in; the indices that dropped are never seen.
        self._handed_over(p, first, taken, t0, t1)

    @rule(p=pubs)
    def pub_close(self, p: ModelPub | None) -> None:
        if p is None:
            return
        p.pub.close()
        p.pub.close()  # idempotent
        p.attached = False
        with pytest.raises(ShmcastError):
            p.pub.publish("pub", p.payload(p.given))

    def _child_burst(self, p: ModelPub, burst: int, start: Any) -> None:
        """Let child publisher *p* publish *burst* events and stop, the owner's lock held
        (so exactly `slots` of them get in), then account for them."""
        assert self.bus is not None
        first = p.given
        t0 = time.time()
        with self.bus._core.lock:
            start()
            wait_stopped(p.pid)
            assert self.bus.version == self.version
        t1 = time.time()
        taken = min(burst, DEFAULT_SLOTS)
        p.given += burst
        p.dropped += burst - taken
        self._handed_over(p, first, taken, t0, t1)

    @precondition(lambda self: not self.closed and self.max_publishers > 0)
    @rule(burst=st.integers(1, 2 * DEFAULT_SLOTS))
    def pub_child(self, burst: int) -> None:
        """A publisher in another process: attaches, publishes a burst, stops; again on SIGCONT."""
        if not self._pub_places_free():
            return
        name = self.name
        p = ModelPub(next(self.sources), self.gen, burst=burst)

        def body() -> int:
            pub = Publisher(name)
            i = 0
            while True:
                for _ in range(burst):
                    pub.publish("pub", p.payload(i))
                    i += 1
                stop_self()

        def start() -> None:
            p.pid = self.children.fork(body)

        self._child_burst(p, burst, start)
        self.all_pubs.append(p)

    def _live_child_pubs(self, current: bool) -> list[ModelPub]:
        return [p for p in self.all_pubs if p.pid and p.attached
                and (not current or (p.gen == self.gen and not self.closed))]

    @precondition(lambda self: bool(self._live_child_pubs(current=True)))
    @rule(data=st.data())
    def pub_child_resumes(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(self._live_child_pubs(current=True)))
        self._child_burst(p, p.burst, lambda: os.kill(p.pid, signal.SIGCONT))

    @precondition(lambda self: bool(self._live_child_pubs(current=False)))
    @rule(data=st.data())
    def pub_child_dies(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(self._live_child_pubs(current=False)))
        self._check_child_counts()  # its last counts, while its place still shows them
        assert self.children.kill(p.pid) == -signal.SIGKILL
        p.attached = False
        if p.gen == self.gen and not self.closed:
            want = len(self._current_pubs())
            t0 = time.monotonic()
            wait_until(lambda: self.bus.publisher_count == want,  # type: ignore[union-attr]
                       PLACE_BOUND, "the dead publisher's place to free")
            assert time.monotonic() - t0 < PLACE_BOUND

    def _check_child_counts(self) -> None:
        """The accounting of publishers in children, read from their places (as ``stat``)."""
        kids = {p.pid: p for p in self._live_child_pubs(current=True)}
        if not kids:
            return
        seen = {info.pid: info for info in _inspect.read_bus(self.name).publishers}
        for pid, p in kids.items():
            info = seen[pid]
            assert (info.sent, info.dropped, info.pending) == (len(p.versions), p.dropped, 0), (
                info, p)
            assert info.status == "stopped"

    # ------------------------------------------------------------------ closing
    @rule()
    def close(self) -> None:
        assert self.bus is not None
        self.bus.close()
        self.bus.close()  # idempotent
        self.closed = True
        for m in self._current_subs():
            m.subscribed = False
        assert self.bus.subscriber_count == 0
        assert self.bus.publisher_count == 0
        # Stopped children still map their rings, yet nothing of the bus keeps a name.
        assert bus_entries(self.name) == []

    @precondition(lambda self: self.closed)
    @rule(overflow=st.sampled_from(["overwrite", "drop_new"]),
          publishers=st.sampled_from([MAX_PUBLISHERS, 0]))
    def reopen(self, overflow: str, publishers: int) -> None:
        """A new bus of the same name; old subscriptions and publishers must never touch it."""
        self.gen += 1
        self.version = 0
        self.closed = False
        self.create(overflow, publishers)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def counts_agree(self) -> None:
        if self.bus is None:
            return
        assert self.bus.version == self.version
        expected = 0 if self.closed else self._places_taken()
        assert self.bus.subscriber_count == expected
        for m in self.all_subs:
            assert m.sub.dropped == m.dropped, (m, m.sub.dropped)
        if not self.closed:
            lower = sum(m.dropped for m in self.all_subs if m.gen == self.gen)
            lower += sum(k.dropped for k in self.all_kids if k.gen == self.gen)
            slack = sum(k.after_death for k in self.all_kids
                        if k.gen == self.gen and not k.alive)
            assert lower <= self.bus.dropped <= lower + slack, (lower, slack)

    @invariant()
    def publishers_agree(self) -> None:
        if self.bus is None:
            return
        expected = 0 if self.closed else len(self._current_pubs())
        assert self.bus.publisher_count == expected
        for p in self.all_pubs:
            # The accounting line: every event given got a version or is in dropped.
            assert p.given == len(p.versions) + p.dropped, p
            if p.pub is not None:
                assert p.pub.dropped == p.dropped, (p, p.pub.dropped)
        if not self.closed:
            self._check_child_counts()

    @invariant()
    def received_plus_dropped_is_published(self) -> None:
        for m in self.all_subs:
            # Counted from the real subscription: what get() returned, what it says it
            # dropped, and (until the stream ends) what the model says is still buffered.
            assert m.received + m.sub.dropped + len(m.buffered) == m.window, m
            if m.ended:
                assert not m.buffered

    def teardown(self) -> None:
        try:
            for p in self.all_pubs:
                if p.pub is not None:
                    p.pub.close()
            for m in self.all_subs:
                m.sub.unsubscribe()
                m.subscribed = False
                # Drain: whatever is left must be exactly the modelled buffer.
                while self._read_one(m):
                    pass
                assert m.ended or not m.subscribed
            if self.bus is not None and not self.closed:
                self.bus.close()
            self.children.__exit__()
            left = bus_entries(self.name)
            assert left == [], f"left behind after close: {left}"
        finally:
            self.children.__exit__()
            remove_bus_entries(self.name)


def _run(bus_name: str, **kw: Any) -> None:
    _bus_prefix[0] = bus_name
    run_state_machine_as_test(BusMachine, settings=settings(
        deadline=None, suppress_health_check=list(HealthCheck), database=None, **kw))


@pytest.mark.timeout(60)
def test_model_short(bus_name):
    t0 = time.monotonic()
    _run(bus_name, max_examples=12, stateful_step_count=50, derandomize=True)
    assert time.monotonic() - t0 < 45


@pytest.mark.stress
@pytest.mark.timeout(1800)
def test_model_long(bus_name):
    _run(bus_name, max_examples=int(os.environ.get("SHMCAST_MODEL_EXAMPLES", "400")),
         stateful_step_count=100)
