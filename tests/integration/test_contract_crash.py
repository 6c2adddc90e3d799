"""Contract: dying processes on either side, stale buses, fork inheritance, invariant 4.

Subscribers run as fork, spawn and independent ``python -c`` children; every
child is killed by pid (SIGKILL) where the test says so, reaped, and its exit
code asserted. Deadlines are the contract's (1 s to notice a dead subscriber,
2 s to notice a dead publisher) plus :data:`SLACK` for scheduling.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
import time

import pytest
from _contract_helpers import (
    METHODS,
    SLACK,
    Child,
    assert_clean_stderr,
    bus_entries,
    control_path,
    from_ranges,
    reclaim,
    wait_until,
)

from shmcast import (
    Bus,
    BusExistsError,
    ShmcastError,
    StreamClosed,
    TooManySubscribersError,
    subscribe,
)

pytestmark = [
    pytest.mark.timeout(45),
    pytest.mark.filterwarnings(r"ignore:This process \(pid=\d+\) is multi-threaded"),
]

KILLED = -signal.SIGKILL


def _bus_still_works(bus: Bus, name: str) -> None:
    assert os.path.exists(control_path(name)), "the bus's control segment is gone"
    with subscribe(name) as s:
        v = bus.publish("probe", {"v": bus.version + 1})
        ev = s.get(timeout=5)
        assert (ev.version, ev.payload) == (v, {"v": v})


@pytest.mark.parametrize("trigger", ["time", "publish"])
@pytest.mark.parametrize("method", METHODS)
def test_killed_subscriber_is_reaped_and_its_place_freed(bus_name, method, trigger):
    with Bus(bus_name, max_subscribers=1, slots=4) as bus, \
            Child(method, "sub", name=bus_name) as ch:
        ch.expect("ready")
        assert bus.subscriber_count == 1
        with pytest.raises(TooManySubscribersError):
            subscribe(bus_name)
        ch.send({"op": "until_closed"})  # the child now blocks in get()
        bus.publish("e", {"v": 1})
        ch.kill(signal.SIGKILL)
        assert ch.wait() == KILLED
        t_dead = time.monotonic()
        if trigger == "publish":
            bus.publish("e", {"v": 2})
            assert bus.subscriber_count == 0, "dead subscriber still counted after publish"
            sub = subscribe(bus_name)  # its place is free at once
        else:
            wait_until(lambda: bus.subscriber_count == 0, 1.0 + SLACK,
                       "dead subscriber no longer counted")
            assert time.monotonic() - t_dead <= 1.0 + SLACK
            sub = subscribe(bus_name)
        try:
            assert bus.subscriber_count == 1
            v = bus.publish("e", {"v": bus.version + 1})
            assert sub.get(timeout=5).version == v
        finally:
            sub.unsubscribe()
        if method == "python-c":
            # A resource tracker the child started has finished by now;
            # it must not have unlinked the bus (CPython gh-82300).
            assert_clean_stderr(ch.stderr_final())
        _bus_still_works(bus, bus_name)
    assert bus_entries(bus_name) == []


@pytest.mark.parametrize("method", METHODS)
def test_subscriber_process_exiting_normally_leaves_the_bus_intact(bus_name, method):
    with Bus(bus_name) as bus:
        for unsubscribe in (False, True):
            with Child(method, "sub", name=bus_name, full=True) as ch:
                ch.expect("ready")
                bus.publish("e", {"v": bus.version + 1})
                ch.send({"op": "drain", "published": 1})
                assert ch.expect("drained")["n"] == 1
                ch.send({"op": "exit", "unsubscribe": unsubscribe})
                ch.expect("bye")
                if unsubscribe:  # not counted once unsubscribe() returned
                    assert bus.subscriber_count == 0
                assert ch.wait() == 0
                if method == "python-c":
                    assert_clean_stderr(ch.stderr_final())
            wait_until(lambda: bus.subscriber_count == 0, 1.0 + SLACK, "exited subscriber gone")
            _bus_still_works(bus, bus_name)
    assert bus_entries(bus_name) == []


@pytest.mark.parametrize("method", METHODS)
def test_stale_bus_is_reclaimed_after_publisher_sigkill(bus_name, method):
    pub = Child(method, "pub", name=bus_name, bus_kwargs={"slots": 8})
    old_sub = Child("python-c", "sub", name=bus_name, full=True)
    try:
        pub.start()
        pub.expect("ready")
        with pytest.raises(BusExistsError):
            Bus(bus_name)
        old_sub.start()
        old_sub.expect("ready")
        pub.send({"op": "publish", "n": 3, "type": "old"})
        assert pub.expect("published")["versions"] == [1, 2, 3]
        old_sub.send({"op": "until_closed"})
        pub.kill(signal.SIGKILL)
        assert pub.wait() == KILLED
        # Reclaim at once, before the old subscriber has necessarily noticed.
        with Bus(bus_name, slots=8) as bus:
            assert bus.version == 0
            assert bus.subscriber_count == 0
            with subscribe(bus_name) as s:
                assert bus.publish("new", {"k": 1}) == 1
                ev = s.get(timeout=5)
                assert (ev.version, ev.type, ev.payload) == (1, "new", {"k": 1})
            r = old_sub.expect("closed", timeout=2.0 + SLACK + 1)
            assert r["end"] == "StreamClosed", r
            # it saw only the old bus's events, never the new one's
            assert [(e[0], e[1]) for e in r["events"]] == [(1, "old"), (2, "old"), (3, "old")]
            old_sub.send({"op": "exit", "unsubscribe": True})
            old_sub.expect("bye")
            assert old_sub.wait() == 0
            assert bus.subscriber_count == 0
            _bus_still_works(bus, bus_name)
        assert bus_entries(bus_name) == [], "the stale bus's objects were not all reclaimed"
    finally:
        pub.cleanup()
        old_sub.cleanup()
        reclaim(bus_name)


@pytest.mark.parametrize("method", METHODS)
def test_publisher_sigkill_ends_streams_within_two_seconds(bus_name, method):
    pub = Child("python-c", "pub", name=bus_name)
    child_sub = Child(method, "sub", name=bus_name, check="v")
    local = None
    th = None
    try:
        pub.start()
        pub.expect("ready")
        child_sub.start()
        child_sub.expect("ready")
        local = subscribe(bus_name)
        result: dict = {}

        def read_local() -> None:
            got = []
            try:
                got.extend(e.version for e in local)  # iteration stops when the stream ends
                result["end"] = "iter_end"
                local.get(timeout=1)
            except StreamClosed:
                result["again"] = "StreamClosed"
            except BaseException as exc:  # noqa: BLE001
                result["again"] = repr(exc)
            result["t"] = time.time()
            result["got"] = got

        th = threading.Thread(target=read_local, daemon=True)
        th.start()
        pub.send({"op": "publish", "n": 2})
        assert pub.expect("published")["versions"] == [1, 2]
        child_sub.send({"op": "until_closed"})
        t_kill = time.time()
        pub.kill(signal.SIGKILL)
        assert pub.wait() == KILLED
        r = child_sub.expect("closed", timeout=2.0 + SLACK + 2)
        assert r["end"] == "StreamClosed", r
        assert from_ranges(r["ranges"]) == [1, 2]
        noticed = r["end_time"] - t_kill
        assert noticed <= 2.0 + SLACK, f"child noticed after {noticed:.2f}s"
        assert r["again"] == "StreamClosed"
        th.join(2.0 + SLACK + 2)
        assert not th.is_alive(), "in-process reader still blocked after the publisher died"
        assert result["end"] == "iter_end", result
        assert result["again"] == "StreamClosed", result
        assert result["got"] == [1, 2]
        assert result["t"] - t_kill <= 2.0 + SLACK
        child_sub.send({"op": "exit", "unsubscribe": True})
        child_sub.expect("bye")
        assert child_sub.wait() == 0
    finally:
        if local is not None:
            local.unsubscribe()
        if th is not None:
            th.join(5)
        pub.cleanup()
        child_sub.cleanup()
        reclaim(bus_name)


def test_nothing_left_after_publisher_killed_and_survivors_closed(bus_name):
    """Invariant 4: the publisher was SIGKILLed; once every surviving subscriber
    has closed, nothing of the bus is left in /dev/shm (nobody created a new bus)."""
    pub = Child("python-c", "pub", name=bus_name, bus_kwargs={"slots": 4})
    subs = [Child(m, "sub", name=bus_name) for m in METHODS]
    local = None
    try:
        pub.start()
        pub.expect("ready")
        for s in subs:
            s.start()
            s.expect("ready")
        local = subscribe(bus_name)
        pub.send({"op": "publish", "n": 10})
        pub.expect("published")
        pub.kill(signal.SIGKILL)
        assert pub.wait() == KILLED
        for s in subs:
            s.send({"op": "until_closed"})
        for s in subs:
            assert s.expect("closed", timeout=2.0 + SLACK + 2)["end"] == "StreamClosed"
            s.send({"op": "exit", "unsubscribe": True})
            s.expect("bye")
            assert s.wait() == 0
        for _ in range(4):
            local.get(timeout=5)
        with pytest.raises(StreamClosed):
            local.get(timeout=2.0 + SLACK)
        local.unsubscribe()
        local = None
        wait_until(lambda: bus_entries(bus_name) == [], 2.0,
                   f"/dev/shm still has {bus_entries(bus_name)}")
    finally:
        if local is not None:
            local.unsubscribe()
        pub.cleanup()
        for s in subs:
            s.cleanup()
        reclaim(bus_name)


def test_leftover_subscription_never_touches_a_new_bus(bus_name):
    pub = Child("python-c", "pub", name=bus_name)
    old = None
    try:
        pub.start()
        pub.expect("ready")
        old = subscribe(bus_name)
        pub.send({"op": "publish", "n": 2, "type": "old"})
        pub.expect("published")
        pub.kill(signal.SIGKILL)
        assert pub.wait() == KILLED
        with Bus(bus_name, slots=4) as bus:  # created before `old` noticed anything
            new = subscribe(bus_name)
            for _ in range(6):
                bus.publish("new", {"v": bus.version + 1})
            # The old stream yields only the old bus's events, then ends.
            got = []
            ended = None
            while ended is None and len(got) < 10:
                try:
                    got.append(old.get(timeout=2.0 + SLACK + 1))
                except (StreamClosed, TimeoutError) as exc:
                    ended = type(exc)
            assert ended is StreamClosed
            assert [(e.version, e.type) for e in got] == [(1, "old"), (2, "old")]
            old.unsubscribe()  # must not unregister / unlink anything of the new bus
            old.unsubscribe()
            assert bus.subscriber_count == 1
            assert new.dropped == 2
            assert bus.dropped == 2
            assert [new.get(timeout=5).version for _ in range(4)] == [3, 4, 5, 6]
            v = bus.publish("new", {"v": 7})
            assert new.get(timeout=5).version == v == 7
            new.unsubscribe()
            _bus_still_works(bus, bus_name)
        assert bus_entries(bus_name) == []
    finally:
        if old is not None:
            old.unsubscribe()
        pub.cleanup()
        reclaim(bus_name)


def test_fork_inherited_bus_in_multiprocessing_child(bus_name):
    # The Bus is referenced only from `holder`, so that the child's pop() drops
    # the last reference in the child and its copy is really garbage-collected.
    holder = [Bus(bus_name)]
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe()

    def child() -> None:
        b = holder.pop()
        try:
            b.publish("from-child", 1)
        except ShmcastError:
            outcome = "ShmcastError"
        except Exception as exc:  # noqa: BLE001
            outcome = repr(exc)
        else:
            outcome = "published"
        del b
        gc.collect()
        child_conn.send([outcome, os.path.exists(control_path(bus_name))])

    proc = ctx.Process(target=child, daemon=True)
    try:
        proc.start()
        child_conn.close()
        assert parent_conn.poll(10), "forked child reported nothing"
        outcome, exists_in_child = parent_conn.recv()
        assert outcome == "ShmcastError"
        assert exists_in_child, "collecting the inherited Bus in the child removed the bus"
        proc.join(10)
        assert proc.exitcode == 0
        assert os.path.exists(control_path(bus_name))
        assert holder[0].version == 0, "the child's failed publish consumed a version"
        _bus_still_works(holder[0], bus_name)
        assert holder[0].version == 1
    finally:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        parent_conn.close()
        holder[0].close()
    assert bus_entries(bus_name) == []


def test_fork_tree_in_independent_interpreter(bus_name):
    """A Bus inherited by fork() is never removed by the child, whose publish raises
    ShmcastError; forked subscribers exiting normally leave the bus alone; no process
    prints resource_tracker warnings."""
    with Child("python-c", "fork_harness", name=bus_name) as h:
        r = h.expect("harness", timeout=30)
        assert h.wait() == 0
        assert_clean_stderr(h.stderr_final())
    assert r["publish_child_exit"] == 0, f"forked publish: exit {r['publish_child_exit']} " \
        "(0: ShmcastError, 3: published, 4: other exception)"
    assert r["after1_control_exists"], "the forked child's GC removed the bus"
    assert r["after1_version"] == 0
    assert r["reader_ready"] == "ready"
    assert r["v1"] == 1
    assert r["reader_child_exit"] == 0
    assert r["after2_control_exists"], "a forked subscriber's exit removed the bus"
    assert r["unsub_child_exit"] == 0
    assert r["after3_control_exists"]
    assert r["final_event"] == [2, {"ok": True}, 2]
    assert r["final_count"] == 0
    assert r["after_close_entries"] == []
    assert bus_entries(bus_name) == []


def _sub_objects(name: str) -> list[str]:
    """Everything of the bus in /dev/shm except its control segment."""
    return [e for e in bus_entries(name) if e != f"shmcast.{name}"]


def test_subscriber_objects_go_away_with_unsubscribe_while_bus_lives(bus_name):
    with Bus(bus_name, slots=4) as bus:
        baseline = _sub_objects(bus_name)
        for _ in range(20):
            with subscribe(bus_name, slots=2) as s:
                bus.publish("e", 1)
                s.get(timeout=5)
        assert _sub_objects(bus_name) == baseline, "unsubscribed rings pile up in /dev/shm"


@pytest.mark.parametrize("method", METHODS)
def test_killed_subscriber_objects_are_removed_while_bus_lives(bus_name, method):
    """Beyond the letter of invariant 4 (which is about after close): a long-lived bus
    must not keep a dead subscriber's ring and semaphore for ever. With a publish
    every 50 ms, they must be gone within a few seconds."""
    with Bus(bus_name, slots=4) as bus:
        baseline = _sub_objects(bus_name)
        with Child(method, "sub", name=bus_name) as ch:
            ch.expect("ready")
            for _ in range(20):  # it never reads: 16 drops
                bus.publish("e", {"v": bus.version + 1})
            assert bus.dropped == 16
            ch.kill(signal.SIGKILL)
            assert ch.wait() == KILLED
            if method == "python-c":
                assert_clean_stderr(ch.stderr_final())
        bus.publish("e", {"v": bus.version + 1})  # reaps the dead one
        assert bus.subscriber_count == 0
        assert bus.dropped >= 16, "a dead subscriber's drops vanished from bus.dropped"

        def gone() -> bool:
            bus.publish("heartbeat", {"v": bus.version + 1})
            return _sub_objects(bus_name) == baseline

        wait_until(gone, 3.0, lambda: f"dead subscriber's objects still in /dev/shm: "
                   f"{_sub_objects(bus_name)}", interval=0.05)
        _bus_still_works(bus, bus_name)


@pytest.mark.parametrize("method", METHODS)
def test_publisher_exiting_without_close_ends_streams_and_frees_the_name(bus_name, method):
    pub = Child(method, "pub", name=bus_name)
    sub = None
    try:
        pub.start()
        pub.expect("ready")
        sub = subscribe(bus_name)
        pub.send({"op": "publish", "n": 2})
        pub.expect("published")
        pub.send({"op": "exit_noclose"})
        pub.expect("bye")
        t0 = time.monotonic()
        assert pub.wait() == 0
        assert [sub.get(timeout=5).version for _ in range(2)] == [1, 2]
        with pytest.raises(StreamClosed):
            sub.get(timeout=2.0 + SLACK + 1)
        assert time.monotonic() - t0 <= 2.0 + SLACK
        sub.unsubscribe()
        sub = None
        with Bus(bus_name) as bus:  # the name is free again (cleaned or reclaimed)
            assert bus.version == 0
            _bus_still_works(bus, bus_name)
        assert bus_entries(bus_name) == []
    finally:
        if sub is not None:
            sub.unsubscribe()
        pub.cleanup()
        reclaim(bus_name)


def test_publisher_killed_mid_publish_never_yields_a_torn_event(bus_name):
    slot_size = 512
    pub = Child("python-c", "pub", name=bus_name,
                bus_kwargs={"slots": 4, "slot_size": slot_size, "codec": "raw"})
    subs = [Child(m, "sub", name=bus_name, check="torn") for m in METHODS]
    try:
        pub.start()
        pub.expect("ready")
        for s in subs:
            s.start()
            s.expect("ready")
            s.send({"op": "until_closed"})
        pub.send({"op": "flood", "max_len": slot_size - 128, "seed": 3})
        pub.expect("flooding")
        # a fixed flooding time (not a wait for a condition), then kill it in the
        # middle of whatever publish it is doing
        time.sleep(0.3)
        t_kill = time.time()
        pub.kill(signal.SIGKILL)
        assert pub.wait() == KILLED
        for s in subs:
            r = s.expect("closed", timeout=2.0 + SLACK + 3)
            assert r["end"] == "StreamClosed", (s.method, r)
            assert r["nbad"] == 0, f"{s.method}: torn events {r['bad']}"
            assert r["n"] > 0, s.method
            assert r["end_time"] - t_kill <= 2.0 + SLACK
            s.send({"op": "exit", "unsubscribe": True})
            s.expect("bye")
            assert s.wait() == 0
    finally:
        pub.cleanup()
        for s in subs:
            s.cleanup()
        reclaim(bus_name)


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_racing_creators_exactly_one_wins(bus_name, stale):
    """Bus(name) from four processes at once (over nothing, or over a stale bus):
    exactly one creates it, every other gets BusExistsError."""
    racers = [Child(m, "create_race", name=bus_name)
              for m in ("python-c", "python-c", "spawn", "fork")]
    dead = Child("python-c", "pub", name=bus_name)
    try:
        if stale:
            dead.start()
            dead.expect("ready")
            dead.kill(signal.SIGKILL)
            assert dead.wait() == KILLED
        for r in racers:
            r.start()
        for r in racers:
            r.expect("ready", timeout=20)
        for r in racers:
            r.send({"op": "go"})
        results = [r.expect("created", timeout=20) for r in racers]
        winners = [r for r, res in zip(racers, results, strict=True) if res["ok"]]
        assert len(winners) == 1, results
        for res in results:
            if not res["ok"]:
                assert res["exc"] == "BusExistsError", res
        # the winner's bus is the live one
        with subscribe(bus_name) as s:
            assert s.dropped == 0
        winners[0].send({"op": "close"})
        winners[0].expect("closed")
        for r in racers:
            assert r.wait() == 0
        assert bus_entries(bus_name) == []
    finally:
        dead.cleanup()
        for r in racers:
            r.cleanup()
        reclaim(bus_name)


@pytest.mark.timeout(60)
def test_subscribers_killed_while_joining_or_leaving_free_their_places(bus_name):
    """Kill churning subscribers (subscribe/unsubscribe in a loop) at random moments:
    their places come back within the reaping deadline, the bus stays usable, and
    close leaves nothing."""
    import random

    rng = random.Random(99)
    with Bus(bus_name, slots=4, max_subscribers=2) as bus:
        for method in METHODS * 2:
            with Child(method, "churn", name=bus_name) as ch:
                ch.expect("ready")
                # let it churn: its join/leave cycle is a few hundred microseconds
                deadline = time.monotonic() + rng.uniform(0.05, 0.3)
                while time.monotonic() < deadline:
                    bus.publish("e", None)
                ch.kill(signal.SIGKILL)
                assert ch.wait() == KILLED
            bus.publish("e", None)
            wait_until(lambda: bus.subscriber_count == 0, 1.0 + SLACK,
                       lambda: f"count stuck at {bus.subscriber_count}")

            def both_places_free() -> bool:
                try:
                    a = subscribe(bus_name)
                except TooManySubscribersError:
                    return False
                try:
                    b = subscribe(bus_name)
                except TooManySubscribersError:
                    a.unsubscribe()
                    return False
                v = bus.publish("e", "x")
                ok = a.get(timeout=5).version == v == b.get(timeout=5).version
                a.unsubscribe()
                b.unsubscribe()
                return ok

            wait_until(both_places_free, 1.0 + SLACK, "a killed joiner still holds a place",
                       interval=0.05)
    assert bus_entries(bus_name) == []
