"""Contract: in-process fan-out, ``Hub`` and ``Feed`` (one subscription per process).

Every line of the contract's Hub section: opening feeds, overflow in both modes
with exact counts, the hub's ring losses reaching every open feed, history and
resume, ``latest``, the ends (``hub.close``, bus closed, publisher SIGKILLed),
cancellation, threads and tasks at once, fork, publishers in forked, spawned
and ``python -c`` processes, and 10,000 async feeds on a constant thread count.

Some tests hold the hub's lock (``hub._c.lock``) to stop its reader thread at a
known point: the only way to make its ring overflow deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import pytest

import shmcast
from shmcast import (
    Bus,
    BusNotFoundError,
    DecodeError,
    Event,
    Feed,
    Hub,
    StreamClosed,
)

pytestmark = pytest.mark.timeout(60)


def wait_until(predicate: Callable[[], object], timeout: float = 5.0,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def drain(feed: Feed, timeout: float = 5.0) -> tuple[list[Event], str]:
    """Every event until the end; and the end's reason."""
    got = []
    while True:
        try:
            got.append(feed.get(timeout=timeout))
        except StreamClosed as e:
            return got, e.reason


def versions(events: list[Event]) -> list[int]:
    return [e.version for e in events]


def check_counting(events: list[Event], dropped: int, start: int, end: int) -> None:
    """The contract's counting rule for a feed open over versions (start, end]."""
    vs = versions(events)
    assert vs == sorted(set(vs)), "versions not strictly increasing"
    assert all(start < v <= end for v in vs), (start, end, vs[:3], vs[-3:])
    assert len(vs) + dropped == end - start, (len(vs), dropped, start, end)


@contextlib.contextmanager
def held(hub: Hub) -> Iterator[None]:
    """Stop the hub's reader thread at its next fan-out (so its ring fills)."""
    with hub._c.lock:
        yield


# --- the surface ------------------------------------------------------------------------
def test_public_names() -> None:
    assert shmcast.Hub is Hub
    assert shmcast.Feed is Feed
    assert Hub.__module__ == Feed.__module__ == "shmcast"
    assert {"Hub", "Feed"} <= set(shmcast.__all__)
    assert issubclass(Feed, shmcast._stream.Stream)
    assert issubclass(shmcast.Subscription, shmcast._stream.Stream)


def test_bad_arguments_and_missing_bus(bus_name: str) -> None:
    threads = threading.active_count()
    with pytest.raises(BusNotFoundError):
        Hub(bus_name)
    with pytest.raises(ValueError, match="invalid bus name"):
        Hub("no/slash")
    with Bus(bus_name) as bus:
        for kwargs, exc in [({"buffer": 0}, ValueError), ({"buffer": 1.5}, TypeError),
                            ({"history": -1}, ValueError), ({"overflow": "nope"}, ValueError),
                            ({"slots": 0}, ValueError)]:
            with pytest.raises(exc):
                Hub(bus_name, **kwargs)
        assert bus.subscriber_count == 0
        assert threading.active_count() == threads, "a failed Hub left a thread"
        with Hub(bus_name) as hub:
            with pytest.raises(ValueError, match="buffer"):
                hub.subscribe(buffer=0)
            with pytest.raises(ValueError, match="since"):
                hub.subscribe(since=-1)
            with pytest.raises(TypeError):
                hub.subscribe(since="7")  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                hub.subscribe(since=True)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                hub.latest(1)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                pickle.dumps(hub)
            with hub.subscribe() as feed:
                with pytest.raises(TypeError):
                    pickle.dumps(feed)
                assert "open" in repr(feed)
                assert "open" in repr(hub)
                with pytest.raises(ValueError, match="timeout"):
                    feed.get(timeout=-1)
                with pytest.raises(TimeoutError):
                    feed.get_nowait()
                t0 = time.monotonic()
                with pytest.raises(TimeoutError):
                    feed.get(timeout=0.05)
                assert time.monotonic() - t0 < 1


def test_hub_is_one_subscriber_and_feeds_are_local(bus_name: str) -> None:
    with Bus(bus_name, max_subscribers=1) as bus, Hub(bus_name) as hub:
        assert bus.subscriber_count == 1
        assert hub.version == 0
        assert hub.dropped == 0
        assert hub.subscriber_count == 0
        feeds = [hub.subscribe() for _ in range(200)]  # past max_subscribers: no limit
        assert hub.subscriber_count == 200
        assert bus.subscriber_count == 1
        for i in range(3):
            bus.publish("tick", {"i": i})
        for feed in feeds:
            got = [feed.get(timeout=5) for _ in range(3)]
            assert [e.payload for e in got] == [{"i": 0}, {"i": 1}, {"i": 2}]
            assert versions(got) == [1, 2, 3]
            assert got[0].data == b'{"i":0}' or got[0].data.replace(b" ", b"") == b'{"i":0}'
        assert hub.version == 3
        for feed in feeds[:50]:
            feed.close()
        assert hub.subscriber_count == 150
        del feed, feeds
        gc.collect()  # a feed nobody holds any more is closed
        assert hub.subscriber_count == 0


