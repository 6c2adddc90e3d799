"""Contract: unsubscribe, close, stream end, blocked readers, async iteration and cancellation."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest
from _contract_helpers import METHODS, Child, bus_entries, from_ranges, wait_until

from shmcast import Bus, StreamClosed, subscribe

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.filterwarnings(r"ignore:This process \(pid=\d+\) is multi-threaded"),
]


def _in_shmcast(thread: threading.Thread) -> bool:
    """True once *thread* is executing inside the shmcast package (i.e. inside get/iter)."""
    frame = sys._current_frames().get(thread.ident)  # type: ignore[arg-type]
    while frame is not None:
        if "shmcast" in frame.f_code.co_filename and "_contract_" not in \
                frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def test_unsubscribe_is_idempotent_and_delivers_buffered_then_ends(bus_name):
    with Bus(bus_name) as bus:
        sub = subscribe(bus_name)
        for i in range(3):
            bus.publish("e", i)
        sub.unsubscribe()
        assert bus.subscriber_count == 0
        sub.unsubscribe()
        sub.close()
        bus.publish("after", "not delivered")  # published after unsubscribe returned
        assert [sub.get(timeout=5).payload for _ in range(3)] == [0, 1, 2]
        t0 = time.monotonic()
        with pytest.raises(StreamClosed):
            sub.get(timeout=5)
        assert time.monotonic() - t0 < 1.0, "StreamClosed should be immediate, not a timeout"
        with pytest.raises(StreamClosed):
            sub.get()
        assert list(sub) == []
        sub.unsubscribe()


@pytest.mark.parametrize("overflow", ["overwrite", "drop_new"])
def test_drops_are_final_after_unsubscribe(bus_name, overflow):
    """received + dropped == published while subscribed, also for a subscription
    ended by unsubscribe with a full ring; later publishes change nothing."""
    with Bus(bus_name, slots=4, overflow=overflow) as bus:
        keep = subscribe(bus_name)  # keeps the bus busy after `sub` leaves
        sub = subscribe(bus_name)
        for _ in range(10):
            bus.publish("e", None)
        sub.unsubscribe()
        assert sub.dropped == 6
        for _ in range(10):
            bus.publish("e", None)
        got = [e.version for e in sub]
        assert got == ([7, 8, 9, 10] if overflow == "overwrite" else [1, 2, 3, 4])
        assert len(got) + sub.dropped == 10
        assert keep.dropped == 16
        assert bus.dropped == 6 + 16
        keep.unsubscribe()


@pytest.mark.parametrize("method", METHODS)
def test_child_unsubscribe_delivers_buffered_then_ends(bus_name, method):
    with Bus(bus_name, slots=4) as bus, \
            Child(method, "sub", name=bus_name, check="v") as ch:
        ch.expect("ready")
        for _ in range(10):
            bus.publish("e", {"v": bus.version + 1})
        ch.send({"op": "unsubscribe"})
        ch.expect("unsubscribed")
        assert bus.subscriber_count == 0
        for _ in range(5):
            bus.publish("e", {"v": bus.version + 1})
        ch.send({"op": "until_closed", "how": "iter"})
        r = ch.expect("closed")
        assert r["nbad"] == 0, r["bad"]
        assert from_ranges(r["ranges"]) == [7, 8, 9, 10]
        assert r["dropped"] == 6
        assert r["again"] == "StreamClosed"
        ch.send({"op": "exit"})
        ch.expect("bye")
        assert ch.wait() == 0


def test_iteration_after_unsubscribe_yields_buffered_then_stops(bus_name):
    with Bus(bus_name) as bus, subscribe(bus_name) as sub:
        for i in range(4):
            bus.publish("e", i)
        sub.unsubscribe()
        assert [e.payload for e in sub] == [0, 1, 2, 3]


def test_with_subscribe_unsubscribes_on_exit(bus_name):
    with Bus(bus_name) as bus:
        with subscribe(bus_name) as sub:
            assert bus.subscriber_count == 1
            bus.publish("e", 1)
        assert bus.subscriber_count == 0
        assert sub.get(timeout=5).payload == 1
        with pytest.raises(StreamClosed):
            sub.get(timeout=5)


def test_with_subscribe_unsubscribes_on_exception(bus_name):
    class Oops(Exception):
        pass

    with Bus(bus_name) as bus:
        with pytest.raises(Oops), subscribe(bus_name):
            raise Oops
        assert bus.subscriber_count == 0


@pytest.mark.parametrize("how", ["get", "get-timeout", "iter"])
def test_unsubscribe_from_another_thread_wakes_blocked_reader_within_100ms(bus_name, how):
    with Bus(bus_name) as bus:
        sub = subscribe(bus_name)
        bus.publish("e", "buffered")
        result: dict = {}

        def reader() -> None:
            events = []
            try:
                events.append(sub.get(timeout=10))  # the buffered one
                if how == "iter":
                    events.extend(sub)
                    result["outcome"] = "iteration ended"
                else:
                    events.append(sub.get(timeout=None if how == "get" else 30))
                    result["outcome"] = "got an event"
            except StreamClosed:
                result["outcome"] = "StreamClosed"
            except BaseException as exc:  # noqa: BLE001
                result["outcome"] = repr(exc)
            result["t"] = time.monotonic()
            result["events"] = [e.payload for e in events]

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        try:
            wait_until(lambda: _in_shmcast(t) or not t.is_alive(), 5, "reader inside shmcast")
            # Let it reach the blocking call; the assertion below holds either way.
            time.sleep(0.05)
            assert t.is_alive()
            t0 = time.monotonic()
            sub.unsubscribe()
            t.join(5)
            assert not t.is_alive(), "reader still blocked 5 s after unsubscribe"
            assert result["outcome"] == ("iteration ended" if how == "iter" else "StreamClosed")
            assert result["events"] == ["buffered"]
            assert result["t"] - t0 < 0.1, f"reader returned {result['t'] - t0:.3f}s after"
        finally:
            sub.unsubscribe()
            t.join(5)


@pytest.mark.parametrize("reader", ["get", "iter"])
def test_close_ends_streams_after_buffered_events_and_removes_everything(bus_name, reader):
    bus = Bus(bus_name, slots=8)
    subs = [subscribe(bus_name), subscribe(bus_name, slots=2)]
    for i in range(5):
        bus.publish("e", i)
    bus.close()
    # close removed everything at once, even with subscribers still attached
    assert bus_entries(bus_name) == []
    for sub, want in zip(subs, ([0, 1, 2, 3, 4], [3, 4]), strict=True):
        if reader == "iter":
            assert [e.payload for e in sub] == want
        else:
            assert [sub.get(timeout=5).payload for _ in want] == want
            with pytest.raises(StreamClosed):
                sub.get(timeout=5)
        sub.unsubscribe()
    bus.close()
    assert bus_entries(bus_name) == []


def test_close_wakes_a_blocked_reader_thread(bus_name):
    bus = Bus(bus_name)
    sub = subscribe(bus_name)
    result: dict = {}

    def reader() -> None:
        try:
            sub.get()
            result["outcome"] = "event"
        except StreamClosed:
            result["outcome"] = "StreamClosed"
        result["t"] = time.monotonic()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        wait_until(lambda: _in_shmcast(t) or not t.is_alive(), 5, "reader inside shmcast")
        t0 = time.monotonic()
        bus.close()
        t.join(3)
        assert not t.is_alive(), "reader still blocked after bus.close()"
        assert result["outcome"] == "StreamClosed"
        assert result["t"] - t0 < 2.0
    finally:
        sub.unsubscribe()
        bus.close()
        t.join(5)


@pytest.mark.parametrize("method", METHODS)
def test_close_ends_child_streams_after_buffered_events(bus_name, method):
    bus = Bus(bus_name, slots=16)
    try:
        with Child(method, "sub", name=bus_name, check="v") as ch:
            ch.expect("ready")
            for _ in range(5):
                bus.publish("e", {"v": bus.version + 1})
            ch.send({"op": "until_closed", "how": "iter"})
            for _ in range(5):
                bus.publish("e", {"v": bus.version + 1})
            bus.close()
            assert bus_entries(bus_name) == []
            r = ch.expect("closed", timeout=10)
            assert r["end"] == "iter_end"
            assert r["again"] == "StreamClosed"
            assert r["nbad"] == 0, r["bad"]
            assert from_ranges(r["ranges"]) == list(range(1, 11))
            assert r["dropped"] == 0
            ch.send({"op": "exit"})
            ch.expect("bye")
            assert ch.wait() == 0
    finally:
        bus.close()
    assert bus_entries(bus_name) == []


# --------------------------------------------------------------------------- asyncio


def test_async_for_receives_without_blocking_the_loop(bus_name):
    with Bus(bus_name) as bus, subscribe(bus_name) as sub:
        ticks = [0]
        publisher_saw_ticks = []

        def publish_when_loop_runs() -> None:
            # Publish only after the loop has ticked while async-for waits:
            # if async-for blocked the loop, ticks would never advance.
            deadline = time.monotonic() + 3
            while ticks[0] < 10 and time.monotonic() < deadline:
                time.sleep(0.005)
            publisher_saw_ticks.append(ticks[0])
            for i in range(5):
                bus.publish("a", i)

        async def main() -> list:
            async def ticker() -> None:
                while True:
                    await asyncio.sleep(0.01)
                    ticks[0] += 1

            tk = asyncio.create_task(ticker())
            got = []
            async for ev in sub:
                got.append(ev)
                if len(got) == 5:
                    break
            tk.cancel()
            return got

        th = threading.Thread(target=publish_when_loop_runs, daemon=True)
        th.start()
        got = asyncio.run(main())
        th.join(5)
        assert publisher_saw_ticks, "publisher thread did not run"
        assert publisher_saw_ticks[0] >= 10, \
            f"event loop blocked while async-for waited (ticks={publisher_saw_ticks})"
        assert [(e.version, e.payload) for e in got] == [(i + 1, i) for i in range(5)]


def test_async_for_ends_with_the_stream(bus_name):
    bus = Bus(bus_name)
    sub = subscribe(bus_name)
    try:
        for i in range(3):
            bus.publish("a", i)

        async def main() -> list:
            out = []
            async for ev in sub:
                out.append(ev.payload)
                if len(out) == 3:
                    bus.close()
            return out

        assert asyncio.run(asyncio.wait_for(main(), 10)) == [0, 1, 2]
    finally:
        sub.unsubscribe()
        bus.close()


def test_cancelling_the_iterating_task_ends_the_wait_promptly(bus_name):
    with Bus(bus_name) as bus, subscribe(bus_name) as sub:
        info: dict = {}

        async def main() -> None:
            got = []

            async def consume() -> None:
                async for ev in sub:
                    got.append(ev)

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.2)  # the loop runs: async-for is waiting, not blocking
            assert not task.done()
            t0 = time.monotonic()
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2)
            info["cancel_s"] = time.monotonic() - t0
            info["cancelled"] = task in done and task.cancelled()
            info["got"] = got
            info["t_main_end"] = time.monotonic()

        runner_done = threading.Event()

        def run() -> None:
            try:
                asyncio.run(main())
            finally:
                runner_done.set()

        th = threading.Thread(target=run, daemon=True)
        th.start()
        try:
            # asyncio.run also waits for the default executor: a get() left
            # blocked in a worker thread would hold it up here.
            finished = runner_done.wait(5)
            assert finished, "asyncio.run did not return: the cancelled wait is still blocked"
            assert info["cancelled"], info
            assert info["cancel_s"] < 0.5, info
            assert info["got"] == []
            # The cancelled wait did not leave a reader behind that steals events.
            v = bus.publish("after-cancel", 1)
            ev = sub.get(timeout=5)
            assert ev.version == v
            assert sub.dropped == 0
        finally:
            sub.unsubscribe()
            th.join(5)
