"""Contract: the publisher is thread-safe within its process; subscription bookkeeping
holds under concurrent and repeated unsubscribe, and under place reuse."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
from _contract_helpers import Child, assert_clean_stderr, bus_entries

from shmcast import Bus, EventTooLargeError, StreamClosed, TooManySubscribersError, subscribe

pytestmark = pytest.mark.timeout(30)


def test_concurrent_publishers_get_unique_consecutive_versions(bus_name):
    threads, per_thread = 4, 1500
    total = threads * per_thread
    with Bus(bus_name, slots=8192, slot_size=128) as bus, subscribe(bus_name) as sub:
        sent: list[dict[int, list[int]]] = [{} for _ in range(threads)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(threads)

        def work(i: int) -> None:
            try:
                barrier.wait()
                for n in range(per_thread):
                    v = bus.publish(f"th{i}", [i, n])
                    sent[i][v] = [i, n]
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(20)
        assert not any(t.is_alive() for t in ts)
        assert not errors, errors
        by_version = {}
        for i, d in enumerate(sent):
            versions = list(d)
            assert versions == sorted(versions), f"thread {i} saw versions go backwards"
            by_version.update(d)
        assert sorted(by_version) == list(range(1, total + 1)), "versions not unique/consecutive"
        assert bus.version == total
        got = [sub.get(timeout=5) for _ in range(total)]
        assert [e.version for e in got] == list(range(1, total + 1))
        for e in got:
            assert e.payload == by_version[e.version], f"v{e.version}: payload of another event"
            assert e.type == f"th{e.payload[0]}"
        assert sub.dropped == 0


def test_publishing_while_other_threads_subscribe_and_unsubscribe(bus_name):
    with Bus(bus_name, slots=4, max_subscribers=8) as bus:
        stop = threading.Event()
        errors: list[BaseException] = []
        cycles = [0]

        def churn() -> None:
            try:
                while not stop.is_set():
                    with subscribe(bus_name, slots=2) as s, \
                            contextlib.suppress(TimeoutError):
                        s.get(timeout=0.001)
                    cycles[0] += 1
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        ts = [threading.Thread(target=churn, daemon=True) for _ in range(3)]
        for t in ts:
            t.start()
        try:
            for _ in range(3000):
                bus.publish("e", 1)
        finally:
            stop.set()
            for t in ts:
                t.join(10)
        assert not errors, errors
        assert cycles[0] > 0
        assert bus.subscriber_count == 0
        with subscribe(bus_name) as s:
            v = bus.publish("e", 2)
            assert s.get(timeout=5).version == v
        assert bus.version == 3001


def test_close_racing_publisher_threads_is_clean(bus_name):
    """bus.close() while threads publish: every thread stops with a clear error,
    nothing crashes (run in its own process: a SIGSEGV shows as the exit code)."""
    with Child("python-c", "close_race", name=bus_name) as ch:
        r = ch.expect("raced", timeout=25)
        assert ch.wait() == 0
        assert_clean_stderr(ch.stderr_final())
    assert not any(r["alive"]), r
    for res in r["results"]:
        assert res["exc"] is not None, r
        assert "ShmcastError" in res["mro"] or "ValueError" in res["mro"], res
    assert r["close_s"] < 2.0, r
    assert r["end"] == "StreamClosed", r
    assert r["entries"] == [], r
    assert bus_entries(bus_name) == []


def test_repeated_unsubscribe_never_frees_a_reused_place(bus_name):
    with Bus(bus_name, max_subscribers=1) as bus:
        a = subscribe(bus_name)
        a.unsubscribe()
        c = subscribe(bus_name)  # very likely takes a's old place
        a.unsubscribe()
        a.close()
        assert bus.subscriber_count == 1
        with pytest.raises(TooManySubscribersError):
            subscribe(bus_name)
        v = bus.publish("e", 1)
        assert c.get(timeout=5).version == v
        c.unsubscribe()
        assert bus.subscriber_count == 0


def test_concurrent_unsubscribe_is_idempotent(bus_name):
    with Bus(bus_name) as bus:
        a = subscribe(bus_name)
        b = subscribe(bus_name)
        bus.publish("e", "buffered")
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)

        def unsub() -> None:
            try:
                barrier.wait()
                a.unsubscribe()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        ts = [threading.Thread(target=unsub) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        assert not errors, errors
        assert bus.subscriber_count == 1
        assert a.get(timeout=5).payload == "buffered"
        with pytest.raises(StreamClosed):
            a.get(timeout=5)
        assert b.get(timeout=5).payload == "buffered"
        v = bus.publish("e", "b only")
        ev = b.get(timeout=5)
        assert (ev.version, ev.payload) == (v, "b only")
        b.unsubscribe()
        assert bus.subscriber_count == 0


def test_default_limits(bus_name):
    """Defaults from the contract: slots=64, max_subscribers=64, overflow=overwrite."""
    with Bus(bus_name, slot_size=64) as bus:
        subs = [subscribe(bus_name) for _ in range(64)]
        try:
            with pytest.raises(TooManySubscribersError):
                subscribe(bus_name)
            assert bus.subscriber_count == 64
            for _ in range(100):
                bus.publish("e", None)
            assert subs[0].dropped == 36
            assert bus.dropped == 36 * 64
            assert subs[0].get(timeout=5).version == 37  # overwrite kept the newest 64
        finally:
            for s in subs:
                s.unsubscribe()
        assert bus.subscriber_count == 0


def test_slot_size_is_the_largest_encoded_payload(bus_name):
    with Bus(bus_name, slot_size=256, codec="raw") as bus, subscribe(bus_name) as sub:
        assert bus.publish("t", b"x" * 256) == 1
        with pytest.raises(EventTooLargeError):
            bus.publish("t", b"x" * 257)
        assert sub.get(timeout=5).payload == b"x" * 256


def test_non_ascii_type_round_trips(bus_name):
    with Bus(bus_name) as bus, subscribe(bus_name) as sub:
        bus.publish("\u00e9v\u00e9nement-\u2603", 1)
        assert sub.get(timeout=5).type == "\u00e9v\u00e9nement-\u2603"


def test_several_async_iterators_in_one_loop(bus_name):
    with Bus(bus_name) as bus:
        subs = [subscribe(bus_name) for _ in range(3)]

        async def main() -> list[list[int]]:
            async def consume(s) -> list[int]:
                out = []
                async for ev in s:
                    out.append(ev.version)
                return out

            tasks = [asyncio.create_task(consume(s)) for s in subs]
            await asyncio.sleep(0.1)
            for i in range(5):
                bus.publish("e", i)
                await asyncio.sleep(0.01)
            for s in subs:
                s.unsubscribe()
            return await asyncio.wait_for(asyncio.gather(*tasks), 5)

        t0 = time.monotonic()
        try:
            assert asyncio.run(main()) == [[1, 2, 3, 4, 5]] * 3
        finally:
            for s in subs:
                s.unsubscribe()
        assert time.monotonic() - t0 < 5