def test_a_feed_gets_only_what_was_published_while_it_was_open(bus_name: str) -> None:
    with Bus(bus_name) as bus, Hub(bus_name) as hub:
        for _ in range(5):
            bus.publish("before")
        wait_until(lambda: hub.version == 5, what="the hub to receive")
        feed = hub.subscribe()
        start = bus.version
        for _ in range(5):
            bus.publish("after")
        end = bus.version
        feed.close()
        bus.publish("too late")
        got, reason = drain(feed)
        assert reason == "unsubscribed"
        assert [e.type for e in got] == ["after"] * 5
        check_counting(got, feed.dropped, start, end)


def test_feeds_iterate_sync_and_async_and_with(bus_name: str) -> None:
    with Bus(bus_name) as bus, Hub(bus_name) as hub:
        with hub.subscribe() as feed:
            bus.publish("a", 1)
            bus.publish("b", 2)
            seen = []
            for event in feed:
                seen.append(event.type)
                if len(seen) == 2:
                    break
            assert seen == ["a", "b"]
        assert feed.closed
        assert list(feed) == []

        async def main() -> list[str]:
            out = []
            async with contextlib.AsyncExitStack() as stack:
                f = stack.enter_context(hub.subscribe())
                bus.publish("c", 3)
                bus.publish("d", 4)
                async for event in f:
                    out.append(event.type)
                    if len(out) == 2:
                        f.close()  # the iteration ends after what is buffered
            return out

        assert asyncio.run(main()) == ["c", "d"]


# --- overflow -----------------------------------------------------------------------------
@pytest.mark.parametrize("overflow", ["overwrite", "drop_new"])
def test_a_full_feed_drops_by_its_policy_with_exact_counts(bus_name: str, overflow: str) -> None:
    with Bus(bus_name, slots=256) as bus, Hub(bus_name, buffer=4, overflow=overflow) as hub:
        slow = hub.subscribe()
        small = hub.subscribe(buffer=2)
        reader = hub.subscribe(buffer=1000)
        start = bus.version
        for i in range(30):
            bus.publish("n", i)
        end = bus.version
        wait_until(lambda: hub.version == end, what="the hub to receive")
        # The one that reads keeps everything, whatever the others do.
        assert versions([reader.get(timeout=5) for _ in range(30)]) == list(range(1, 31))
        assert reader.dropped == 0
        assert slow.dropped == 26
        assert small.dropped == 28
        slow.close()
        small.close()
        got_slow, _ = drain(slow)
        got_small, _ = drain(small)
        if overflow == "overwrite":  # the oldest unread events went
            assert versions(got_slow) == [27, 28, 29, 30]
            assert versions(got_small) == [29, 30]
        else:  # the new ones went
            assert versions(got_slow) == [1, 2, 3, 4]
            assert versions(got_small) == [1, 2]
        check_counting(got_slow, slow.dropped, start, end)
        check_counting(got_small, small.dropped, start, end)
        assert hub.dropped == 26 + 28
        assert bus.dropped == 0  # the hub's own ring lost nothing


def test_a_feed_that_never_reads_slows_nobody(bus_name: str) -> None:
    n = 3000
    with Bus(bus_name, slots=4096) as bus, Hub(bus_name, buffer=n) as hub:
        stuck = [hub.subscribe(buffer=1) for _ in range(20)]
        reader = hub.subscribe()
        got: list[Event] = []
        t = threading.Thread(target=lambda: got.extend(reader.get(timeout=10) for _ in range(n)))
        t.start()
        t0 = time.monotonic()
        for i in range(n):
            bus.publish("n", i)
        t.join(30)
        assert not t.is_alive()
        assert versions(got) == list(range(1, n + 1))
        assert time.monotonic() - t0 < 20
        assert all(f.dropped == n - 1 for f in stuck)
        assert hub.dropped == 20 * (n - 1)


# --- the hub's ring losses ----------------------------------------------------------------
@pytest.mark.parametrize("bus_overflow", ["overwrite", "drop_new"])
def test_losses_of_the_hubs_ring_count_for_every_open_feed(bus_name: str,
                                                           bus_overflow: str) -> None:
    with Bus(bus_name, slots=64, overflow=bus_overflow) as bus, \
            Hub(bus_name, slots=4, buffer=1000) as hub:
        early = [hub.subscribe() for _ in range(3)]
        start = bus.version
        with held(hub):  # the reader thread stops; its ring of 4 overflows
            for i in range(50):
                bus.publish("burst", i)
        for i in range(10):
            bus.publish("after", i)
        end = bus.version
        wait_until(lambda: bus.dropped > 0, what="the hub's ring to drop")
        if bus_overflow == "overwrite":
            wait_until(lambda: hub.version == end, what="the hub to catch up")
        late = hub.subscribe()  # opened after the burst: none of its losses are its own
        late_start = bus.version
        bus.publish("last")
        wait_until(lambda: hub.version == bus.version or bus_overflow == "drop_new",
                   what="the last event")
        bus.close()  # drop_new: the lost events are the newest; counted when the hub ends
        results = [drain(f) for f in [*early, late]]
        final = bus.version
        for feed, (got, reason) in zip([*early, late], results, strict=True):
            assert reason == "bus closed"
            s = late_start if feed is late else start
            check_counting(got, feed.dropped, s, final)
        lost = results[0][0]
        assert early[0].dropped > 0
        assert all(versions(r[0]) == versions(lost) for r in results[:3]), \
            "feeds open at the time saw different events"
        assert all(f.dropped == early[0].dropped for f in early)
        assert hub.dropped == sum(f.dropped for f in [*early, late])


