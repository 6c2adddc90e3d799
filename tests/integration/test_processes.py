"""Process-level behaviour: fork, crashes, stale buses, wake-ups, torn reads."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import random
import signal
import threading
import time
import zlib
from typing import Any

import pytest
from _procs import python, wait_until

import shmcast
from _support import DEV_SHM as SHM
from _support import bus_entries as entries
from shmcast import Bus, BusExistsError, ShmcastError, StreamClosed, subscribe


def test_objects_are_named_after_the_bus_with_the_mode(bus_name: str) -> None:
    with Bus(bus_name, mode=0o640) as bus, subscribe(bus_name):
        bus.publish("x")
        names = entries(bus_name)
        assert f"shmcast.{bus_name}" in names
        assert len(names) == 3  # control, ring, semaphore
        for entry in names:
            assert (os.stat(os.path.join(SHM, entry)).st_mode & 0o777) == 0o640
    assert entries(bus_name) == []


def test_forked_copy_of_the_bus_neither_publishes_nor_unlinks(bus_name: str) -> None:
    bus = Bus(bus_name)
    try:
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                bus.publish("x", 1)
            except ShmcastError as e:
                code = 0 if "fork" in str(e) else 2
            bus.close()
            del bus
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert f"shmcast.{bus_name}" in entries(bus_name)
        assert bus.publish("x", 1) == 1
    finally:
        bus.close()


def test_publisher_death_is_seen_even_while_its_forked_children_live(bus_name: str) -> None:
    # A gunicorn master forks workers after creating the bus; the workers must
    # not keep the master's publisher lock alive after the master dies.
    code = f"""
import os, sys, time, shmcast
bus = shmcast.Bus({bus_name!r})
child = os.fork()
if child == 0:
    time.sleep(30); os._exit(0)
print(child, flush=True)
print("ready", flush=True)
time.sleep(30)
"""
    with python(code, ready=None) as pub:
        grandchild = int(pub.readline())
        assert pub.readline() == "ready"
        try:
            sub = subscribe(bus_name)
            os.kill(pub.pid, signal.SIGKILL)
            pub.wait()
            start = time.monotonic()
            with pytest.raises(StreamClosed) as info:
                sub.get(timeout=5)
            assert info.value.reason == StreamClosed.PUBLISHER_DIED
            assert time.monotonic() - start < 2
        finally:
            os.kill(grandchild, signal.SIGKILL)
    wait_until(lambda: entries(bus_name) == [], 5, "dead bus reclaimed")


def test_stale_bus_is_reclaimed_and_old_subscription_cannot_touch_new_bus(bus_name: str) -> None:
    code = (f"import shmcast, time; b = shmcast.Bus({bus_name!r}); "
            "print('ready', flush=True); time.sleep(30)")
    with python(code) as pub:
        old = subscribe(bus_name)
        with pytest.raises(BusExistsError, match="already exists"):
            Bus(bus_name)
        os.kill(pub.pid, signal.SIGKILL)
        pub.wait()
    with Bus(bus_name) as bus:  # reclaimed silently
        new = subscribe(bus_name)
        old.unsubscribe()
        with pytest.raises(StreamClosed):
            old.get(timeout=1)
        assert bus.subscriber_count == 1
        bus.publish("x", 1)
        assert new.get(timeout=1).payload == 1
        new.unsubscribe()
    assert entries(bus_name) == []


def test_killed_subscriber_frees_its_place_and_its_ring(bus_name: str) -> None:
    code = (f"import shmcast, time; s = shmcast.subscribe({bus_name!r}); "
            "print('ready', flush=True); time.sleep(30)")
    with Bus(bus_name, max_subscribers=1) as bus:
        with python(code) as child:
            bus.publish("x", 1)  # adopt its ring
            with pytest.raises(shmcast.TooManySubscribersError):
                subscribe(bus_name)
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        assert bus.subscriber_count == 0  # at once: the kernel released its place lock
        with subscribe(bus_name) as sub:
            bus.publish("x", 2)
            assert sub.get(timeout=1).payload == 2
        wait_until(lambda: (bus.publish("x", 0), len(entries(bus_name)) == 1)[1], 5,
                   "dead subscriber's ring unlinked")


def test_publish_is_bounded_with_a_stopped_subscriber(bus_name: str) -> None:
    code = f"""
