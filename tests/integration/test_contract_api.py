"""Contract: import surface, errors, names, host naming and modes, versions, codecs, events.

Black-box: only ``import shmcast`` and the host. Subscribers here live in the
test's own process; the cross-process behaviour is in the other contract files.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pickle
import random
import re
import string
import time
import uuid

import pytest
from _contract_helpers import (
    Child,
    RevJsonCodec,
    bus_entries,
    control_path,
    follows_naming_rule,
    remove_own_entries,
)

import shmcast
from shmcast import (
    Bus,
    BusExistsError,
    BusNotFoundError,
    Event,
    EventTooLargeError,
    ShmcastError,
    StreamClosed,
    Subscription,
    TooManySubscribersError,
    subscribe,
)

pytestmark = pytest.mark.timeout(30)


# --------------------------------------------------------------------------- import surface


def test_import_surface_names_exist():
    for name in ("Bus", "Subscription", "Event", "subscribe", "ShmcastError",
                 "BusNotFoundError", "BusExistsError", "TooManySubscribersError",
                 "EventTooLargeError", "StreamClosed"):
        assert hasattr(shmcast, name), name
    assert callable(subscribe)
    assert isinstance(Bus, type)
    assert isinstance(Subscription, type)


@pytest.mark.parametrize(
    ("exc", "bases"),
    [
        (ShmcastError, (Exception,)),
        (BusNotFoundError, (ShmcastError, FileNotFoundError)),
        (BusExistsError, (ShmcastError, FileExistsError)),
        (EventTooLargeError, (ShmcastError, ValueError)),
        (TooManySubscribersError, (ShmcastError,)),
        (StreamClosed, (ShmcastError,)),
    ],
)
def test_exception_hierarchy(exc, bases):
    for base in bases:
        assert issubclass(exc, base), f"{exc.__name__} is not a {base.__name__}"


def test_event_is_a_frozen_dataclass_with_contract_fields():
    assert dataclasses.is_dataclass(Event)
    names = [f.name for f in dataclasses.fields(Event)]
    assert names[:4] == ["type", "payload", "version", "timestamp"], names
    # every other field is private (not part of the contract)
    assert all(n.startswith("_") for n in names[4:]), names


# --------------------------------------------------------------------------- names


def _free_single_char_name() -> str:
    for ch in random.sample(string.ascii_letters + string.digits + "_-", 64):
        if not os.path.exists(control_path(ch)):
            return ch
    pytest.fail("every single-character bus name is taken on this host")  # pragma: no cover


@pytest.mark.parametrize("kind", ["one-char", "64-chars", "all-classes", "leading-dash"])
def test_valid_names_are_accepted(kind):
    u = uuid.uuid4().hex
    name = {
        "one-char": None,
        "64-chars": ("v" + u + u)[:64],
        "all-classes": f"aZ09_-{u[:16]}",
        "leading-dash": f"-{u[:10]}",
    }[kind] or _free_single_char_name()
    try:
        with Bus(name, slots=2, slot_size=64) as bus:
            assert os.path.exists(control_path(name))
            with subscribe(name) as sub:
                v = bus.publish("t", 1)
                assert sub.get(timeout=5).version == v
        assert not any(follows_naming_rule(e, name) for e in os.listdir("/dev/shm"))
    finally:
        remove_own_entries(name)


BAD_NAMES = [
    "",
    "x" * 65,
    "a.b",
    "a/b",
    "../etc",
    "/abs",
    "a b",
    "ab\n",  # a trailing newline slips through re.match(r"...$")
    "\nab",
    "a\x00b",
    "é",
    "\u0661\u0662",  # Arabic-Indic digits: str.isdigit() is True
    "\uff41",  # fullwidth 'a': str.isalpha() is True
    "a:b",
    "a+b",
    "a%b",
    ".",
    "shmcast.x",
]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_invalid_names_raise_value_error(bad):
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(ValueError):  # noqa: PT011 - the contract says ValueError, nothing finer
        Bus(bad)
    # Bad input leaves nothing behind and does not crash the subscriber side either.
    with pytest.raises((ValueError, ShmcastError)):
        subscribe(bad)
    assert not [e for e in set(os.listdir("/dev/shm")) - before if not _another_buses(e)]


def _another_buses(entry: str) -> bool:
    """Whether *entry* is no shmcast object, or one of a validly named bus of another
    process (other xdist workers create buses while a test runs)."""
    if "shmcast." not in entry:
        return True
    bus = entry.split("shmcast.", 1)[1].split(".", 1)[0]
    other = re.fullmatch(r"(?:pytest-|t)(\d+)-[0-9a-f]+", bus)
    return bool(other) and int(other.group(1)) != os.getpid()


@pytest.mark.parametrize("bad", [None, b"abc", 123, ["a"]], ids=repr)
def test_non_str_names_raise(bad):
    with pytest.raises((ValueError, TypeError)):
        Bus(bad)
    with pytest.raises((ValueError, TypeError)):
        subscribe(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"slots": 0},
        {"slots": -1},
        {"slot_size": 0},
        {"max_subscribers": 0},
        {"overflow": "bogus"},
        {"codec": "bogus"},
        {"codec": object()},
    ],
    ids=["slots-0", "slots-neg", "slot_size-0", "max_subscribers-0", "overflow-bogus",
         "codec-bogus", "codec-object"],
)
def test_bad_bus_arguments_raise_clearly_and_leave_nothing(bus_name, kwargs):
    with pytest.raises((ValueError, TypeError, ShmcastError)):
        Bus(bus_name, **kwargs)
    assert bus_entries(bus_name) == []
    # the name is still usable afterwards
    with Bus(bus_name) as bus:
        assert bus.version == 0


# --------------------------------------------------------------------------- host naming, mode


def test_dev_shm_naming(bus_name):
    before = set(os.listdir("/dev/shm"))
    bus = Bus(bus_name, slots=4, slot_size=128)
    try:
        assert os.path.exists(control_path(bus_name))
        sub1 = subscribe(bus_name)
        sub2 = subscribe(bus_name, slots=2)
        bus.publish("t", {"a": 1})
        during = set(os.listdir("/dev/shm"))
        mine = bus_entries(bus_name)
        assert f"shmcast.{bus_name}" in mine
        bad = [e for e in mine if not follows_naming_rule(e, bus_name)]
        assert not bad, f"entries not named shmcast.{bus_name}.*: {bad}"
        sub1.unsubscribe()
        sub2.unsubscribe()
    finally:
        bus.close()
    after = set(os.listdir("/dev/shm"))
    # Whatever appeared with the bus and went away with it was the bus's:
    owned = {e for e in (during - before) - after if not _another_buses(e) or bus_name in e}
    assert f"shmcast.{bus_name}" in owned
    bad = sorted(e for e in owned if not follows_naming_rule(e, bus_name))
    assert not bad, f"bus objects not named shmcast.{bus_name}.*: {bad}"
    assert bus_entries(bus_name) == []


def _modes(name: str) -> dict[str, int]:
    return {e: os.stat(os.path.join("/dev/shm", e)).st_mode & 0o777 for e in bus_entries(name)}


@pytest.mark.parametrize(("umask", "mode", "expected"),
                         [(0o000, None, 0o600), (0o077, 0o640, 0o640)])
def test_mode_applies_to_every_segment_and_semaphore(bus_name, umask, mode, expected):
    old = os.umask(umask)
    try:
        kwargs = {} if mode is None else {"mode": mode}
        with Bus(bus_name, slots=2, slot_size=64, **kwargs) as bus, subscribe(bus_name):
            bus.publish("t", 1)
            modes = _modes(bus_name)
            assert modes, "bus has no /dev/shm entries"
            wrong = {e: oct(m) for e, m in modes.items() if m != expected}
            assert not wrong, f"expected {oct(expected)} everywhere, got {wrong}"
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- existence


def test_bus_exists_error_for_live_bus_in_same_process(bus_name):
    with Bus(bus_name) as bus:
        with pytest.raises(BusExistsError) as info:
            Bus(bus_name)
        assert isinstance(info.value, FileExistsError)
        # The failed attempt did not damage the live bus.
        assert os.path.exists(control_path(bus_name))
        with subscribe(bus_name) as sub:
            v = bus.publish("t", "still here")
            ev = sub.get(timeout=5)
            assert (ev.version, ev.payload) == (v, "still here")


def test_bus_exists_error_for_live_bus_in_other_process(bus_name):
    with Child("python-c", "pub", name=bus_name) as pub:
        pub.expect("ready")
        with pytest.raises(BusExistsError):
            Bus(bus_name)
        pub.send({"op": "publish", "n": 2})
        assert pub.expect("published")["versions"] == [1, 2]
        pub.send({"op": "close"})
        pub.expect("closed")
        assert pub.wait() == 0
    assert bus_entries(bus_name) == []


def test_subscribe_to_missing_bus_raises_bus_not_found(bus_name):
    with pytest.raises(BusNotFoundError) as info:
        subscribe(bus_name)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(BusNotFoundError):
        Subscription(bus_name)
    assert bus_entries(bus_name) == []


def test_subscribe_after_close_raises_bus_not_found(bus_name):
    Bus(bus_name).close()
    with pytest.raises(BusNotFoundError):
        subscribe(bus_name)


# --------------------------------------------------------------------------- versions


def test_versions_start_at_one_and_increase_by_one(bus_name):
    with Bus(bus_name) as bus:
        assert bus.version == 0
        with subscribe(bus_name) as sub:
            got = []
            for i in range(1, 11):
                assert bus.publish("t", i) == i
                assert bus.version == i
            got = [sub.get(timeout=5) for _ in range(10)]
        assert [e.version for e in got] == list(range(1, 11))
        assert [e.payload for e in got] == list(range(1, 11))


def test_subscriber_sees_only_events_after_subscribe(bus_name):
    with Bus(bus_name) as bus:
        for i in range(3):
            bus.publish("before", i)
        with subscribe(bus_name) as sub:
            assert bus.publish("after", "a") == 4
            assert bus.publish("after", "b") == 5
            got = [sub.get(timeout=5) for _ in range(2)]
            assert [(e.version, e.type, e.payload) for e in got] == [
                (4, "after", "a"), (5, "after", "b")]
            with pytest.raises(TimeoutError):
                sub.get(timeout=0.1)
            assert sub.dropped == 0


def test_too_large_event_consumes_no_version(bus_name):
    with Bus(bus_name, slots=8, slot_size=256, codec="raw") as bus, subscribe(bus_name) as sub:
        assert bus.publish("t", b"a" * 100) == 1
        for size in (257, 1000, 100_000):
            with pytest.raises(EventTooLargeError):
                bus.publish("t", b"x" * size)
            assert bus.version == 1
        assert bus.publish("t", b"b" * 100) == 2
        got = [sub.get(timeout=5) for _ in range(2)]
        assert [(e.version, e.payload) for e in got] == [(1, b"a" * 100), (2, b"b" * 100)]
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.05)
        assert sub.dropped == 0
        assert bus.dropped == 0


def test_too_large_json_event_is_a_value_error(bus_name):
    with Bus(bus_name, slot_size=128) as bus, subscribe(bus_name) as sub:
        with pytest.raises(ValueError):  # noqa: PT011 - EventTooLargeError is a ValueError
            bus.publish("t", "x" * 500)
        assert bus.version == 0
        assert bus.publish("t", "small") == 1
        assert sub.get(timeout=5).payload == "small"


@pytest.mark.parametrize(
    ("codec", "payload", "errors"),
    [
        ("json", object(), (TypeError,)),
        ("json", {"s": {1, 2}}, (TypeError,)),
        ("json", {(1, 2): 3}, (TypeError,)),
        ("json", b"bytes", (TypeError,)),
        ("raw", "not bytes", (TypeError,)),
        ("raw", 123, (TypeError,)),
        ("pickle", lambda: None, (pickle.PicklingError, AttributeError, TypeError)),
    ],
    ids=["json-object", "json-set", "json-tuple-key", "json-bytes", "raw-str", "raw-int",
         "pickle-lambda"],
)
def test_unencodable_payload_raises_codec_error_and_publishes_nothing(
        bus_name, codec, payload, errors):
    ok = b"ok" if codec == "raw" else "ok"
    with Bus(bus_name, codec=codec) as bus, subscribe(bus_name, codec=codec) as sub:
        assert bus.publish("t", ok) == 1
        with pytest.raises(errors):
            bus.publish("t", payload)
        assert bus.version == 1
        assert bus.publish("t", ok) == 2
        got = [sub.get(timeout=5) for _ in range(2)]
        assert [e.version for e in got] == [1, 2]
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.05)


def test_custom_codec_error_propagates_and_publishes_nothing(bus_name):
    class Boom(Exception):
        pass

    class Picky(RevJsonCodec):
        def dumps(self, obj):
            if obj == "boom":
                raise Boom("cannot encode")
            return super().dumps(obj)

    with Bus(bus_name, codec=Picky("picky")) as bus, \
            subscribe(bus_name, codec=Picky("picky")) as sub:
        with pytest.raises(Boom):
            bus.publish("t", "boom")
        assert bus.version == 0
        assert bus.publish("t", "fine") == 1
        assert sub.get(timeout=5).payload == "fine"


@pytest.mark.parametrize("bad_type", [None, 5, b"bytes"], ids=repr)
def test_non_str_type_raises_and_consumes_no_version(bus_name, bad_type):
    with Bus(bus_name) as bus:
        with pytest.raises((TypeError, ValueError)):
            bus.publish(bad_type, 1)
        assert bus.version == 0


def test_huge_type_raises_value_error_and_consumes_no_version(bus_name):
    with Bus(bus_name, slot_size=4096) as bus, subscribe(bus_name) as sub:
        with pytest.raises(ValueError):  # noqa: PT011
            bus.publish("t" * 10_000, 1)
        assert bus.version == 0
        assert bus.publish("ok", 1) == 1
        assert sub.get(timeout=5).type == "ok"


# --------------------------------------------------------------------------- codecs, event.data

JSON_PAYLOADS = [
    None,
    True,
    0,
    -5,
    1.5,
    "",
    "h\u00e9llo \u2603 \U0001f600",
    "line1\nline2\r\nend",
    [1, "a", None, [2.5]],
    {"a": [1, {"b": 2}], "\u00fc": "\u00df", "nested": {"x": {"y": {"z": []}}}},
]


def test_json_codec_roundtrip_and_data_is_compact_utf8_json(bus_name):
    with Bus(bus_name) as bus, subscribe(bus_name) as sub:
        for p in JSON_PAYLOADS:
            bus.publish("j", p)
        for p in JSON_PAYLOADS:
            ev = sub.get(timeout=5)
            assert ev.type == "j"
            assert ev.payload == p
            assert isinstance(ev.data, bytes)
            text = ev.data.decode("utf-8")
            assert json.loads(text) == p
            assert b"\n" not in ev.data, ev.data  # SSE-safe: one data: line
            assert b"\r" not in ev.data, ev.data
            compact = {
                json.dumps(p, separators=(",", ":"), ensure_ascii=False).encode(),
                json.dumps(p, separators=(",", ":")).encode(),
            }
            assert ev.data in compact, f"not compact JSON: {ev.data!r}"


def test_default_payload_is_none(bus_name):
    with Bus(bus_name) as bus, subscribe(bus_name) as sub:
        bus.publish("heartbeat")
        ev = sub.get(timeout=5)
        assert (ev.type, ev.payload, ev.data) == ("heartbeat", None, b"null")


def test_pickle_codec_roundtrip(bus_name):
    payload = {"t": (1, 2), "s": {1, 2}, "b": b"\x00\xff", "d": datetime.datetime(2020, 1, 2)}
    with Bus(bus_name, codec="pickle") as bus, subscribe(bus_name, codec="pickle") as sub:
        bus.publish("p", payload)
        ev = sub.get(timeout=5)
        assert ev.payload == payload
        assert pickle.loads(ev.data) == payload


@pytest.mark.parametrize("payload", [b"", b"\x00\xff" * 100, bytes(range(256))],
                         ids=["empty", "binary", "all-bytes"])
def test_raw_codec_roundtrip(bus_name, payload):
    with Bus(bus_name, codec="raw") as bus, subscribe(bus_name) as sub:
        bus.publish("r", payload)
        ev = sub.get(timeout=5)
        assert type(ev.payload) is bytes
        assert ev.payload == payload
        assert ev.data == payload


def test_custom_codec(bus_name):
    codec = RevJsonCodec("rev-json")
    payload = {"k": [1, 2, "three"]}
    with Bus(bus_name, codec=codec, slots=4) as bus:
        with pytest.raises(ShmcastError):
            subscribe(bus_name)
        with pytest.raises(ShmcastError):
            subscribe(bus_name, codec=RevJsonCodec("other-name"))
        # failed subscribes took no place and will count no drops
        assert bus.subscriber_count == 0
        with subscribe(bus_name, codec=RevJsonCodec("rev-json")) as sub:
            assert bus.subscriber_count == 1
            for _ in range(10):
                bus.publish("c", payload)
            assert bus.dropped == sub.dropped == 6
            ev = sub.get(timeout=5)
            assert ev.payload == payload
            assert ev.data == codec.dumps(payload)


def test_custom_codec_in_independent_process(bus_name):
    with Bus(bus_name, codec=RevJsonCodec("rev-json")) as bus:
        with Child("python-c", "sub", name=bus_name, codec=None) as nocodec:
            msg = nocodec.expect("subscribe_failed")
            assert "ShmcastError" in msg["mro"], msg
            assert nocodec.wait() == 0
        with Child("python-c", "sub", name=bus_name, codec="custom:rev-json", full=True) as ch:
            ch.expect("ready")
            bus.publish("c", {"n": 1})
            bus.publish("c", [True, None])
            ch.send({"op": "drain", "published": 2})
            r = ch.expect("drained")
            assert [e[2] for e in r["events"]] == [{"n": 1}, [True, None]]
            assert bytes.fromhex(r["events"][0][4]) == RevJsonCodec().dumps({"n": 1})
            ch.send({"op": "exit", "unsubscribe": True})
            ch.expect("bye")
            assert ch.wait() == 0


# --------------------------------------------------------------------------- events


def test_event_timestamp_is_publish_time_and_event_is_frozen(bus_name):
    with Bus(bus_name) as bus, subscribe(bus_name) as sub:
        t0 = time.time()
        bus.publish("t", 1)
        t1 = time.time()
        ev = sub.get(timeout=5)
        assert isinstance(ev, Event)
        assert isinstance(ev.timestamp, float)
        assert t0 <= ev.timestamp <= t1
        with pytest.raises(dataclasses.FrozenInstanceError):
            ev.version = 99  # type: ignore[misc]


def test_timestamp_is_taken_in_the_publisher_process(bus_name):
    with Child("python-c", "pub", name=bus_name) as pub:
        pub.expect("ready")
        with subscribe(bus_name) as sub:
            pub.send({"op": "publish", "n": 3})
            r = pub.expect("published")
            evs = [sub.get(timeout=5) for _ in range(3)]
            assert [e.version for e in evs] == r["versions"] == [1, 2, 3]
            for e in evs:
                assert r["t0"] <= e.timestamp <= r["t1"]
            assert [e.timestamp for e in evs] == sorted(e.timestamp for e in evs)
        pub.send({"op": "close"})
        pub.expect("closed")
        assert pub.wait() == 0


# --------------------------------------------------------------------------- get, counts, places


def test_get_timeout_raises_builtin_timeout_error(bus_name):
    with Bus(bus_name), subscribe(bus_name) as sub:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.3)
        elapsed = time.monotonic() - t0
        assert 0.25 <= elapsed < 2.0, elapsed
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            sub.get(timeout=0)
        assert time.monotonic() - t0 < 0.5


def test_subscriber_count_and_unsubscribe(bus_name):
    with Bus(bus_name) as bus:
        assert bus.subscriber_count == 0
        a = subscribe(bus_name)
        b = Subscription(bus_name)
        assert bus.subscriber_count == 2
        a.unsubscribe()
        assert bus.subscriber_count == 1
        with subscribe(bus_name) as c:
            assert isinstance(c, Subscription)
            assert bus.subscriber_count == 2
        assert bus.subscriber_count == 1
        b.close()
        assert bus.subscriber_count == 0


def test_too_many_subscribers_and_place_freed_by_unsubscribe(bus_name):
    with Bus(bus_name, max_subscribers=2) as bus:
        a = subscribe(bus_name)
        b = subscribe(bus_name)
        with pytest.raises(TooManySubscribersError):
            subscribe(bus_name)
        assert bus.subscriber_count == 2
        a.unsubscribe()
        c = subscribe(bus_name)  # the freed place is available at once
        assert bus.subscriber_count == 2
        with pytest.raises(TooManySubscribersError):
            subscribe(bus_name)
        v = bus.publish("t", 1)
        assert b.get(timeout=5).version == v
        assert c.get(timeout=5).version == v
        b.unsubscribe()
        c.unsubscribe()
        assert bus.subscriber_count == 0


# --------------------------------------------------------------------------- with, close


def test_with_bus_closes_and_removes_everything(bus_name):
    with Bus(bus_name, slots=4) as bus:
        assert isinstance(bus, Bus)
        sub = subscribe(bus_name)
        bus.publish("t", 1)
        assert bus_entries(bus_name)
    assert bus_entries(bus_name) == []
    assert sub.get(timeout=5).payload == 1
    with pytest.raises(StreamClosed):
        sub.get(timeout=5)
    sub.unsubscribe()
    with pytest.raises(BusNotFoundError):
        subscribe(bus_name)


def test_close_is_idempotent_and_publish_after_close_fails_cleanly(bus_name):
    bus = Bus(bus_name)
    bus.close()
    bus.close()
    with pytest.raises((ShmcastError, ValueError)):
        bus.publish("t", 1)
    assert bus_entries(bus_name) == []


def test_payload_is_encoded_once_per_publish(bus_name):
    class Counting(RevJsonCodec):
        calls = 0

        def dumps(self, obj):
            Counting.calls += 1
            return super().dumps(obj)

    with Bus(bus_name, codec=Counting("counting")) as bus:
        subs = [subscribe(bus_name, codec=RevJsonCodec("counting")) for _ in range(3)]
        for i in range(5):
            bus.publish("e", i)
        assert Counting.calls == 5
        for s in subs:
            assert [s.get(timeout=5).payload for _ in range(5)] == [0, 1, 2, 3, 4]
            s.unsubscribe()