def test_undecodable_events_reach_each_feed_as_decode_error(bus_name: str) -> None:
    class Picky:
        name = "picky"

        @staticmethod
        def dumps(obj: object) -> bytes:
            return repr(obj).encode()

        @staticmethod
        def loads(data: bytes) -> object:
            if data == b"'bad'":
                raise ValueError("refused")
            return data.decode()

    with Bus(bus_name, codec=Picky()) as bus, Hub(bus_name, codec=Picky()) as hub:
        feeds = [hub.subscribe() for _ in range(3)]
        for payload in ("ok", "bad", "fine"):
            bus.publish("p", payload)
        for feed in feeds:
            assert feed.get(timeout=5).payload == "'ok'"
            with pytest.raises(DecodeError) as info:
                feed.get(timeout=5)
            assert (info.value.version, info.value.type, info.value.data) == (2, "p", b"'bad'")
            assert feed.dropped == 1
            assert feed.get(timeout=5).payload == "'fine'"  # the stream goes on
        assert hub.dropped == 3

        async def in_a_task() -> None:
            f = hub.subscribe()
            bus.publish("p", "bad")
            with pytest.raises(DecodeError):
                await f.__anext__()
            bus.publish("p", "good")
            assert (await f.__anext__()).payload == "'good'"

        asyncio.run(in_a_task())


# --- history, resume, latest --------------------------------------------------------------
def test_resume_since_delivers_what_was_missed_then_live_without_duplicate(bus_name: str) -> None:
    with Bus(bus_name) as bus, Hub(bus_name, history=100, buffer=200) as hub:
        for i in range(20):
            bus.publish("n", i)
        wait_until(lambda: hub.version == 20, what="the hub to receive")
        feed = hub.subscribe(since=12)
        for i in range(5):
            bus.publish("n", 20 + i)
        got = [feed.get(timeout=5) for _ in range(13)]
        assert versions(got) == list(range(13, 26))
        assert [e.payload for e in got] == list(range(12, 25))
        assert feed.dropped == 0
        # Nothing missed, and an id from an earlier bus of this name: live from now.
        for since in (25, 10_000):
            f = hub.subscribe(since=since)
            bus.publish("n")
            assert f.get(timeout=5).version == bus.version
            assert f.dropped == 0
        # since=0 on a hub that kept everything: the whole history.
        assert versions([hub.subscribe(since=0).get(timeout=5)]) == [1]


def test_resume_past_the_history_counts_the_gap_at_once(bus_name: str) -> None:
    with Bus(bus_name) as bus, Hub(bus_name, history=5) as hub:
        for i in range(20):
            bus.publish("n", i)
        wait_until(lambda: hub.version == 20, what="the hub to receive")
        feed = hub.subscribe(since=5)
        assert feed.dropped == 10  # versions 6 to 15 are no longer kept
        assert hub.dropped == 10
        bus.publish("n", 20)
        got = [feed.get(timeout=5) for _ in range(6)]
        assert versions(got) == [16, 17, 18, 19, 20, 21]
        feed.close()
        check_counting(got, feed.dropped, 5, bus.version)
        # Without history, every version after `since` counts.
        with Hub(bus_name) as bare:
            bus.publish("n")
            wait_until(lambda: bare.version == bus.version, what="the second hub")
            f = bare.subscribe(since=bus.version - 3)
            assert f.dropped == 3


def test_resume_under_concurrent_publishing_has_no_hole_and_no_duplicate(bus_name: str) -> None:
    total = 4000
    with Bus(bus_name, slots=4096) as bus, \
            Hub(bus_name, history=total, buffer=total) as hub:
        done = threading.Event()

        def publish() -> None:
            for i in range(total):
                bus.publish("n", i)
                if i % 20 == 0:
                    time.sleep(0.001)
            done.set()

        t = threading.Thread(target=publish)
        t.start()
        feeds: list[tuple[int, Feed]] = []
        while not done.is_set():
            since = max(0, hub.version - 30)
            feeds.append((since, hub.subscribe(since=since)))
            time.sleep(0.002)
        t.join(30)
        wait_until(lambda: hub.version == total, what="the hub to receive")
        bus.close()
        assert len(feeds) > 10
        for since, feed in feeds:
            got, _ = drain(feed)
            assert versions(got) == list(range(since + 1, total + 1)), since
            assert feed.dropped == 0


def _sid(i: int) -> str:
    """The type of stream entry *i*, as a bridge publishes it (shmcast.in:<id>:<origin>:<type>)."""
    return f"shmcast.in:{1000 + i}-0:h1:ev"


