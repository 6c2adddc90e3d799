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
from _stress_helpers import Children, bus_entries, remove_bus_entries, stop_self, wait_stopped
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
    ShmcastError,
    StreamClosed,
    TooManySubscribersError,
    subscribe,
)

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:This process \(pid=\d+\) is multi-threaded"),
]

SLOT_SIZE = 48
MAX_SUBSCRIBERS = 4
DEFAULT_SLOTS = 3

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


class BusMachine(RuleBasedStateMachine):
    subs = Bundle("subs")
    kids = Bundle("kids")

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

    # ------------------------------------------------------------------ setup
    @initialize(overflow=st.sampled_from(["overwrite", "drop_new"]))
    def create(self, overflow: str) -> None:
        self.overwrite = overflow == "overwrite"
        self.bus = Bus(self.name, slots=DEFAULT_SLOTS, slot_size=SLOT_SIZE,
                       max_subscribers=MAX_SUBSCRIBERS, overflow=overflow)
        assert self.bus.version == 0
        assert self.bus.subscriber_count == 0

    def _current_subs(self) -> list[ModelSub]:
        return [s for s in self.all_subs if s.gen == self.gen and s.subscribed]

    def _current_kids(self) -> list[ModelChild]:
        return [k for k in self.all_kids if k.gen == self.gen and k.alive]

    def _places_taken(self) -> int:
        return len(self._current_subs()) + len(self._current_kids())

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
        self.version += 1
        assert v == self.version == self.bus.version
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
        # Stopped children still map their rings, yet nothing of the bus keeps a name.
        assert bus_entries(self.name) == []

    @precondition(lambda self: self.closed)
    @rule(overflow=st.sampled_from(["overwrite", "drop_new"]))
    def reopen(self, overflow: str) -> None:
        """A new bus of the same name; old subscriptions must never touch it."""
        self.gen += 1
        self.version = 0
        self.closed = False
        self.create(overflow)

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
    def received_plus_dropped_is_published(self) -> None:
        for m in self.all_subs:
            # Counted from the real subscription: what get() returned, what it says it
            # dropped, and (until the stream ends) what the model says is still buffered.
            assert m.received + m.sub.dropped + len(m.buffered) == m.window, m
            if m.ended:
                assert not m.buffered

    def teardown(self) -> None:
        try:
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
    _run(bus_name, max_examples=12, stateful_step_count=40, derandomize=True)
    assert time.monotonic() - t0 < 45


@pytest.mark.stress
@pytest.mark.timeout(1800)
def test_model_long(bus_name):
    _run(bus_name, max_examples=int(os.environ.get("SHMCAST_MODEL_EXAMPLES", "400")),
         stateful_step_count=100)