import shmcast
s = shmcast.subscribe({bus_name!r}, slots=8)
print("ready", flush=True)
for e in s: pass
"""
    with Bus(bus_name) as bus, python(code) as child:
        os.kill(child.pid, signal.SIGSTOP)
        worst = 0.0
        for i in range(3000):
            t = time.perf_counter()
            bus.publish("x", i)
            worst = max(worst, time.perf_counter() - t)
        assert worst < 0.05, f"a publish took {worst * 1000:.1f} ms"
        assert bus.dropped == 3000 - 8
        os.kill(child.pid, signal.SIGCONT)


def test_unsubscribe_from_another_thread_wakes_a_blocked_get(bus_name: str) -> None:
    with Bus(bus_name) as bus:
        sub = subscribe(bus_name)
        bus.publish("x", 1)
        result: list[Any] = []

        def reader() -> None:
            try:
                while True:
                    result.append(sub.get().payload)
            except StreamClosed as e:
                result.append((e.reason, time.monotonic()))

        thread = threading.Thread(target=reader)
        thread.start()
        wait_until(lambda: result == [1], 5, "first event")
        time.sleep(0.05)  # let the reader block in get()
        start = time.monotonic()
        sub.unsubscribe()
        thread.join(2)
        assert not thread.is_alive()
        reason, when = result[1]
        assert reason == "unsubscribed"
        assert when - start < 0.1
        sub.unsubscribe()  # idempotent


def test_close_delivers_buffered_events_then_ends(bus_name: str) -> None:
    bus = Bus(bus_name)
    sub = subscribe(bus_name)
    for i in range(5):
        bus.publish("x", i)
    bus.close()
    assert entries(bus_name) == []
    assert [e.payload for e in sub] == [0, 1, 2, 3, 4]
    with pytest.raises(StreamClosed) as info:
        sub.get()
    assert info.value.reason == "bus closed"


def test_async_iteration_and_cancellation(bus_name: str) -> None:
    async def main() -> None:
        with Bus(bus_name) as bus, subscribe(bus_name) as sub:
            async def consume(n: int) -> list[int]:
                out = []
                async for event in sub:
                    out.append(event.payload)
                    if len(out) == n:
                        break
                return out

            task = asyncio.create_task(consume(3))
            await asyncio.sleep(0.05)
            for i in range(3):
                bus.publish("x", i)
            assert await asyncio.wait_for(task, 5) == [0, 1, 2]

            # Cancelling a task blocked in the iteration ends promptly.
            blocked = asyncio.create_task(consume(1))
            await asyncio.sleep(0.05)
            start = time.monotonic()
            blocked.cancel()
            with pytest.raises(asyncio.CancelledError):
                await blocked
            assert time.monotonic() - start < 0.1
            # The stream still works after the cancellation, and loses nothing.
            bus.publish("x", 99)
            assert await asyncio.wait_for(consume(1), 5) == [99]

    asyncio.run(main())


def test_wake_protocol_busy_reader_not_woken_sleeping_reader_not_left(bus_name: str) -> None:
    with Bus(bus_name) as bus, subscribe(bus_name) as sub:
        sem = sub._r.sem
        assert sem is not None
        for i in range(50):  # the reader is busy elsewhere: at most one pending wake
            bus.publish("x", i)
            assert sem.value <= 1
        while True:
            try:
                sub.get_nowait()
            except TimeoutError:
                break
        got: list[float] = []

        def sleeper() -> None:
            got.append(sub.get(timeout=5).timestamp)

        for _ in range(20):  # a sleeping reader is woken by every publish
            thread = threading.Thread(target=sleeper)
            thread.start()
            time.sleep(0.01)
            bus.publish("x", 0)
            thread.join(2)
            assert not thread.is_alive()
        assert len(got) == 20


def _torn_reader(name: str, out: Any) -> None:
    bad = 0
    n = 0
    last = 0
    with subscribe(name, slots=4) as sub:
        out.put("ready")
        for event in sub:
            body = event.data
            crc, rest = int(body[:10]), body[10:]
            if zlib.crc32(rest) != crc or event.version <= last:
                bad += 1
            last = event.version
            n += 1
        out.put((n, sub.dropped, bad))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_no_torn_reads_under_a_fast_publisher(bus_name: str, start: str) -> None:
    ctx = mp.get_context(start)
    out = ctx.Queue()
    rng = random.Random(1)
    procs = [ctx.Process(target=_torn_reader, args=(bus_name, out)) for _ in range(2)]
    with Bus(bus_name, slots=4, slot_size=2048, codec="raw") as bus:
        try:
            for p in procs:
                p.start()
            for _ in procs:
                assert out.get(timeout=30) == "ready"
            for _ in range(20_000):
                rest = rng.randbytes(rng.randrange(0, 2000))
                bus.publish("x", b"%010d" % zlib.crc32(rest) + rest)
            published = bus.version
            bus.close()
            results = [out.get(timeout=30) for _ in procs]
            for p in procs:
                p.join(10)
                assert p.exitcode == 0
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
    for n, dropped, bad in results:
        assert bad == 0
        assert n + dropped == published
        assert n > 0


def test_received_plus_dropped_in_both_overflow_modes(bus_name: str) -> None:
    for overflow in ("overwrite", "drop_new"):
        name = f"{bus_name}-{overflow}"
        with Bus(name, slots=8, overflow=overflow) as bus, subscribe(name) as sub:
            for i in range(100):
                bus.publish("x", i)
            assert sub.dropped == 92
            got = []
            while True:
                try:
                    got.append(sub.get_nowait().version)
                except TimeoutError:
                    break
            assert len(got) + sub.dropped == 100
            assert bus.dropped == sub.dropped
            expect = list(range(93, 101)) if overflow == "overwrite" else list(range(1, 9))
            assert got == expect


def test_event_data_is_the_published_json(bus_name: str) -> None:
    with Bus(bus_name) as bus, subscribe(bus_name) as sub:
        payload = {"members": ["a", "b"], "n": 1, "ü": None}
        before = time.time()
        bus.publish("members", payload)
        event = sub.get(timeout=1)
        assert json.loads(event.data) == payload
        assert event.data == json.dumps(payload, separators=(",", ":"),
                                        ensure_ascii=False).encode()
        assert before <= event.timestamp <= time.time()