def test_resume_by_stream_id_delivers_what_was_missed_then_live(bus_name: str) -> None:
    """since="<ms>-<seq>": from the first stream event after the id, local ones among them,
    then live; stream events up to the id that arrive late (this host's bridge is behind
    the client's host) are skipped, not delivered twice."""
    with Bus(bus_name) as bus, Hub(bus_name, history=100, buffer=200) as hub:
        for i in range(10):
            bus.publish(_sid(i), i)
            bus.publish("local", i)
        wait_until(lambda: hub.version == 20, what="the hub to receive")
        feed = hub.subscribe(since="1004-0")
        got = [feed.get(timeout=5) for _ in range(10)]
        assert [(e.type, e.payload) for e in got] == [
            (t, i) for i in range(5, 10) for t in (_sid(i), "local")]
        bus.publish(_sid(10), 10)
        assert feed.get(timeout=5).type == _sid(10)
        assert feed.dropped == 0
        # An id this hub has not received yet: the entries up to it are skipped as they come.
        ahead = hub.subscribe(since="1012-0")
        for i in (11, 12, 13):
            bus.publish(_sid(i), i)
        assert ahead.get(timeout=5).type == _sid(13)
        assert ahead.dropped == 0
        # The newest id: nothing missed, live.
        now = hub.subscribe(since="1013-0")
        bus.publish(_sid(14), 14)
        assert now.get(timeout=5).type == _sid(14)
        assert now.dropped == 0
        # Versions are untouched: since=20 still means bus version 20.
        assert hub.subscribe(since=20).get(timeout=5).version == 21


@pytest.mark.parametrize("one_batch", [False, True])
def test_resume_by_stream_id_past_the_history_counts_the_gap(bus_name: str,
                                                             one_batch: bool) -> None:
    """An id whose followers are no longer kept: they count as drops at once, exactly while
    the hub remembers an id at or before it (the types of KEY_SPAN x history events that
    left the history), else at least one."""
    from shmcast._hub import KEY_SPAN

    with Bus(bus_name) as bus, Hub(bus_name, history=5) as hub:
        total = 5 + 5 * KEY_SPAN + 10  # kept, remembered, forgotten altogether
        # one_batch: the hub's reader is held, so all come in one batch longer than the history.
        with held(hub) if one_batch else contextlib.nullcontext():
            for i in range(total):
                bus.publish(_sid(i), i)
        wait_until(lambda: hub.version == total, what="the hub to receive")
        kept = list(range(total - 5, total))
        for since in (total - 5 - 1, total - 10, 5 + 5 * KEY_SPAN - 5):
            feed = hub.subscribe(since=f"{1000 + since}-0")
            got = [feed.get(timeout=5).payload for _ in range(5)]
            assert got == kept
            # Exact: received + dropped == the entries after the id.
            assert len(got) + feed.dropped == total - 1 - since, (since, feed.dropped)
            feed.close()
        # Older than every id the hub remembers: a gap of unknown size, counted as the
        # stream events it remembers (at least one).
        feed = hub.subscribe(since="1003-0")
        assert [feed.get(timeout=5).payload for _ in range(5)] == kept
        assert feed.dropped == 5 * KEY_SPAN
        with Hub(bus_name, history=5) as fresh:  # received nothing yet: at least one
            assert fresh.subscribe(since="1003-0").dropped == 1
        with Hub(bus_name) as bare, pytest.raises(ValueError, match="history"):
            bare.subscribe(since="1003-0")
        for bad in ("abc", "7", "1-2-3", "1-", " 1-2"):
            with pytest.raises(TypeError):
                hub.subscribe(since=bad)


def test_latest_is_kept_whatever_history_is(bus_name: str) -> None:
    with Bus(bus_name) as bus, Hub(bus_name) as hub:
        assert hub.latest("members") is None
        bus.publish("members", {"gen": 1})
        bus.publish("heartbeat", 1)
        bus.publish("members", {"gen": 2})
        bus.publish("heartbeat", 2)
        wait_until(lambda: hub.version == 4, what="the hub to receive")
        latest = hub.latest("members")
        assert latest is not None
        assert (latest.payload, latest.version) == ({"gen": 2}, 3)
        assert hub.latest("heartbeat").version == 4  # type: ignore[union-attr]
        assert hub.latest("other") is None


# --- ends -------------------------------------------------------------------------------
def test_hub_close_ends_every_feed_after_its_buffered_events(bus_name: str) -> None:
    with Bus(bus_name) as bus:
        hub = Hub(bus_name)
        feeds = [hub.subscribe() for _ in range(3)]
        blocked: list[object] = []
        waiter = hub.subscribe()

        def wait() -> None:
            try:
                waiter.get(timeout=10)
            except StreamClosed as e:
                blocked.append((e.reason, time.monotonic()))

        for i in range(3):
            bus.publish("n", i)
        wait_until(lambda: hub.version == 3, what="the hub to receive")
        assert waiter.get(timeout=1).version == 1
        assert waiter.get(timeout=1).version == 2
        assert waiter.get(timeout=1).version == 3
        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.05)
        t0 = time.monotonic()
        hub.close()
        hub.close()  # idempotent
        t.join(5)
        assert blocked
        assert blocked[0][0] == "unsubscribed"
        assert blocked[0][1] - t0 < 0.1  # type: ignore[index]
        assert hub.closed
        assert all(f.closed for f in feeds)
        assert bus.subscriber_count == 0  # the hub left the bus
        for feed in feeds:
            got, reason = drain(feed)
            assert versions(got) == [1, 2, 3]
            assert reason == "unsubscribed"
        with pytest.raises(StreamClosed):
            hub.subscribe()
        assert f"shmcast-hub-{bus_name}" not in {t.name for t in threading.enumerate()}


