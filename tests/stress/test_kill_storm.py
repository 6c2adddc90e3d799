"""Kill storms: SIGKILL subscribers and publishers at random and at chosen points.

Every child is an ``os.fork()`` child killed by pid and reaped by the test. A
child that must die at an exact point (mid-write of a slot, holding the
registry lock, between two rings of one publish...) parks itself there with
SIGSTOP first, so "killed mid-publish" is a fact, not a hope about timing; the
storms add random points on top (a child killed while it reads or publishes at
full speed).

After every kill: survivors keep working and see an intact, strictly
increasing stream whose received + dropped equals what was published while
they were subscribed; publish stays fast; a freed place can be taken again;
a new bus of the same name can be created; and once everyone is closed
nothing of the bus is left in /dev/shm.

``Publisher`` processes get the same treatment (the Publisher storm): killed
at random points of a tight publish loop (some SIGSTOPped first, some while
still attaching) while the owner and a steady publisher go on. Events carry a
checksum of their body; the accounting is exact per publisher, from the
counts its place shows after its death (as ``shmcast stat`` reads them).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import select
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from _stress_helpers import (
    DEV_SHM,
    Children,
    bus_entries,
    publisher_roles,
    remove_bus_entries,
    stop_self,
    wait_stopped,
    wait_until,
)

from shmcast import (
    Bus,
    BusExistsError,
    Publisher,
    ShmcastError,
    StreamClosed,
    TooManyPublishersError,
    TooManySubscribersError,
    _inspect,
    subscribe,
)
from shmcast._layout import ENTRY, RING_HEADER_SIZE, entry_offset, read_entry

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings(r"ignore:This process \(pid=\d+\) is multi-threaded"),
]

KILLED = -signal.SIGKILL
PUBLISH_BOUND = 1.0  # seconds; a publish is microseconds, this only absorbs a loaded host
STORM_SHORT = int(os.environ.get("SHMCAST_STORM_SHORT", "40"))
# A dead publisher is noticed by polling (the contract allows 2 s; shmcast polls every
# 0.5 s), so each publisher iteration costs about half a second.
PUB_STORM_SHORT = int(os.environ.get("SHMCAST_PUB_STORM_SHORT", "12"))
STORM_LONG = int(os.environ.get("SHMCAST_STORM_LONG", "600"))
SENDER_STORM_SHORT = int(os.environ.get("SHMCAST_SENDER_STORM_SHORT", "16"))
# A dead Publisher's place frees within 1 s (the contract); the rest absorbs a loaded host.
PLACE_BOUND = 1.5


# ----------------------------------------------------------------------------- plumbing


class Pipe:
    """A pipe from a child to the test: the child writes JSON lines, the test reads them."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.buf = b""

    def send(self, msg: dict) -> None:  # in the child
        os.write(self.w, (json.dumps(msg) + "\n").encode())

    def recv(self, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        poller = select.poll()  # not select.select: long storms have fds beyond FD_SETSIZE
        poller.register(self.r, select.POLLIN)
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            ready = poller.poll(max(0.0, remaining) * 1000)
            if not ready:
                raise AssertionError(f"no message from the child within {timeout}s")
            chunk = os.read(self.r, 65536)
            if not chunk:
                raise AssertionError("the child closed its pipe without a message")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _check(ev: Any, last: int) -> str | None:
    if ev.version <= last:
        return f"version {ev.version} after {last}"
    if ev.payload != {"v": ev.version} or ev.type != "e":
        return f"v{ev.version}: torn or wrong event {ev.type!r} {ev.payload!r}"
    return None


def _reader(name: str, pipe: Pipe, mode: str = "fast", slots: int | None = None) -> int:
    """Child: subscribe, say ready, read and check every event until the stream ends."""
    sub = subscribe(name, slots=slots)
    pipe.send({"ready": os.getpid()})
    last = n = 0
    while True:
        try:
            ev = sub.get(timeout=30)
        except StreamClosed as exc:
            reason = exc.reason
            break
        bad = _check(ev, last)
        if bad:
            pipe.send({"bad": bad})
            return 3
        last, n = ev.version, n + 1
        if mode == "slow":
            time.sleep(0.002)
    pipe.send({"n": n, "dropped": sub.dropped, "last": last, "reason": reason})
    return 0


def _read_to_end(sub: Any, timeout: float = 5.0) -> tuple[list[Any], StreamClosed]:
    """Every event until the stream ends; fails if get() times out instead."""
    got = []
    while True:
        try:
            got.append(sub.get(timeout=timeout))
        except StreamClosed as end:
            return got, end


def _park(module: Any, attr: str, when: Callable[..., bool] = lambda *a, **k: True,
          before: bool = True) -> None:
    """In a child: make *module.attr* SIGSTOP the process when *when(args)* (before/after)."""
    orig = getattr(module, attr)

    def parked(*args: Any, **kwargs: Any) -> Any:
        hit = when(*args, **kwargs)
        if hit and before:
            stop_self()
        result = orig(*args, **kwargs)
        if hit and not before:
            stop_self()
        return result

    setattr(module, attr, parked)


def _park_inside_slot_write() -> None:
    """In a child: SIGSTOP inside a ring write as soon as the slot's seq turned odd.

    Found by watching the ring itself (the layout's seqlock protocol: seq is 2i+1
    while event i is written), so it holds whatever the write's code looks like.
    """
    import struct
    import sys

    from shmcast import _bus, _ring
    from shmcast._layout import RING_HEADER_SIZE

    if _ring.NATIVE:
        # The C core copies a slot in one call that no tracer sees into: leave the
        # first ring as a writer killed there would (seq odd, half a copy, w not
        # moved), then stop.
        def parked(writers: list[Any], head: bytes, tail: bytes) -> None:
            ring = writers[0]
            off = RING_HEADER_SIZE + (ring.w % ring.slots) * ring.stride
            q = ring.buf.cast("Q")
            q[off // 8] = 2 * ring.w + 1
            q.release()
            ring.buf[off + 8 : off + 8 + len(head) // 2] = head[: len(head) // 2]
            stop_self()

        _bus.write_all = parked  # type: ignore[assignment]
        return

    def local(frame: Any, event: str, arg: Any) -> Any:
        w = frame.f_locals.get("ring") or frame.f_locals.get("self")
        if event == "line" and w is not None:
            off = RING_HEADER_SIZE + (w.w % w.slots) * w.stride
            if struct.unpack_from("<Q", w.buf, off)[0] == 2 * w.w + 1:
                sys.settrace(None)
                stop_self()
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        code = frame.f_code
        if code.co_name in ("write", "write_all") and code.co_filename.endswith("_ring.py"):
            return local
        return None

    sys.settrace(tracer)


# ----------------------------------------------------------------------------- chosen points


def _die_after(stage: str, name: str) -> None:
    """Child body: subscribe, parking with SIGSTOP at *stage* (the parent then SIGKILLs us)."""
    from shmcast import _ipc, _registry

    if stage == "joining":  # place claimed, entry and ring written, not yet active
        _park(_registry, "activate")
        subscribe(name)
    elif stage == "activating":  # holding the registry lock inside activate()
        _park(_ipc, "unlock", lambda fd, byte: byte == _ipc.REGISTRY_LOCK)
        subscribe(name)
    else:  # "active": fully subscribed, never reads
        sub = subscribe(name)
        stop_self()
        del sub


@pytest.mark.parametrize("stage", ["joining", "activating", "active"])
def test_dead_subscribers_ring_is_removed_when_nobody_reuses_its_place(bus_name, stage):
    with Children() as kids:
        try:
            bus = Bus(bus_name)
            pid = kids.fork(lambda: _die_after(stage, bus_name))
            wait_stopped(pid)
            assert len(bus_entries(bus_name)) == 3  # control, ring, ring's semaphore
            assert kids.kill(pid) == KILLED
            bus.close()
            assert bus_entries(bus_name) == []
        finally:
            remove_bus_entries(bus_name)


@pytest.mark.parametrize("stage", ["joining", "activating", "active"])
def test_dead_subscribers_ring_is_removed_when_its_place_is_reused(bus_name, stage):
    with Children() as kids:
        try:
            bus = Bus(bus_name, max_subscribers=1)
            pid = kids.fork(lambda: _die_after(stage, bus_name))
            wait_stopped(pid)
            dead_ring = [e for e in bus_entries(bus_name) if e != f"shmcast.{bus_name}"]
            assert len(dead_ring) == 2
            assert kids.kill(pid) == KILLED
            with subscribe(bus_name) as sub:  # the only place: the dead one's
                assert bus.publish("e", 1) == 1
                assert sub.get(timeout=5).payload == 1
                assert bus.subscriber_count == 1
                assert len(bus_entries(bus_name)) == 3
            bus.close()
            left = bus_entries(bus_name)
            assert left == [], f"left behind: {left} (dead subscriber's ring was {dead_ring})"
        finally:
            remove_bus_entries(bus_name)


def test_subscriber_killed_holding_the_registry_lock_in_unsubscribe(bus_name):
    """The registry lock is an OFD lock: its holder's death frees it at once."""
    with Children() as kids:
        try:
            bus = Bus(bus_name)
            other = subscribe(bus_name)

            def body() -> int:
                from shmcast import _ipc

                sub = subscribe(bus_name)
                _park(_ipc, "unlock", lambda fd, byte: byte == _ipc.REGISTRY_LOCK)
                sub.unsubscribe()
                return 0

            pid = kids.fork(body)
            wait_stopped(pid)
            # The child is stopped holding the registry lock: publish still never waits.
            t0 = time.monotonic()
            assert bus.publish("e", {"v": 1}) == 1
            assert time.monotonic() - t0 < PUBLISH_BOUND
            assert kids.kill(pid) == KILLED
            # Lock freed by the kernel: subscribing (which takes it) works at once.
            t0 = time.monotonic()
            with subscribe(bus_name) as third:
                assert time.monotonic() - t0 < 1.0
                assert bus.publish("e", {"v": 2}) == 2
                assert third.get(timeout=5).payload == {"v": 2}
            assert [other.get(timeout=5).payload for _ in range(2)] == [{"v": 1}, {"v": 2}]
            assert bus.subscriber_count == 1
            other.unsubscribe()
            bus.close()
            assert bus_entries(bus_name) == []
        finally:
            remove_bus_entries(bus_name)


def _publisher_parked(name: str, stage: str, pipe: Pipe) -> int:
    """Child: create the bus, wait for two subscribers, publish v1..v3, die at *stage* of v4."""
    # The publisher writes every ring in _ring.write_all, which _bus calls through
    # its module global: wrapped here, armed only for v4.
    from shmcast import _bus, _ipc

    armed = [False]
    write_all = _bus.write_all

    def parked_write_all(writers: list[Any], head: bytes, tail: bytes) -> None:
        if not armed[0]:
            write_all(writers, head, tail)
        elif stage == "between-rings":  # the first ring has v4 (and was woken), the second not
            write_all(writers[:1], head, tail)
            stop_self()
            write_all(writers[1:], head, tail)
        else:  # "after-rings": every ring written and woken, the version not yet stored
            write_all(writers, head, tail)
            stop_self()

    if stage in ("between-rings", "after-rings"):
        _bus.write_all = parked_write_all  # type: ignore[assignment]
    bus = Bus(name, slots=8)
    pipe.send({"bus": os.getpid()})
    wait_until(lambda: bus.subscriber_count == 2, 10, "two subscribers")
    for v in (1, 2, 3):
        bus.publish("e", {"v": v})
    armed[0] = True
    if stage == "mid-slot":  # the slot's seq is odd: the writer is inside it
        _park_inside_slot_write()
    elif stage == "closing":  # inside close(): registry lock held, state closed, rings not ended
        from shmcast import _bus

        _park(_bus._Publisher, "_scan", lambda self: self.closed)
        bus.close()
        return 0
    elif stage == "closed-but-unlock":  # close() done but for releasing the registry lock
        _park(_ipc, "unlock", lambda fd, byte: byte == _ipc.REGISTRY_LOCK)
        bus.close()
        return 0
    bus.publish("e", {"v": 4})
    return 0


@pytest.mark.parametrize(
    "stage", ["mid-slot", "between-rings", "after-rings", "closing", "closed-but-unlock"])
def test_publisher_killed_at_a_chosen_point(bus_name, stage):
    pipe = Pipe()
    with Children() as kids:
        subs: list[Any] = []
        try:
            pid = kids.fork(lambda: _publisher_parked(bus_name, stage, pipe))
            pipe.recv()
            subs = [subscribe(bus_name), subscribe(bus_name)]
            wait_stopped(pid)
            assert kids.kill(pid) == KILLED
            for sub in subs:
                t0 = time.monotonic()
                got, info = _read_to_end(sub)
                # The contract's 2 s, plus the time spent reading.
                assert time.monotonic() - t0 < 2.5
                last = 0
                for ev in got:
                    assert _check(ev, last) is None
                    last = ev.version
                versions = [ev.version for ev in got]
                # Never the half-written event; v4 only where it was completely written.
                assert versions in ([1, 2, 3], [1, 2, 3, 4]), versions
                if stage == "mid-slot":
                    assert versions == [1, 2, 3]
                if stage in ("closing", "closed-but-unlock"):
                    # The header said closed before it died: "bus closed", read from the
                    # header (docs/design.md, "Ending a stream"), sentinel or not.
                    assert info.reason == StreamClosed.BUS_CLOSED
                else:
                    assert info.reason == StreamClosed.PUBLISHER_DIED
            # The subscribers' ending reclaimed the dead bus: nothing of it is left.
            assert bus_entries(bus_name) == []
            # A new bus of the same name: the old subscriptions never touch it.
            with Bus(bus_name) as bus2, subscribe(bus_name) as fresh:
                for sub in subs:
                    sub.unsubscribe()
                assert bus2.subscriber_count == 1
                assert bus2.publish("e", {"v": 1}) == 1
                assert fresh.get(timeout=5).payload == {"v": 1}
            assert bus_entries(bus_name) == []
        finally:
            for sub in subs:
                sub.unsubscribe()
            pipe.close()
            remove_bus_entries(bus_name)


def test_publisher_killed_before_sizing_the_control_segment(bus_name):
    """Dead right after shm_open, before ftruncate: the kernel kills it there (SIGXFSZ)."""
    with Children() as kids:
        try:
            def body() -> int:
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                # Any ftruncate beyond 1 byte now raises SIGXFSZ, whose default action
                # (Python ignores it; restored here) kills the process: exactly inside
                # SharedMemory(O_CREX, size=...).
                signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
                resource.setrlimit(resource.RLIMIT_FSIZE, (1, 1))
                Bus(bus_name)
                return 3

            pid = kids.fork(body)
            assert kids.reap(pid) == -signal.SIGXFSZ
            control = os.path.join(DEV_SHM, f"shmcast.{bus_name}")
            assert os.stat(control).st_size == 0  # what that instant leaves behind
            # Not a bus: a clear error for a subscriber ...
            with pytest.raises(ShmcastError):
                subscribe(bus_name)
            # ... and a stale name for a publisher, reclaimed silently.
            with Bus(bus_name) as bus, subscribe(bus_name) as sub:
                assert bus.publish("e", {"v": 1}) == 1
                assert sub.get(timeout=5).payload == {"v": 1}
            assert bus_entries(bus_name) == []
        finally:
            remove_bus_entries(bus_name)


def test_publisher_killed_while_creating_the_bus(bus_name):
    """Dead between creating the control segment and writing its magic: reclaimed silently."""
    with Children() as kids:
        try:
            def body() -> int:
                from shmcast import _bus

                _park(_bus, "pack_control_header")
                Bus(bus_name)
                return 0

            pid = kids.fork(body)
            wait_stopped(pid)
            assert bus_entries(bus_name) == [f"shmcast.{bus_name}"]
            # Alive (stopped) and holding the publisher lock: the name is taken, and the
            # half-made segment is no bus to subscribe to.
            with pytest.raises(BusExistsError):
                Bus(bus_name)
            with pytest.raises(ShmcastError):
                subscribe(bus_name)
            assert kids.kill(pid) == KILLED
            with Bus(bus_name) as bus, subscribe(bus_name) as sub:
                assert bus.publish("e", {"v": 1}) == 1
                assert sub.get(timeout=5).payload == {"v": 1}
            assert bus_entries(bus_name) == []
        finally:
            remove_bus_entries(bus_name)


# ----------------------------------------------------------------------------- pid reuse


def _take_pid(kids: Children, want: int, body: Callable[[], int | None]) -> int | None:
    """Fork a child that gets pid *want* (via ns_last_pid); None if the kernel won't."""
    for _ in range(50):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(want - 1))
        except OSError:
            return None
        pid = kids.fork(body)
        if pid == want:
            return pid
        kids.kill(pid)
    return None


def test_pid_reuse_does_not_keep_a_dead_registration_alive(bus_name):
    """Liveness is the place's OFD lock, not the pid in the registry entry."""
    with Children() as kids:
        try:
            bus = Bus(bus_name, max_subscribers=1)
            pid = kids.fork(lambda: _die_after("active", bus_name))
            wait_stopped(pid)
            assert bus.subscriber_count == 1
            assert read_entry(bus._core.ctrl.buf, 0).pid == pid
            assert kids.kill(pid) == KILLED

            def squatter() -> int:
                stop_self()  # a process that merely has the dead subscriber's pid
                return 0

            reused = _take_pid(kids, pid, squatter)
            if reused is None:
                # No ns_last_pid here: point the dead entry at a live process instead.
                reused = kids.fork(squatter)
                entry = read_entry(bus._core.ctrl.buf, 0)
                ENTRY.pack_into(bus._core.ctrl.buf, entry_offset(0),
                                *entry._replace(pid=reused))
            wait_stopped(reused)
            assert read_entry(bus._core.ctrl.buf, 0).pid == reused
            with contextlib.suppress(ProcessLookupError):
                os.kill(reused, 0)  # the pid is alive
            assert bus.subscriber_count == 0
            bus.publish("e", {"v": 1})
            assert bus.subscriber_count == 0
            # The only place is free: a new subscriber takes it.
            with subscribe(bus_name) as sub:
                assert bus.publish("e", {"v": 2}) == 2
                assert sub.get(timeout=5).payload == {"v": 2}
            assert kids.kill(reused) == KILLED
            bus.close()
            assert bus_entries(bus_name) == []
        finally:
            remove_bus_entries(bus_name)


# ----------------------------------------------------------------------------- storms


def _subscriber_storm(name: str, iterations: int, seed: int) -> dict:
    """Victims killed at random points of their reading while survivors read on."""
    rng = random.Random(seed)
    max_subs = 6
    stats = {"kills": 0, "published": 0, "worst_publish": 0.0, "full_rejections": 0}
    pipes: list[Pipe] = []
    with Children() as kids:
        try:
            bus = Bus(name, slots=16, max_subscribers=max_subs)

            def publish(n: int) -> None:
                for _ in range(n):
                    t0 = time.monotonic()
                    bus.publish("e", {"v": bus.version + 1})
                    dt = time.monotonic() - t0
                    stats["worst_publish"] = max(stats["worst_publish"], dt)
                    assert dt < PUBLISH_BOUND, f"publish took {dt:.3f}s"
                stats["published"] += n

            def start(mode: str, slots: int | None = None) -> tuple[int, Pipe, int]:
                pipe = Pipe()
                pipes.append(pipe)
                pid = kids.fork(lambda: _reader(name, pipe, mode, slots))
                assert "ready" in pipe.recv(), pid
                return pid, pipe, bus.version

            survivors = [start("fast"), start("slow", 4)]
            for _ in range(iterations):
                victims = [start(rng.choice(["fast", "slow"]), rng.choice([None, 2]))
                           for _ in range(rng.randint(1, max_subs - len(survivors)))]
                assert bus.subscriber_count == len(survivors) + len(victims)
                if len(survivors) + len(victims) == max_subs:
                    with pytest.raises(TooManySubscribersError):
                        subscribe(name)
                    stats["full_rejections"] += 1
                for pid, pipe, _ in victims:
                    publish(rng.randint(0, 40))  # the victim is busy reading these
                    assert kids.kill(pid) == KILLED
                    stats["kills"] += 1
                    pipe.close()  # a long storm would otherwise run out of fds
                    pipes.remove(pipe)
                # Dead places are free at once, and are not counted.
                assert bus.subscriber_count == len(survivors)
                publish(rng.randint(0, 5))
                assert bus.subscriber_count == len(survivors)
                # Bounded /dev/shm: at most one ring (segment + semaphore) per place.
                assert len(bus_entries(name)) <= 1 + 2 * max_subs
            publish(10)
            final = bus.version
            bus.close()
            for pid, pipe, v0 in survivors:
                report = pipe.recv(30)
                assert "bad" not in report, report
                assert report["reason"] == StreamClosed.BUS_CLOSED
                assert report["n"] + report["dropped"] == final - v0, report
                assert report["last"] == final or report["dropped"] > 0, report
                assert kids.reap(pid) == 0
            assert bus_entries(name) == []
            # And the name is free for a new bus.
            with Bus(name) as again, subscribe(name) as sub:
                assert again.publish("e", {"v": 1}) == 1
                assert sub.get(timeout=5).payload == {"v": 1}
            assert bus_entries(name) == []
        finally:
            for pipe in pipes:
                pipe.close()
            remove_bus_entries(name)
    return stats


def _publisher_loop(name: str, pipe: Pipe) -> int:
    """Child: create the bus and publish as fast as possible until killed."""
    bus = Bus(name, slots=8)
    pipe.send({"bus": os.getpid()})
    v = 0
    while True:
        v = bus.publish("e", {"v": v + 1})
        if v % 64 == 0 and bus.subscriber_count == 0:
            time.sleep(0.0005)  # nobody to publish to yet


def _publisher_storm(name: str, iterations: int, seed: int) -> dict:
    """Publishers killed at random points of publishing (or of closing, or of creating)."""
    rng = random.Random(seed)
    stats = {"kills": 0, "events": 0, "worst_end": 0.0, "ended_by": {}}
    with Children() as kids:
        for i in range(iterations):
            pipe = Pipe()
            subs: list[Any] = []
            try:
                pid = kids.fork(lambda p=pipe: _publisher_loop(name, p))
                if rng.random() < 0.1:
                    time.sleep(rng.uniform(0, 0.002))  # kill while it may still be creating
                else:
                    pipe.recv()
                    subs = [subscribe(name, slots=rng.choice([None, 1, 4]))
                            for _ in range(rng.randint(1, 3))]
                    # Read a random number of events, then kill mid-publish.
                    for _ in range(rng.randint(0, 30)):
                        subs[0].get(timeout=5)
                assert kids.kill(pid) == KILLED
                stats["kills"] += 1
                t0 = time.monotonic()
                for sub in subs:
                    got, end = _read_to_end(sub)
                    last = 0
                    for ev in got:
                        bad = _check(ev, last)
                        assert bad is None, bad
                        last = ev.version
                    n = len(got)
                    reason = end.reason
                    stats["ended_by"][reason] = stats["ended_by"].get(reason, 0) + 1
                    assert reason == StreamClosed.PUBLISHER_DIED
                    stats["events"] += n
                stats["worst_end"] = max(stats["worst_end"], time.monotonic() - t0)
                assert time.monotonic() - t0 < 2.5 * max(1, len(subs))
                # A new bus of the same name, with the old subscriptions still around.
                if i % 4 == 0 and subs:
                    with Bus(name) as bus, subscribe(name) as sub:
                        for old in subs:
                            old.unsubscribe()
                        assert bus.subscriber_count == 1
                        assert bus.publish("e", {"v": 1}) == 1
                        assert sub.get(timeout=5).payload == {"v": 1}
                if not subs:  # nobody to reclaim the dead bus but the next Bus of its name
                    Bus(name).close()
                # Reclaimed by its subscribers' ending (or by that Bus): nothing left.
                left = bus_entries(name)
                assert left == [], f"iteration {i}: left {left}"
            finally:
                for sub in subs:
                    sub.unsubscribe()
                pipe.close()
                remove_bus_entries(name)
    return stats


# ----------------------------------------------------------------------------- Publisher storm


def _park_inside_inbox_write(pub: Publisher) -> None:
    """In a child: make *pub*'s next write leave its inbox slot as a writer killed
    there would (seq odd, half the head copied, w not moved), then SIGSTOP."""
    real = pub._s.writer
    assert real is not None

    class Parked:
        @property
        def w(self) -> int:
            return real.w

        @property
        def rejected(self) -> int:
            return real.rejected

        def write(self, head: bytes, tail: bytes) -> None:
            off = RING_HEADER_SIZE + (real.w % real.slots) * real.stride
            q = real.buf.cast("Q")
            q[off // 8] = 2 * real.w + 1
            q.release()
            real.buf[off + 8 : off + 8 + len(head) // 2] = head[: len(head) // 2]
            stop_self()

    pub._s.writer = Parked()  # type: ignore[assignment]


def test_publisher_process_killed_inside_an_inbox_write(bus_name):
    rnd = random.Random(5)
    events = [publisher_roles.make_event(2, i, rnd, SENDER_BODY) for i in range(6)]
    with Children() as kids, Bus(bus_name, slots=8, slot_size=128, codec="raw",
                                 max_publishers=1) as bus, \
            subscribe(bus_name, slots=64) as sub:

        def body() -> int:
            pub = Publisher(bus_name)
            for event in events[:3]:
                pub.publish("e", event)
            _park_inside_inbox_write(pub)
            pub.publish("e", events[3])  # stops inside the slot write
            return 1

        pid = kids.fork(body)
        wait_stopped(pid)
        wait_until(lambda: bus.version == 3, 5, "the drain thread to publish the 3 whole events")
        bus.publish("e", publisher_roles.make_event(OWNER_SRC, 0, rnd, SENDER_BODY))  # goes on
        assert kids.kill(pid) == KILLED
        wait_until(lambda: bus.publisher_count == 0, PLACE_BOUND, "the place to free")
        (info,) = _inspect.read_bus(bus_name).publishers
        assert (info.pid, info.status, info.sent, info.dropped, info.pending) == (
            pid, "dead", 3, 0, 0)
        # The next holder of the place writes over the torn slot and is delivered.
        with Publisher(bus_name) as pub:
            for event in events[4:]:
                pub.publish("e", event)
            wait_until(lambda: bus.version == 6, 5, "the new publisher's events")
            assert pub.dropped == 0
        bus.close()
        got, end = _read_to_end(sub)
    assert end.reason == StreamClosed.BUS_CLOSED
    assert [ev.version for ev in got] == [1, 2, 3, 4, 5, 6]
    seen = [publisher_roles.parse_event(ev.data) for ev in got]
    assert seen == [(2, 0, True), (2, 1, True), (2, 2, True), (OWNER_SRC, 0, True),
                    (2, 4, True), (2, 5, True)]
    assert bus_entries(bus_name) == []

SENDER_BODY = 64  # body bytes at most: an event is 14 + 64 bytes, in 128-byte slots
OWNER_SRC, STEADY_SRC = 0, 1


def _sender(name: str, src: int, pipe: Pipe, pace: int) -> int:
    """Child: attach a Publisher, say ready, publish checksummed events until SIGUSR1
    (or, for a victim, until killed), then report what it gave and what dropped."""
    stop = []
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
    rnd = random.Random(src)
    pub = Publisher(name)
    pipe.send({"ready": os.getpid()})
    i = 0
    worst = 0.0
    perf = time.perf_counter
    while not stop:
        event = publisher_roles.make_event(src, i, rnd, SENDER_BODY)
        t = perf()
        pub.publish("e", event)
        worst = max(worst, perf() - t)
        i += 1
        if pace and i % pace == 0:
            time.sleep(0.001)
    pipe.send({"count": i, "dropped": pub.dropped, "worst": worst})
    pub.close()
    return 0


class _Seen:
    """Every event one in-process subscriber got, checked as it is read."""

    def __init__(self, sub: Any) -> None:
        self.sub = sub
        self.events: dict[int, list[int]] = {}  # source -> indices, in the order read
        self.version_of: dict[tuple[int, int], int] = {}
        self.last = 0
        self.n = 0

    def take(self, ev: Any) -> None:
        assert ev.version > self.last, (ev.version, self.last)
        self.last = ev.version
        src, i, intact = publisher_roles.parse_event(ev.data)
        assert intact, f"v{ev.version}: torn event {ev.data[:32]!r}"
        self.events.setdefault(src, []).append(i)
        self.version_of[(src, i)] = ev.version
        self.n += 1

    def read_ready(self) -> None:
        while True:
            try:
                ev = self.sub.get(timeout=0)
            except TimeoutError:
                return
            self.take(ev)

    def read_to_end(self) -> str:
        got, end = _read_to_end(self.sub)
        for ev in got:
            self.take(ev)
        return end.reason


def _sender_storm(name: str, iterations: int, seed: int) -> dict:
    """Publisher processes killed at random points of publishing while others go on."""
    rng = random.Random(seed)
    victims_at_once = 2
    stats = {"kills": 0, "stopped_first": 0, "while_attaching": 0, "victim_events": 0,
             "victim_dropped": 0, "worst_place_free": 0.0, "worst_owner_publish": 0.0}
    pipes: list[Pipe] = []
    victims: dict[int, tuple[int, int]] = {}  # src -> (events that got a version, dropped)
    owner_events = 0
    with Children() as kids:
        try:
            bus = Bus(name, slots=64, slot_size=128, codec="raw",
                      max_publishers=1 + victims_at_once)
            exact = _Seen(subscribe(name, slots=1 << 15))  # never drops in this storm
            small = _Seen(subscribe(name, slots=32))  # drops, counted
            owner_rnd = random.Random(seed)

            def owner_publish(n: int) -> None:
                nonlocal owner_events
                for _ in range(n):
                    event = publisher_roles.make_event(OWNER_SRC, owner_events, owner_rnd,
                                                       SENDER_BODY)
                    t0 = time.monotonic()
                    bus.publish("e", event)
                    dt = time.monotonic() - t0
                    stats["worst_owner_publish"] = max(stats["worst_owner_publish"], dt)
                    assert dt < PUBLISH_BOUND, f"the owner's publish took {dt:.3f}s"
                    owner_events += 1

            def start(src: int, pace: int, ready: bool = True) -> tuple[int, Pipe]:
                pipe = Pipe()
                pipes.append(pipe)
                pid = kids.fork(lambda: _sender(name, src, pipe, pace))
                if ready:
                    assert "ready" in pipe.recv(), pid
                return pid, pipe

            steady_pid, steady_pipe = start(STEADY_SRC, pace=5)
            next_src = STEADY_SRC + 1
            for _ in range(iterations):
                batch = []
                for _ in range(rng.randint(1, victims_at_once)):
                    attaching = rng.random() < 0.1
                    pid, pipe = start(next_src, pace=0, ready=not attaching)
                    batch.append((next_src, pid, pipe, attaching))
                    next_src += 1
                if not any(attaching for *_, attaching in batch):
                    assert bus.publisher_count == 1 + len(batch)
                    if len(batch) == victims_at_once:
                        with pytest.raises(TooManyPublishersError):
                            Publisher(name)
                # Those still attaching die first: one that attached after another
                # victim died could take its place, and with it the counts we read below.
                batch.sort(key=lambda victim: not victim[3])
                for _, pid, _, attaching in batch:
                    owner_publish(rng.randint(0, 20))
                    if not attaching:
                        time.sleep(rng.uniform(0, 0.02))  # it publishes flat out meanwhile
                        if rng.random() < 0.2:  # stopped mid-publish, then killed
                            os.kill(pid, signal.SIGSTOP)
                            owner_publish(rng.randint(1, 10))  # nobody waits for it
                            stats["stopped_first"] += 1
                    else:
                        stats["while_attaching"] += 1
                    assert kids.kill(pid) == KILLED
                    stats["kills"] += 1
                dead = time.monotonic()
                wait_until(lambda: bus.publisher_count == 1, PLACE_BOUND,
                           "the dead publishers' places to free")
                stats["worst_place_free"] = max(stats["worst_place_free"],
                                                time.monotonic() - dead)
                # What each victim handed over and dropped, from its place, before the
                # next victim takes it (a place's counts are its last holder's).
                places = {p.pid: p for p in _inspect.read_bus(name, every_place=True).publishers}
                for src, pid, pipe, _ in batch:
                    info = places.get(pid)
                    sent = (info.sent or 0) if info else 0
                    dropped = (info.dropped or 0) if info else 0
                    victims[src] = (sent, dropped)
                    stats["victim_events"] += sent
                    stats["victim_dropped"] += dropped
                    pipe.close()  # a long storm would otherwise run out of fds
                    pipes.remove(pipe)
                exact.read_ready()
                small.read_ready()
                # Publishers create no names: the control segment, the inboxes, the
                # drain semaphore and the two rings (segment + semaphore), however many died.
                assert len(bus_entries(name)) == 1 + (1 + victims_at_once) + 1 + 2 * 2
            os.kill(steady_pid, signal.SIGUSR1)
            steady = steady_pipe.recv(30)
            assert kids.reap(steady_pid) == 0
            owner_publish(10)
            wait_until(lambda: all(p.pending == 0
                                   for p in _inspect.read_bus(name).publishers),
                       10, "the inboxes to drain")
            assert bus.publisher_count == 0
            version = bus.version
            bus.close()
            assert exact.read_to_end() == StreamClosed.BUS_CLOSED
            assert small.read_to_end() == StreamClosed.BUS_CLOSED
            assert bus_entries(name) == []
        finally:
            for pipe in pipes:
                pipe.close()
            remove_bus_entries(name)

    # The accounting line, exact: every event given got a version or was counted as
    # dropped (a victim's given is what its place counted: the publish it was killed
    # in either handed its event over whole or never happened).
    given_versions = (owner_events + steady["count"] - steady["dropped"]
                      + sum(sent for sent, _ in victims.values()))
    assert version == given_versions, (version, given_versions)
    assert exact.sub.dropped == 0
    assert exact.n == version
    assert small.n + small.sub.dropped == version
    for key, v in small.version_of.items():  # identical versions for identical events
        assert exact.version_of[key] == v, key
    # Each source: its order kept, and exactly its handed-over events seen.
    for src, got in exact.events.items():
        assert got == sorted(got), f"source {src} out of order"
    assert exact.events.get(OWNER_SRC, []) == list(range(owner_events))
    steady_seen = exact.events.get(STEADY_SRC, [])
    assert len(steady_seen) == steady["count"] - steady["dropped"]
    assert not steady_seen or steady_seen[-1] < steady["count"]
    assert steady["worst"] < 0.5, f"the steady publisher waited {steady['worst']:.3f}s"
    for src, (sent, dropped) in victims.items():
        seen = exact.events.get(src, [])
        assert len(seen) == sent, (src, len(seen), sent, dropped)
        assert not seen or seen[-1] < sent + dropped, (src, seen[-1], sent, dropped)
    stats["versions"] = version
    stats["steady"] = steady
    return stats


def test_publisher_process_kill_storm(bus_name):
    t0 = time.monotonic()
    stats = _sender_storm(bus_name, SENDER_STORM_SHORT, seed=3)
    assert stats["kills"] >= SENDER_STORM_SHORT
    assert stats["victim_events"] > 0, stats
    assert time.monotonic() - t0 < 30, stats


def test_subscriber_kill_storm(bus_name):
    t0 = time.monotonic()
    stats = _subscriber_storm(bus_name, STORM_SHORT, seed=1)
    assert stats["kills"] >= STORM_SHORT
    assert time.monotonic() - t0 < 30, stats


def test_publisher_kill_storm(bus_name):
    t0 = time.monotonic()
    stats = _publisher_storm(bus_name, PUB_STORM_SHORT, seed=2)
    assert stats["kills"] == PUB_STORM_SHORT
    assert time.monotonic() - t0 < 30, stats


@pytest.mark.stress
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", [11, 12])
def test_subscriber_kill_storm_long(bus_name, seed):
    stats = _subscriber_storm(bus_name, STORM_LONG, seed=seed)
    print(stats)
    assert stats["kills"] >= STORM_LONG


@pytest.mark.stress
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", [31, 32])
def test_publisher_process_kill_storm_long(bus_name, seed):
    stats = _sender_storm(bus_name, STORM_LONG, seed=seed)
    print(stats)
    assert stats["kills"] >= STORM_LONG
    assert stats["stopped_first"] > 0
    assert stats["while_attaching"] > 0


@pytest.mark.stress
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", [21, 22])
def test_publisher_kill_storm_long(bus_name, seed):
    stats = _publisher_storm(bus_name, STORM_LONG, seed=seed)
    print(stats)
    assert stats["kills"] == STORM_LONG
