"""Names, codecs, argument checks and the public surface, without other processes."""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import pytest

import shmcast
from shmcast import (
    Bus,
    BusExistsError,
    BusNotFoundError,
    EventTooLargeError,
    ShmcastError,
    StreamClosed,
    TooManySubscribersError,
)
from shmcast._codecs import BUILTIN, for_subscriber, resolve
from shmcast._names import check_name


def test_all_matches_public_names() -> None:
    public = {n for n, v in vars(shmcast).items()
              if n[0].isalpha() and not inspect.ismodule(v)}
    assert set(shmcast.__all__) == public
    for name in shmcast.__all__:
        if name != "native":  # a bool: it has no __module__
            assert getattr(shmcast, name).__module__ == "shmcast"


def test_exception_hierarchy() -> None:
    assert issubclass(BusNotFoundError, FileNotFoundError)
    assert issubclass(BusExistsError, FileExistsError)
    assert issubclass(EventTooLargeError, ValueError)
    for exc in (BusNotFoundError, BusExistsError, EventTooLargeError, TooManySubscribersError,
                StreamClosed):
        assert issubclass(exc, ShmcastError)


def test_stream_closed_pickles_with_reason() -> None:
    exc = pickle.loads(pickle.dumps(StreamClosed(StreamClosed.BUS_CLOSED, "b")))
    assert exc.reason == "bus closed"
    assert "bus closed" in str(exc)


@pytest.mark.parametrize("bad", ["", "a" * 65, "a.b", "a/b", "é", "a b", "shm\x00"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid bus name"):
        check_name(bad)
    with pytest.raises(ValueError, match="invalid bus name"):
        Bus(bad)
    with pytest.raises(ValueError, match="invalid bus name"):
        shmcast.subscribe(bad)


def test_good_names() -> None:
    for good in ("a", "A-b_9", "x" * 64):
        assert check_name(good) == good
    with pytest.raises(TypeError):
        check_name(b"abc")


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"slots": 0}, ValueError),
        ({"slots": True}, TypeError),
        ({"slot_size": 0}, ValueError),
        ({"max_subscribers": 0}, ValueError),
        ({"overflow": "block"}, ValueError),
        ({"codec": "yaml"}, ValueError),
        ({"codec": object()}, TypeError),
        ({"mode": 0o1777}, ValueError),
        ({"slots": 1 << 20, "slot_size": 1 << 20}, ValueError),
    ],
)
def test_bad_bus_arguments(bus_name: str, kwargs: dict[str, Any], exc: type[Exception]) -> None:
    with pytest.raises(exc):
        Bus(bus_name, **kwargs)


def test_codecs_round_trip() -> None:
    assert BUILTIN["json"].dumps({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()
    assert BUILTIN["json"].loads(b'{"a":1}') == {"a": 1}
    assert BUILTIN["pickle"].loads(BUILTIN["pickle"].dumps({1, 2})) == {1, 2}
    assert BUILTIN["raw"].dumps(bytearray(b"ab")) == b"ab"
    with pytest.raises(TypeError):
        BUILTIN["raw"].dumps("text")
    with pytest.raises(TypeError):
        BUILTIN["json"].dumps(object())


class Upper:
    name = "upper"

    def dumps(self, obj: Any) -> bytes:
        return str(obj).upper().encode()

    def loads(self, data: bytes) -> Any:
        return data.decode()


def test_custom_codec_resolution() -> None:
    codec = Upper()
    assert resolve(codec) is codec
    assert for_subscriber("upper", codec) is codec
    with pytest.raises(ShmcastError, match="custom codec"):
        for_subscriber("upper", None)
    with pytest.raises(ShmcastError, match="not 'json'"):
        for_subscriber("upper", "json")
    assert for_subscriber("json", None) is BUILTIN["json"]


def test_publish_checks(bus_name: str) -> None:
    with Bus(bus_name, slot_size=16) as bus:
        with pytest.raises(EventTooLargeError, match="slot_size is 16"):
            bus.publish("x", "a" * 100)
        with pytest.raises(TypeError):
            bus.publish("x", object())
        with pytest.raises(TypeError):
            bus.publish(1, None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="type"):
            bus.publish("t" * 300, None)
        assert bus.version == 0
        assert bus.publish("x", 1) == 1
        with pytest.raises(TypeError, match="pickle"):
            pickle.dumps(bus)
    with pytest.raises(ShmcastError, match="closed"):
        bus.publish("x", 1)
    bus.close()  # idempotent


def test_same_process_round_trip(bus_name: str) -> None:
    with Bus(bus_name, slots=4) as bus, shmcast.subscribe(bus_name) as sub:
        assert bus.subscriber_count == 1
        assert [bus.publish("t", i) for i in range(3)] == [1, 2, 3]
        events = [sub.get(timeout=1) for _ in range(3)]
        assert [e.payload for e in events] == [0, 1, 2]
        assert events[0].data == b"0"
        assert events[0].type == "t"
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.01)
        with pytest.raises(TimeoutError):
            sub.get_nowait()
    with pytest.raises(StreamClosed):
        sub.get()


def test_exists_and_not_found(bus_name: str) -> None:
    with pytest.raises(BusNotFoundError):
        shmcast.subscribe(bus_name)
    with Bus(bus_name), pytest.raises(BusExistsError):
        Bus(bus_name)
    with pytest.raises(BusNotFoundError):
        shmcast.subscribe(bus_name)


def test_fast_event_constructor_matches_the_dataclass() -> None:
    import dataclasses

    from shmcast._event import make_event

    fast = make_event("t", {"a": 1}, 3, 1.5, b'{"a":1}')
    slow = shmcast.Event("t", {"a": 1}, 3, 1.5, b'{"a":1}')
    assert fast == slow
    assert repr(fast) == repr(slow)
    assert fast.data == b'{"a":1}'
    assert dataclasses.asdict(fast)["payload"] == {"a": 1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.version = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "doc",
    [b'{"a":[1,2.5,"\\u00e9",null,true]}', b"NaN", b"[Infinity]", b"123456789012345678901234567890",
     b'{"a":1e400}', b'"\\ud800"', b"-0.0", b"[1.0000000000000002]", b'{"a":1,"a":2}'],
)
def test_json_decoding_matches_the_standard_library(doc: bytes) -> None:
    import json
    import math

    got = BUILTIN["json"].loads(doc)
    want = json.loads(doc)
    assert type(got) is type(want)
    if isinstance(want, float) and math.isnan(want):
        assert math.isnan(got)
    else:
        assert repr(got) == repr(want)