def test_bus_close_ends_every_feed(bus_name: str) -> None:
    bus = Bus(bus_name)
    hub = Hub(bus_name)
    feed = hub.subscribe()
    ends: list[tuple[str, float]] = []

    async def wait() -> None:
        f = hub.subscribe()
        async for _ in f:
            pass
        try:
            f.get_nowait()
        except StreamClosed as e:
            ends.append((e.reason, time.monotonic()))

    t = threading.Thread(target=asyncio.run, args=(wait(),))
    t.start()
    bus.publish("n")
    wait_until(lambda: hub.version == 1, what="the hub to receive")
    time.sleep(0.05)
    t0 = time.monotonic()
    bus.close()
    t.join(5)
    assert ends
    assert ends[0][0] == "bus closed"
    assert ends[0][1] - t0 < 0.5
    got, reason = drain(feed)
    assert versions(got) == [1]
    assert reason == "bus closed"
    assert hub.closed
    hub.close()


PUBLISHER = textwrap.dedent("""
    import sys, time, shmcast
    name, count = sys.argv[1], int(sys.argv[2])
    bus = shmcast.Bus(name, slots=max(64, count + 8))
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(count):
        bus.publish("n", i)
    print("published", bus.version, flush=True)
    if sys.stdin.readline().strip() == "close":
        bus.close()
    else:
        time.sleep(60)
""")


@contextlib.contextmanager
def python_publisher(name: str, count: int) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, name, str(count)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()  # type: ignore[union-attr]


def test_publisher_sigkilled_ends_every_feed_within_two_seconds(bus_name: str) -> None:
    with python_publisher(bus_name, 5) as proc:
        hub = Hub(bus_name)
        feeds = [hub.subscribe() for _ in range(3)]
        proc.stdin.write("go\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        assert proc.stdout.readline().split() == ["published", "5"]  # type: ignore[union-attr]
        wait_until(lambda: hub.version == 5, what="the hub to receive")
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for feed in feeds:
            got, reason = drain(feed, timeout=10)
            assert versions(got) == [1, 2, 3, 4, 5]
            assert reason == "publisher died"
        assert time.monotonic() - t0 < 2.0
        hub.close()
    wait_until(lambda: not os.path.exists(f"/dev/shm/shmcast.{bus_name}"), 5,
               "the dead bus to be reclaimed by the hub leaving it")


def _role_publisher(name: str, count: int, ready: object, go: object, close: object) -> None:
    bus = Bus(name, slots=max(64, count + 8))
    ready.set()  # type: ignore[attr-defined]
    go.wait(20)  # type: ignore[attr-defined]
    for i in range(count):
        bus.publish("n", i)
    close.wait(20)  # type: ignore[attr-defined]
    bus.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "python-c"])
def test_publisher_in_another_process(bus_name: str, method: str) -> None:
    count = 200
    if method == "python-c":
        with python_publisher(bus_name, count) as proc, Hub(bus_name, buffer=count) as hub:
            feeds = [hub.subscribe() for _ in range(3)]
            proc.stdin.write("go\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            assert proc.stdout.readline().split() == ["published", str(count)]  # type: ignore[union-attr]
            proc.stdin.write("close\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            results = [drain(f, timeout=10) for f in feeds]
            assert proc.wait(10) == 0
    else:
        ctx = multiprocessing.get_context(method)
        ready, go, close = ctx.Event(), ctx.Event(), ctx.Event()
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork() in a process with threads (pytest's).
            warnings.simplefilter("ignore", DeprecationWarning)
            proc = ctx.Process(target=_role_publisher, args=(bus_name, count, ready, go, close))
            proc.start()
        try:
            assert ready.wait(30)
            with Hub(bus_name, buffer=count) as hub:
                feeds = [hub.subscribe() for _ in range(3)]
                go.set()
                wait_until(lambda: hub.version == count, 20, "the events")
                close.set()
                results = [drain(f, timeout=10) for f in feeds]
            proc.join(20)
            assert proc.exitcode == 0
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join(10)
    for got, reason in results:
        assert versions(got) == list(range(1, count + 1))
        assert [e.payload for e in got] == list(range(count))
        assert reason == "bus closed"


def _role_hub_reader(name: str, count: int, out: object) -> None:
    """A process with one Hub and three feeds (one read by a task): what each received."""
    with Hub(name, buffer=count) as hub:
        feeds = [hub.subscribe() for _ in range(3)]
        threads = threading.active_count()
        out.put("ready")  # type: ignore[attr-defined]

        async def read_async(f: Feed) -> list[int]:
            return [e.version async for e in f]

        got = [[e.version for e in feeds[0]], [e.version for e in feeds[1]],
               asyncio.run(read_async(feeds[2]))]
        out.put((got, [f.dropped for f in feeds], threads))  # type: ignore[attr-defined]


HUB_READER = textwrap.dedent("""
    import asyncio, json, sys, threading, shmcast
    name, count = sys.argv[1], int(sys.argv[2])
    with shmcast.Hub(name, buffer=count) as hub:
        feeds = [hub.subscribe() for _ in range(3)]
        threads = threading.active_count()
        print("ready", flush=True)
        async def read_async(f):
            return [e.version async for e in f]
        got = [[e.version for e in feeds[0]], [e.version for e in feeds[1]],
               asyncio.run(read_async(feeds[2]))]
        print(json.dumps([got, [f.dropped for f in feeds], threads]), flush=True)
""")


@pytest.mark.parametrize("method", ["fork", "spawn", "python-c"])
def test_a_hub_in_another_process(bus_name: str, method: str) -> None:
    count = 300
    with Bus(bus_name, slots=512) as bus:
        if method == "python-c":
            proc = subprocess.Popen([sys.executable, "-c", HUB_READER, bus_name, str(count)],
                                    stdout=subprocess.PIPE, text=True)
            try:
                assert proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
                for i in range(count):
                    bus.publish("n", i)
                bus.close()
                got, dropped, threads = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
                assert proc.wait(10) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)
                proc.stdout.close()  # type: ignore[union-attr]
        else:
            ctx = multiprocessing.get_context(method)
            out = ctx.Queue()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads
                proc = ctx.Process(target=_role_hub_reader, args=(bus_name, count, out))
                proc.start()
            try:
                assert out.get(timeout=30) == "ready"
                for i in range(count):
                    bus.publish("n", i)
                bus.close()
                got, dropped, threads = out.get(timeout=30)
                proc.join(20)
                assert proc.exitcode == 0
            finally:
                if proc.is_alive():
                    proc.kill()
                    proc.join(10)
                out.close()
                out.join_thread()
    for versions_, d in zip(got, dropped, strict=True):
        assert versions_ == list(range(1, count + 1))
        assert d == 0
    assert threads == 2  # the main thread and the hub's reader, however many feeds


# --- threads, tasks, signals ------------------------------------------------------------------
def test_threads_and_tasks_read_feeds_at_once(bus_name: str) -> None:
    n = 2000
    with Bus(bus_name, slots=4096) as bus, Hub(bus_name, buffer=n) as hub:
        results: dict[str, list[int]] = {}
        errors: list[BaseException] = []

        def thread_reader(key: str, feed: Feed) -> None:
            try:
                results[key] = [e.version for e in feed]
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        async def task_reader(key: str, feed: Feed) -> None:
            results[key] = [e.version async for e in feed]

        async def loop_main(feeds: list[Feed], tag: str) -> None:
            await asyncio.gather(*(task_reader(f"{tag}{i}", f) for i, f in enumerate(feeds)))

        threads = [threading.Thread(target=thread_reader, args=(f"t{i}", hub.subscribe()))
                   for i in range(4)]
        threads += [threading.Thread(target=asyncio.run,
                                     args=(loop_main([hub.subscribe() for _ in range(50)],
                                                     f"loop{j}-"),))
                    for j in range(2)]
        for t in threads:
            t.start()
        for i in range(n):
            bus.publish("n", i)
        wait_until(lambda: hub.version == n, 20, "the events")
        hub.close()
        for t in threads:
            t.join(20)
        assert not errors, errors
        assert len(results) == 4 + 100
        assert all(v == list(range(1, n + 1)) for v in results.values())


def test_several_threads_reading_one_feed_all_get_stream_closed(bus_name: str) -> None:
    n = 3000
    with Bus(bus_name, slots=4096) as bus, Hub(bus_name, buffer=n) as hub:
        feed = hub.subscribe()
        got: list[list[int]] = [[] for _ in range(6)]
        ends: list[BaseException] = []

        def read(i: int) -> None:
            try:
                while True:
                    got[i].append(feed.get(timeout=10).version)
            except BaseException as e:  # noqa: BLE001
                ends.append(e)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for i in range(n):
            bus.publish("n", i)
        wait_until(lambda: hub.version == n, 20, "the events")
        feed.close()
        for t in threads:
            t.join(20)
        assert len(ends) == 6, ends
        assert all(type(e) is StreamClosed for e in ends), ends
        merged = sorted(v for g in got for v in g)
        assert merged == list(range(1, n + 1))  # each event to exactly one thread
        assert all(g == sorted(g) for g in got)


def test_close_from_a_signal_handler_while_the_thread_waits(bus_name: str) -> None:
    with Bus(bus_name) as bus, Hub(bus_name) as hub:
        for target in ("feed", "hub"):
            feed = hub.subscribe() if target == "feed" else Hub(bus_name).subscribe()
            obj = feed if target == "feed" else feed._hub

            def handler(signum: int, frame: object, obj: object = obj) -> None:
                obj.close()  # type: ignore[attr-defined]

            old = signal.signal(signal.SIGUSR1, handler)
            try:
                main = threading.get_ident()
                timer = threading.Timer(0.1, signal.pthread_kill, (main, signal.SIGUSR1))
                timer.start()
                t0 = time.monotonic()
                with pytest.raises(StreamClosed):  # noqa: PT012
                    while True:
                        feed.get(timeout=5)
                assert time.monotonic() - t0 < 1.0
                timer.join()
            finally:
                signal.signal(signal.SIGUSR1, old)
        bus.publish("still works")
        with hub.subscribe() as f:
            bus.publish("n")
            assert f.get(timeout=5).type == "n"


def test_close_from_a_signal_handler_that_interrupted_a_holder_of_the_lock(
        bus_name: str) -> None:
    with Bus(bus_name) as bus:
        hub = Hub(bus_name)
        feed = hub.subscribe()
        other = hub.subscribe()
        took: list[float] = []

        def handler(signum: int, frame: object) -> None:
            t0 = time.monotonic()
            other.close()
            hub.close()
            took.append(time.monotonic() - t0)

        old = signal.signal(signal.SIGUSR1, handler)
        try:
            with held(hub):  # this thread is inside the hub when the signal comes
                signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
                time.sleep(0.01)
            assert took, "the handler did not run"
            assert took[0] < 0.1
            t0 = time.monotonic()
            with pytest.raises(StreamClosed):
                feed.get(timeout=5)
            assert time.monotonic() - t0 < 0.5
            assert bus.subscriber_count == 0
        finally:
            signal.signal(signal.SIGUSR1, old)


def test_a_closed_feed_wakes_its_waiters_within_100_ms_and_gets_what_was_published(
        bus_name: str) -> None:
    with Bus(bus_name) as bus, Hub(bus_name) as hub:
        feed = hub.subscribe()
        out: list[object] = []

        def wait() -> None:
            try:
                while True:
                    out.append(feed.get(timeout=10).version)
            except StreamClosed:
                out.append(time.monotonic())

        t = threading.Thread(target=wait)
        t.start()
        for _ in range(5):
            bus.publish("n")
        feed.close()  # right after publishing: in flight events still come, or count
        t0 = time.monotonic()
        bus.publish("after")
        t.join(5)
        assert out[-1] - t0 < 0.1  # type: ignore[operator]
        check_counting([Event("n", None, v, 0.0) for v in out[:-1]],  # type: ignore[arg-type]
                       feed.dropped, 0, 5)


def test_a_feed_closed_while_the_hub_lags_gets_the_events_published_before(
        bus_name: str) -> None:
    with Bus(bus_name) as bus, Hub(bus_name) as hub:
        # The hub catches up within the grace: the events come, then the end.
        feed = hub.subscribe()
        with held(hub):
            for i in range(3):
                bus.publish("n", i)
            feed.close()
            assert hub.subscriber_count == 0  # closed at once, though still draining
        got, reason = drain(feed)
        assert (versions(got), feed.dropped, reason) == ([1, 2, 3], 0, "unsubscribed")
        # It does not: a reader waiting on the feed ends within 100 ms, and the events
        # that could not come are counted as dropped (sync and async).
        for how in ("thread", "task"):
            feed = hub.subscribe()
            start = bus.version
            ends: list[float] = []
            with held(hub):
                for i in range(3):
                    bus.publish("n", i)
                feed.close()
                t0 = time.monotonic()
                if how == "thread":
                    with pytest.raises(StreamClosed):
                        feed.get(timeout=5)
                else:
                    async def wait(f: Feed = feed) -> None:
                        async for _ in f:
                            raise AssertionError("an event came through a held hub")

                    asyncio.run(wait())
                ends.append(time.monotonic() - t0)
            assert ends[0] < 0.25, ends  # the 50 ms grace, and room for a loaded machine
            assert feed.dropped == 3
            check_counting([], feed.dropped, start, bus.version)
        assert hub.dropped == 6


def test_cancelling_a_waiting_task_is_prompt_and_loses_no_event(bus_name: str) -> None:
    with Bus(bus_name) as bus, Hub(bus_name, buffer=10_000) as hub:
        feed = hub.subscribe()

        async def main() -> list[int]:
            task = asyncio.ensure_future(feed.__anext__())
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - t0 < 0.1
            # Cancel again and again while events arrive: every one stays in the feed.
            got: list[int] = []
            for i in range(300):
                task = asyncio.ensure_future(feed.__anext__())
                await asyncio.sleep(0)
                bus.publish("n", i)
                if i % 2:
                    await asyncio.sleep(0.0005)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    got.append((await task).version)
            while len(got) < 300:
                got.append((await asyncio.wait_for(feed.__anext__(), 5)).version)
            return got

        assert asyncio.run(main()) == list(range(1, 301))
        assert feed.dropped == 0


def test_ten_thousand_async_feeds_on_a_constant_thread_count(bus_name: str) -> None:
    n_feeds, n_events = 10_000, 3
    with Bus(bus_name) as bus, Hub(bus_name) as hub:
        threads = threading.active_count()

        async def main() -> list[list[int]]:
            feeds = [hub.subscribe() for _ in range(n_feeds)]
            assert threading.active_count() == threads

            async def read(f: Feed) -> list[int]:
                out = []
                async for e in f:
                    out.append(e.version)
                    if len(out) == n_events:
                        break
                return out

            tasks = [asyncio.ensure_future(read(f)) for f in feeds]
            await asyncio.sleep(0.1)  # every task now waits on its feed
            assert threading.active_count() == threads
            for i in range(n_events):
                bus.publish("n", i)
            out = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            assert threading.active_count() == threads
            for f in feeds:
                f.close()
            return out

        out = asyncio.run(main())
        assert all(v == [1, 2, 3] for v in out)
        assert hub.subscriber_count == 0


def test_feeds_read_from_several_event_loops(bus_name: str) -> None:
    with Bus(bus_name) as bus, Hub(bus_name) as hub:
        out: dict[int, list[int]] = {}

        async def read(j: int) -> None:
            feeds = [hub.subscribe() for _ in range(20)]
            res = await asyncio.gather(*(asyncio.wait_for(f.__anext__(), 10) for f in feeds))
            out[j] = [e.version for e in res]

        threads = [threading.Thread(target=asyncio.run, args=(read(j),)) for j in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: hub.subscriber_count == 60, what="the feeds")
        time.sleep(0.05)
        bus.publish("n")
        for t in threads:
            t.join(10)
        assert out == {j: [1] * 20 for j in range(3)}


# --- fork --------------------------------------------------------------------------------------
FORK_HARNESS = textwrap.dedent("""
    import os, sys, time, threading, shmcast
    name = sys.argv[1]
    bus = shmcast.Bus(name)
    hub = shmcast.Hub(name)
    feed = hub.subscribe()
    # A parent thread blocked in get() at the moment of the fork, holding what it holds.
    threading.Thread(target=lambda: list(feed), daemon=True).start()
    time.sleep(0.1)
    pid = os.fork()
    if pid == 0:
        t0 = time.monotonic()
        outcome = []
        for call in (lambda: feed.get(timeout=5), feed.get_nowait, lambda: next(iter(feed)),
                     hub.subscribe, lambda: hub.subscribe(since=0)):
            try:
                call()
                outcome.append("returned")
            except shmcast.ShmcastError as e:
                outcome.append(type(e).__name__)
        feed.close(); hub.close(); feed.unsubscribe()
        _ = (hub.version, hub.dropped, hub.subscriber_count, feed.dropped, feed.closed)
        print("child", " ".join(outcome), round(time.monotonic() - t0, 3), flush=True)
        sys.exit(0)  # a normal exit: atexit and finalizers run
    t0 = time.monotonic()
    _, status = os.waitpid(pid, 0)
    print("child-exit", os.waitstatus_to_exitcode(status), round(time.monotonic() - t0, 3))
    bus.publish("after-fork")
    print("parent", "ok", hub.subscriber_count, bus.subscriber_count, flush=True)
    g = hub.subscribe()
    bus.publish("again")
    print("parent-event", g.get(timeout=5).type, flush=True)
    hub.close(); bus.close()
""")


def test_fork_child_calls_raise_promptly_and_it_exits(bus_name: str) -> None:
    res = subprocess.run([sys.executable, "-c", FORK_HARNESS, bus_name], capture_output=True,
                         text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    outcome = lines["child"].split()
    assert outcome[:5] == ["ShmcastError"] * 5, lines["child"]
    assert float(outcome[5]) < 1.0
    code, took = lines["child-exit"].split()
    assert code == "0"
    assert float(took) < 5
    assert lines["parent"].split() == ["ok", "1", "1"]
    assert lines["parent-event"] == "again"
    assert "Traceback" not in res.stderr, res.stderr


def test_a_burst_from_another_process_into_a_small_hub_ring_counts_exactly(
        bus_name: str) -> None:
    count = 20_000
    with python_publisher(bus_name, count) as proc, \
            Hub(bus_name, slots=4, buffer=count) as hub:
        feeds = [hub.subscribe() for _ in range(3)]
        proc.stdin.write("go\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        assert proc.stdout.readline().split() == ["published", str(count)]  # type: ignore[union-attr]
        proc.stdin.write("close\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        results = [drain(f, timeout=10) for f in feeds]
        assert proc.wait(10) == 0
    for feed, (got, reason) in zip(feeds, results, strict=True):
        assert reason == "bus closed"
        check_counting(got, feed.dropped, 0, count)
        assert versions(got) == versions(results[0][0])
    assert hub.dropped == 3 * feeds[0].dropped


EXIT_HARNESS = textwrap.dedent("""
    import asyncio, sys, threading, shmcast
    name = sys.argv[1]
    bus = shmcast.Bus(name)
    hub = shmcast.Hub(name)
    feeds = [hub.subscribe() for _ in range(3)]
    def get():
        try:
            feeds[0].get()
        except shmcast.StreamClosed:
            pass  # the feed's finalizer at exit ended it
    threading.Thread(target=get, daemon=True).start()
    threading.Thread(target=lambda: list(feeds[1]), daemon=True).start()
    async def wait():
        async for _ in feeds[2]:
            pass
    threading.Thread(target=asyncio.run, args=(wait(),), daemon=True).start()
    while hub.subscriber_count < 3 or not all(f._c.waiters or f._c.futures for f in feeds):
        pass
    print("waiting", flush=True)
    sys.exit(7)
""")


def test_a_process_exits_normally_while_threads_wait_on_feeds(bus_name: str) -> None:
    res = subprocess.run([sys.executable, "-c", EXIT_HARNESS, bus_name], capture_output=True,
                         text=True, timeout=30, check=False)
    assert res.stdout.strip() == "waiting", res.stderr
    assert res.returncode == 7, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
