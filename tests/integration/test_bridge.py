"""The cross-host bridge (shmcast.bridge, issue 13) against a real redis-server.

Every test starts its own ``redis-server`` on 127.0.0.1 and a free port (or, in
the namespace variant, on an address of a namespace it made) and stops it by
pid. A "host" is a bus of its own name (``{bus_name}-h1``...) with its own
bridge: a thread, or a ``shmcast bridge`` process that the tests SIGKILL and
restart. The check is the bridge's promise: on every host, the events of each
other host arrive in their order, each at most once, and every one that does
not arrive is counted by a ``shmcast.gap`` event.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import shmcast

redis = pytest.importorskip("redis", reason="redis-py is missing (pip install 'shmcast[redis]')")
from shmcast.bridge import GAP_TYPE, Bridge, remote  # noqa: E402

REDIS_SERVER = shutil.which("redis-server")
pytestmark = [
    pytest.mark.skipif(REDIS_SERVER is None,
                       reason="redis-server is not installed (CI installs Debian's redis-server)"),
    pytest.mark.timeout(120),
]

EV = "ev"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


class RedisServer:
    """One redis-server process of ours, killed and restarted by pid."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int | None = None,
                 prefix: list[str] | None = None) -> None:
        self.host = host
        self.port = port or _free_port()
        self.workdir = workdir
        self.prefix = prefix or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.prefix, REDIS_SERVER, "--port", str(self.port), "--bind", self.host,
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
             "--stream-node-max-entries", "4"],  # so that MAXLEN ~ trims close to N
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _wait(self.ping, 10, f"redis-server on {self.host}:{self.port}", 0.05)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.exceptions.RedisError:
            return False

    def client(self) -> Any:
        return redis.Redis(host=self.host, port=self.port, socket_timeout=2,
                           socket_connect_timeout=1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


class Host:
    """One simulated host: a bus this test owns, a subscriber collecting it, a bridge."""

    def __init__(self, name: str, host_id: str, state_dir: Path) -> None:
        self.name = name
        self.id = host_id
        self.state_dir = state_dir
        self.bus = shmcast.Bus(name, max_publishers=2, slots=256)
        self.sub = shmcast.subscribe(name, slots=16384)
        self.events: list[shmcast.Event] = []
        self.published = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread_bridge: Bridge | None = None
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.events.append(self.sub.get(timeout=0.05))
            except TimeoutError:
                continue
            except shmcast.StreamClosed:
                return

    def publish(self, n: int = 1) -> None:
        for _ in range(n):
            self.bus.publish(EV, {"o": self.id, "i": self.published})
            self.published += 1

    # The bridge as a process (killed and restarted by the tests) ...
    def start_bridge(self, url: str, stream: str, *, prefix: list[str] | None = None,
                     maxlen: int = 100_000, direction: str = "both", echo: bool = False) -> None:
        log = open(self.state_dir / f"bridge-{self.id}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "shmcast", "bridge", self.name,
             "--redis", url, "--stream", stream, "--host-id", self.id, "--maxlen", str(maxlen),
             "--direction", direction, "--state-dir", str(self.state_dir),
             *(["--echo"] if echo else [])],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def status(self) -> dict[str, Any]:
        paths = list(self.state_dir.glob(f"bridge.{self.name}.*.json"))
        if not paths:
            return {}
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(paths[0].read_text()))
        return {}

    def wait_bridge(self, timeout: float = 20) -> None:
        """Until the bridge is attached (subscribed, a Publisher) and connected to Redis."""
        pid = self.proc.pid if self.proc is not None else os.getpid()
        _wait(lambda: self.bus.publisher_count == 1 and self.bus.subscriber_count == 2
              and self.status().get("pid") == pid and self.status().get("connected"),
              timeout, f"the bridge of {self.id}", 0.05)

    def kill_bridge(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop_bridge(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            self.proc = None
        if self.thread_bridge is not None:
            self.thread_bridge.stop()
            self.thread_bridge = None

    def close(self) -> None:
        self.stop_bridge()
        self._stop.set()
        self._reader.join(5)
        self.sub.unsubscribe()
        self.bus.close()

    # What arrived.
    def remote_indices(self) -> dict[str, list[int]]:
        got: dict[str, list[int]] = defaultdict(list)
        for e in list(self.events):
            r = remote(e)
            if r is not None and r.type == EV:
                got[r.origin].append(e.payload["i"])
        return got

    def gaps(self) -> Counter[str]:
        counted: Counter[str] = Counter()
        for e in list(self.events):
            if e.type == GAP_TYPE:
                for origin, n in e.payload["origins"].items():
                    counted[origin] += n
        return counted

    def gap_events(self) -> list[dict[str, Any]]:
        return [e.payload for e in list(self.events) if e.type == GAP_TYPE]


@pytest.fixture
def hosts(bus_name: str, tmp_path: Path) -> Iterator[Callable[[int], list[Host]]]:
    made: list[Host] = []

    def make(n: int) -> list[Host]:
        for i in range(1, n + 1):
            d = tmp_path / f"h{i}"
            d.mkdir()
            made.append(Host(f"{bus_name}-h{i}", f"h{i}", d))
        return made

    try:
        yield make
    finally:
        for h in made:
            h.close()


def _accounted(hosts: list[Host]) -> bool:
    """Every host has every other host's events, delivered or counted."""
    for h in hosts:
        got, gaps = h.remote_indices(), h.gaps()
        for o in hosts:
            if o is not h and len(got.get(o.id, [])) + gaps[o.id] < o.published:
                return False
    return True


def check_exact(hosts: list[Host], *, no_gaps: bool = False) -> dict[str, int]:
    """Each origin's events in order, once each, the missing ones exactly the counted ones."""
    counted = {}
    for h in hosts:
        assert h.sub.dropped == 0, f"{h.id}'s test subscriber dropped events: the check is void"
        got, gaps = h.remote_indices(), h.gaps()
        for o in hosts:
            if o is h:
                continue
            seen = got.get(o.id, [])
            assert seen == sorted(set(seen)), f"{h.id} got {o.id}'s events out of order or twice"
            assert all(0 <= i < o.published for i in seen)
            assert len(seen) + gaps[o.id] == o.published, (
                f"{h.id}: {len(seen)} of {o.published} events of {o.id} delivered, "
                f"{gaps[o.id]} counted as gaps; gap events {h.gap_events()}")
            if no_gaps:
                assert gaps[o.id] == 0, h.gap_events()
            counted[f"{o.id}->{h.id}"] = gaps[o.id]
        # A host never gets its own events back from the stream.
        assert h.id not in got
    return counted


def settle(hosts: list[Host], timeout: float = 30) -> None:
    _wait(lambda: _accounted(hosts), timeout, "every event delivered or counted", 0.05)
    time.sleep(0.3)  # anything more (a duplicate) would show now


def publish_for(hosts: list[Host], seconds: float, rate: float,
                during: Callable[[float], None] | None = None) -> None:
    """Publish on every host at *rate* events/s each for *seconds*; call *during(t)* as we go."""
    start = time.monotonic()
    sent = 0
    while (t := time.monotonic() - start) < seconds:
        want = int(t * rate)
        while sent < want:
            for h in hosts:
                h.publish()
            sent += 1
        if during is not None:
            during(t)
        time.sleep(0.002)


# --------------------------------------------------------------------------- tests


def test_remote_parses_the_type() -> None:
    r = remote("shmcast.in:1700000000000-3:web-2:members:x")
    assert r is not None
    assert (r.stream_id, r.origin, r.type) == ("1700000000000-3", "web-2", "members:x")
    assert remote("members") is None


def test_three_hosts_threads(hosts: Callable[[int], list[Host]],
                             redis_server: RedisServer) -> None:
    """Bridges as threads (the Python API): every event reaches every other host once."""
    hs = hosts(3)
    for h in hs:
        h.thread_bridge = Bridge(h.name, redis_server.url, stream=f"s:{hs[0].name}", host_id=h.id,
                                 state_dir=h.state_dir).start()
    for h in hs:
        assert h.thread_bridge is not None
        h.wait_bridge()
    for _ in range(100):
        for h in hs:
            h.publish(3)
        time.sleep(0.001)
    settle(hs)
    check_exact(hs, no_gaps=True)
    # Payload bytes travel unchanged, the stream id with the type.
    e = next(e for e in hs[1].events if remote(e))
    r = remote(e)
    assert r is not None
    assert r.origin in ("h1", "h3")
    ids = [entry[0].decode() for entry in redis_server.client().xrange(f"s:{hs[0].name}")]
    assert r.stream_id in ids
    for h in hs:
        b = h.thread_bridge
        assert b is not None
        assert (b.stats.events_out, b.stats.events_in) == (300, 600), b.stats
    # One connection per bridge.
    clients = redis_server.client().client_list()
    assert sum(1 for c in clients if c["name"].startswith("shmcast-bridge:")) == 3


def test_redis_killed_and_restarted(hosts: Callable[[int], list[Host]],
                                    redis_server: RedisServer) -> None:
    """SIGKILL redis-server mid-stream (no persistence: its stream is gone) and restart it."""
    hs = hosts(3)
    for h in hs:
        h.start_bridge(redis_server.url, "s")
    for h in hs:
        h.wait_bridge()
    state = {"killed": False, "restarted": False}

    def chaos(t: float) -> None:
        if t > 1.0 and not state["killed"]:
            redis_server.kill()
            state["killed"] = True
        elif t > 1.8 and not state["restarted"]:
            redis_server.start()
            state["restarted"] = True

    publish_for(hs, 3.5, 300, chaos)
    settle(hs)
    counted = check_exact(hs)
    for h in hs:
        assert h.status()["reconnects"] >= 1, h.status()
    print("gaps per origin->host after the Redis restart:", counted)


def test_bridge_killed_and_restarted(hosts: Callable[[int], list[Host]],
                                     redis_server: RedisServer) -> None:
    """SIGKILL one host's bridge mid-stream, twice, and restart it from its state file."""
    hs = hosts(3)
    for h in hs:
        h.start_bridge(redis_server.url, "s")
    for h in hs:
        h.wait_bridge()
    victim = hs[1]
    state = {"kills": 0, "at": 0.0}

    def chaos(t: float) -> None:
        if victim.proc is not None and state["kills"] < 2 and t > 0.7 + 1.4 * state["kills"]:
            victim.kill_bridge()
            state["kills"] += 1
            state["at"] = t
        elif victim.proc is None and t > state["at"] + 0.3:
            victim.start_bridge(redis_server.url, "s")

    publish_for(hs, 3.6, 300, chaos)
    if victim.proc is None:
        victim.start_bridge(redis_server.url, "s")
    victim.wait_bridge()
    for h in hs:  # once more after the restart: the victim's losses are counted on its next event
        h.publish()
    settle(hs)
    counted = check_exact(hs)
    # What the victim published while its bridge was dead never left: counted, by the others.
    assert counted["h2->h1"] > 0, counted
    assert counted["h2->h1"] == counted["h2->h3"], counted
    # What the others sent meanwhile waited in the stream: delivered, nothing counted.
    assert (counted["h1->h2"], counted["h3->h2"]) == (0, 0), (counted, victim.gap_events())
    print("gaps per origin->host after two bridge kills:", counted)


def test_trimmed_entries_are_one_counted_gap(hosts: Callable[[int], list[Host]],
                                             redis_server: RedisServer) -> None:
    """A reader stopped (SIGSTOP) while MAXLEN trims what it had not read: one gap, counted."""
    h1, h2 = hosts(2)
    h1.start_bridge(redis_server.url, "s", maxlen=20)
    h2.start_bridge(redis_server.url, "s", maxlen=20)
    h1.wait_bridge()
    h2.wait_bridge()
    h1.publish(10)
    _wait(lambda: len(h2.remote_indices().get("h1", [])) == 10, 10, "the first 10 events")
    assert h2.proc is not None
    os.kill(h2.proc.pid, signal.SIGSTOP)
    try:
        for _ in range(40):
            h1.publish(10)
            time.sleep(0.005)
        _wait(lambda: h1.status().get("events_out") == h1.published, 20,
              "h1's bridge to send everything (and the stream to be trimmed under it)")
        assert redis_server.client().xlen("s") < 100
    finally:
        os.kill(h2.proc.pid, signal.SIGCONT)
    h1.publish(1)
    settle([h1, h2])
    counted = check_exact([h1, h2])
    assert counted["h1->h2"] > 300, counted
    gaps = h2.gap_events()
    assert len(gaps) == 1, gaps
    assert gaps[0]["origins"] == {"h1": counted["h1->h2"]}, gaps
    _wait(lambda: h2.status().get("trims", 0) >= 1, 5, "the trim in the bridge's counters")
    st = h2.status()
    assert (st["gaps"], st["gap_events"]) == (1, counted["h1->h2"]), st


def _stream_view(h: Host) -> list[tuple[str, str, int]]:
    """The stream as host *h*'s bus holds it (with echo): (stream id, origin, index)."""
    out = []
    for e in list(h.events):
        r = remote(e)
        if r is not None and r.type == EV:
            out.append((r.stream_id, r.origin, e.payload["i"]))
    return out


def _feed_view(feed: shmcast.Feed, n: int, timeout: float = 20) -> list[tuple[str, str, int]]:
    """The first *n* stream events a feed hands out (local events among them are skipped)."""
    got: list[tuple[str, str, int]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out with {len(got)} of {n} stream events: {got[-3:]}")
        with contextlib.suppress(TimeoutError):
            e = feed.get(timeout=left)
            r = remote(e)
            if r is not None and r.type == EV:
                got.append((r.stream_id, r.origin, e.payload["i"]))
    return got


def _feed_rest(feed: shmcast.Feed, quiet: float = 0.5) -> list[tuple[str, str, int]]:
    """Every stream event a feed hands out until it is quiet for *quiet* s."""
    got: list[tuple[str, str, int]] = []
    with contextlib.suppress(AssertionError):
        while True:
            got.extend(_feed_view(feed, 1, quiet))
    return got


def test_resume_on_another_host_by_stream_id(hosts: Callable[[int], list[Host]],
                                            redis_server: RedisServer) -> None:
    """Two hosts, bridges with echo: each bus holds the whole stream in one order with its
    ids, so a client that saw stream id X on host a and reconnects to host b with it gets
    exactly what it missed there; an id whose followers b's hub no longer keeps counts them."""
    h1, h2 = hosts(2)
    for h in (h1, h2):
        h.thread_bridge = Bridge(h.name, redis_server.url, stream="s", host_id=h.id,
                                 state_dir=h.state_dir, echo=True).start()
    for h in (h1, h2):
        h.wait_bridge()
    with shmcast.Hub(h2.name, history=1000, buffer=1000) as hub, \
            shmcast.Hub(h2.name, history=10, buffer=1000) as small:
        for _ in range(40):
            h1.publish()
            h2.publish()
        _wait(lambda: len(_stream_view(h1)) == len(_stream_view(h2)) == 80, 20,
              "both hosts to hold the 80 entries")
        a, b = _stream_view(h1), _stream_view(h2)
        assert a == b, "the hosts hold the stream in different orders"
        assert Counter(o for _, o, _ in a) == {"h1": 40, "h2": 40}
        _wait(lambda: hub.version == small.version == h2.bus.version, 10, "b's hubs")

        # The client saw a[29] on host a (an SSE id); it reconnects to host b.
        client_id = a[29][0]
        feed = hub.subscribe(since=client_id)
        for _ in range(5):  # and it goes on live, both hosts publishing
            h1.publish()
            h2.publish()
        _wait(lambda: len(_stream_view(h1)) == 90, 20, "the 10 more entries")
        missed = _stream_view(h1)[30:]
        assert _feed_view(feed, len(missed)) == missed
        assert feed.dropped == 0
        assert _feed_rest(feed) == []  # and nothing twice
        assert feed.dropped == 0

        # The hub with history=10 keeps fewer than 10 entries: an id 15 entries back is
        # older than those (but among the 30 events it remembers): the rest is a gap, exactly.
        _wait(lambda: small.version == h2.bus.version, 10, "b's small hub")
        old = hub.subscribe(since="0-0")  # (the big hub's view, for the count below)
        whole = _feed_view(old, 90)
        assert whole == _stream_view(h2)
        back = whole[-16][0]
        late = small.subscribe(since=back)
        after = whole[-15:]
        kept = _feed_rest(late)
        assert kept == after[len(after) - len(kept):], "not the newest entries"
        assert 0 < len(kept) < len(after)
        assert len(kept) + late.dropped == len(after), (len(kept), late.dropped, len(after))


def test_echo_survives_a_bridge_kill(hosts: Callable[[int], list[Host]],
                                     redis_server: RedisServer) -> None:
    """With echo, a SIGKILLed and restarted bridge: every host's stream view has every
    origin's entries, its own included, in order, each once, or counted; all hosts agree."""
    hs = hosts(2)
    for h in hs:
        h.start_bridge(redis_server.url, "s", echo=True)
    for h in hs:
        h.wait_bridge()
    victim = hs[1]
    state = {"killed": False, "at": 0.0}

    def chaos(t: float) -> None:
        if not state["killed"] and t > 0.8:
            victim.kill_bridge()
            state["killed"], state["at"] = True, t
        elif victim.proc is None and t > state["at"] + 0.3:
            victim.start_bridge(redis_server.url, "s", echo=True)

    publish_for(hs, 2.5, 300, chaos)
    victim.wait_bridge()
    for h in hs:  # once more: the victim's losses at its origin are counted on its next event
        h.publish()

    def accounted() -> bool:
        return all(sum(1 for _, o, _ in _stream_view(h) if o == x.id) + h.gaps()[x.id]
                   >= x.published for h in hs for x in hs)

    _wait(accounted, 30, "every entry delivered or counted on every host, own ones too", 0.05)
    time.sleep(0.3)
    views = [_stream_view(h) for h in hs]
    for h, view in zip(hs, views, strict=True):
        for x in hs:
            got = [i for _, o, i in view if o == x.id]
            assert got == sorted(set(got)), f"{h.id}: {x.id}'s entries out of order or twice"
            assert len(got) + h.gaps()[x.id] == x.published, (h.id, x.id, h.gap_events())
    # One order with the same ids on both hosts: the entries both have, in the same order.
    common = {sid for sid, _, _ in views[0]} & {sid for sid, _, _ in views[1]}
    assert len(common) >= 0.95 * max(len(v) for v in views), (len(common), len(views[0]))
    assert [v for v in views[0] if v[0] in common] == [v for v in views[1] if v[0] in common]
    assert victim.gaps()[victim.id] > 0, "what the victim published while down never left"


def test_publisher_tells_a_restart_whether_its_publish_landed(bus_name: str) -> None:
    """What the bridge asks after a SIGKILL inside a publish, without reading our attributes."""
    from shmcast import Publisher

    with shmcast.Bus(bus_name, max_publishers=1, slots=8), Publisher(bus_name) as pub:
        at = pub._position
        assert at is not None
        assert at[0] == 0
        assert Publisher._landed(bus_name, at, "t") is False
        pub.publish("t", 1)
        assert Publisher._landed(bus_name, at, "t") is True
        assert Publisher._landed(bus_name, at, b"other") is False
        assert pub._position == (0, at[1] + 1)
        def write_over() -> bool:  # later events go round the inbox: it cannot tell
            pub.publish("u")  # (rejected while the owner's drain thread lags: then again)
            return Publisher._landed(bus_name, at, "t") is None

        _wait(write_over, 20, "the slot written over", 0.005)
        now = pub._position
        assert now is not None
        assert now[1] >= at[1] + 8 + 1  # round the 8 slots since
    assert Publisher._landed(bus_name, at, "t") is None  # the bus is gone


# --------------------------------------------------------------------------- network namespaces


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "no ip command"
    probe = f"shmcp{os.getpid() % 100000}"
    try:
        r = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"ip netns add failed: {e}"
    if r.returncode != 0:
        return f"ip netns add is not allowed here: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Netns:
    """Namespaces redis + one per host, joined by veth pairs; every one removed at the end."""

    def __init__(self, n_hosts: int) -> None:
        tag = f"{os.getpid() % 100000}"
        self.redis_ns = f"shmcr{tag}"
        self.host_ns = [f"shmch{tag}-{i}" for i in range(1, n_hosts + 1)]
        self.made: list[str] = []
        self.links: list[tuple[str, str]] = []  # (namespace, interface) on the redis side
        self.subnet = 100 + os.getpid() % 100

    def setup(self) -> None:
        _ip("netns", "add", self.redis_ns)
        self.made.append(self.redis_ns)
        _ip("-n", self.redis_ns, "link", "set", "lo", "up")
        for i, ns in enumerate(self.host_ns, start=1):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            a, b = f"shr{i}", f"shh{i}"
            _ip("-n", self.redis_ns, "link", "add", a, "type", "veth", "peer", "name", b,
                "netns", ns)
            _ip("-n", self.redis_ns, "addr", "add", f"10.{self.subnet}.{i}.1/24", "dev", a)
            _ip("-n", ns, "addr", "add", f"10.{self.subnet}.{i}.2/24", "dev", b)
            _ip("-n", self.redis_ns, "link", "set", a, "up")
            _ip("-n", ns, "link", "set", b, "up")
            self.links.append((self.redis_ns, a))

    def redis_addr(self, i: int) -> str:
        return f"10.{self.subnet}.{i}.1"

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def link(self, i: int, up: bool) -> None:
        ns, dev = self.links[i - 1]
        _ip("-n", ns, "link", "set", dev, "up" if up else "down")

    def teardown(self) -> None:
        # Deleting a namespace deletes its ends of the veth pairs, and with them the peers.
        for ns in reversed(self.made):
            _ip("netns", "del", ns, check=False)
        left = _ip("netns", "list", check=False).stdout
        assert not any(ns in left for ns in self.made), left


def test_partition_in_network_namespaces(hosts: Callable[[int], list[Host]],
                                         tmp_path: Path) -> None:
    """Each host's bridge in its own network namespace, veth to redis's; cut one link, restore."""
    why = _netns_unavailable()
    if why:
        pytest.skip(f"network namespaces unavailable: {why}")
    net = Netns(2)
    server: RedisServer | None = None
    hs: list[Host] = []
    try:
        net.setup()
        # Redis listens on its namespace's end of every link; each host reaches it on its own.
        server = RedisServer(tmp_path, host=net.redis_addr(1))
        _start_ns_redis(server, net)
        hs = hosts(2)
        for i, h in enumerate(hs, start=1):
            url = f"redis://{net.redis_addr(i)}:{server.port}/0"
            h.start_bridge(url, "s", prefix=net.exec_prefix(net.host_ns[i - 1]))
        for h in hs:
            h.wait_bridge()
        state = {"cut": False, "restored": False}

        def chaos(t: float) -> None:
            if t > 0.8 and not state["cut"]:
                net.link(1, up=False)
                state["cut"] = True
            elif t > 4.0 and not state["restored"]:
                net.link(1, up=True)
                state["restored"] = True

        publish_for(hs, 5.0, 200, chaos)
        settle(hs, timeout=40)
        # Nothing was lost: the cut host's events waited in its ring, the others' in the stream.
        check_exact(hs, no_gaps=True)
        assert hs[0].status()["reconnects"] >= 1, hs[0].status()
    finally:
        for h in hs:
            h.stop_bridge()
        if server is not None:
            server.kill()
        net.teardown()


def _start_ns_redis(server: RedisServer, net: Netns) -> None:
    """redis-server inside the redis namespace, bound to its veth addresses (ping through ns)."""
    assert REDIS_SERVER is not None
    addrs = [net.redis_addr(i) for i in range(1, len(net.host_ns) + 1)]
    log = open(server.workdir / "redis-ns.log", "ab")  # noqa: SIM115
    server.proc = subprocess.Popen(
        [*net.exec_prefix(net.redis_ns), REDIS_SERVER, "--port", str(server.port),
         "--bind", *addrs, "--save", "", "--appendonly", "no", "--dir", str(server.workdir),
         # Only our namespace's addresses are bound: nothing outside can reach it.
         "--protected-mode", "no"],
        stdout=log, stderr=subprocess.STDOUT)
    log.close()

    def up() -> bool:
        r = subprocess.run([*net.exec_prefix(net.host_ns[0]), "redis-cli", "-h", addrs[0],
                            "-p", str(server.port), "ping"], capture_output=True, text=True,
                           timeout=10, check=False)
        return r.stdout.strip() == "PONG"

    _wait(up, 10, "redis-server in its namespace", 0.1)


def test_bridge_ring_overflow_is_counted(hosts: Callable[[int], list[Host]],
                                         redis_server: RedisServer) -> None:
    """A stopped bridge's own subscription overflows: the local events it lost are counted
    (its events from the other host, lost in the same ring, are told apart and not)."""
    h1, h2 = hosts(2)
    for h in (h1, h2):
        h.start_bridge(redis_server.url, "s")
    for h in (h1, h2):
        h.wait_bridge()
    h1.publish(5)
    h2.publish(5)
    _wait(lambda: _accounted([h1, h2]), 20, "the first events")
    assert h1.proc is not None
    os.kill(h1.proc.pid, signal.SIGSTOP)
    try:
        for _ in range(30):
            h1.publish(50)  # 1500 in a ring of 1024
            time.sleep(0.01)
    finally:
        os.kill(h1.proc.pid, signal.SIGCONT)
    for _ in range(20):  # traffic both ways again: h1's bridge sees its own events come back
        h1.publish()
        h2.publish()
        time.sleep(0.01)
    settle([h1, h2])
    counted = check_exact([h1, h2])
    assert counted["h1->h2"] >= 1500 - 1024, counted
    assert counted["h2->h1"] == 0, counted
    _wait(lambda: h1.status().get("out_lost") == counted["h1->h2"], 5, "out_lost in h1's status")


def test_cli_status_and_stat(hosts: Callable[[int], list[Host]], redis_server: RedisServer,
                             tmp_path: Path) -> None:
    """``shmcast bridge NAME --status`` and ``shmcast stat NAME`` (text and JSON) show the
    bridge: connected, lag, gaps, events in and out; ``--echo`` brings our own events back."""
    (h1,) = hosts(1)
    h1.start_bridge(redis_server.url, "s", echo=True)
    h1.wait_bridge()
    h1.publish(7)
    _wait(lambda: h1.status().get("events_out") == 7 and h1.status().get("events_in") == 7,
          10, "the 7 events out and back in")
    assert [i for o, i in (r[1:] for r in _stream_view(h1)) if o == "h1"] == list(range(7))
    env = dict(os.environ, SHMCAST_RUN_DIR=str(h1.state_dir))
    status = subprocess.run([sys.executable, "-m", "shmcast", "bridge", h1.name, "--status",
                             "--json"], capture_output=True, text=True, env=env, timeout=30,
                            check=True)
    (one,) = json.loads(status.stdout)
    assert one["running"] is True
    assert (one["host"], one["events_out"], one["connected"], one["echo"]) == ("h1", 7, True, True)
    stat = subprocess.run([sys.executable, "-m", "shmcast", "stat", h1.name],
                          capture_output=True, text=True, env=env, timeout=30, check=True)
    assert "bridge h1 <-> s (both, echo, pid" in stat.stdout, stat.stdout
    assert "connected): in 7, out 7, lag " in stat.stdout, stat.stdout
    assert "gaps 0 (0 events)" in stat.stdout, stat.stdout
    stat_json = subprocess.run([sys.executable, "-m", "shmcast", "stat", h1.name, "--json"],
                               capture_output=True, text=True, env=env, timeout=30, check=True)
    (listed,) = json.loads(stat_json.stdout)["bridges"]
    assert {k: listed[k] for k in ("connected", "events_in", "events_out", "gaps")} == {
        "connected": True, "events_in": 7, "events_out": 7, "gaps": 0}
    assert listed["lag_ms"] >= 0
    h1.stop_bridge()
    after = subprocess.run([sys.executable, "-m", "shmcast", "bridge", h1.name, "--status"],
                           capture_output=True, text=True, env=env, timeout=30, check=True)
    assert "not running" in after.stdout, after.stdout


def test_state_file_survives_a_torn_write(tmp_path: Path) -> None:
    """A kill in the middle of a state write leaves the previous copy, whole."""
    from shmcast import bridge as br

    path = tmp_path / "s.state"
    st = br._State(path)
    st.last_in = (5, 1)
    st.set_origin("h2", 7, 41)
    st.out_seq = 9
    st.save()
    st.last_in = (6, 0)
    st.set_origin("h2", 7, 42)
    st.save()
    # The last write was cut short: its copy's generation is still zero.
    st.q[br._COPY_OFF[st.gen % 2] // 8] = 0
    st.close()
    again = br._State(path)
    try:
        assert again.last_in == (5, 1)
        assert again.origins == {"h2": (7, 41)}
        assert again.out_seq == 9
        # It goes on from there, and its next write is the one read back.
        again.last_in = (6, 3)
        again.save()
    finally:
        again.close()
    third = br._State(path)
    try:
        assert third.last_in == (6, 3)
        assert third.origins == {"h2": (7, 41)}
    finally:
        third.close()


@pytest.mark.stress
@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [13, 14, 15])
def test_chaos_many_kills(hosts: Callable[[int], list[Host]], redis_server: RedisServer,
                          seed: int) -> None:
    """Under -m stress: 20 s of three hosts publishing while bridges are SIGKILLed at random
    and Redis is killed and restarted twice; the same exact accounting afterwards."""
    import random

    rng = random.Random(seed)
    hs = hosts(3)
    for h in hs:
        h.start_bridge(redis_server.url, "s")
    for h in hs:
        h.wait_bridge()
    dead: dict[int, float] = {}
    plan = {"next_kill": 0.5, "redis": [6.0, 13.0], "redis_down": None}

    def chaos(t: float) -> None:
        for i, at in list(dead.items()):
            if t > at:
                hs[i].start_bridge(redis_server.url, "s")
                del dead[i]
        if t > plan["next_kill"] and t < 18:
            i = rng.randrange(3)
            if hs[i].proc is not None and i not in dead:
                hs[i].kill_bridge()
                dead[i] = t + rng.uniform(0.05, 0.6)
            plan["next_kill"] = t + rng.uniform(0.3, 1.2)
        if plan["redis"] and t > plan["redis"][0]:
            plan["redis"].pop(0)
            redis_server.kill()
            plan["redis_down"] = t + rng.uniform(0.1, 1.0)
        if plan["redis_down"] is not None and t > plan["redis_down"]:
            redis_server.start()
            plan["redis_down"] = None

    publish_for(hs, 20.0, 200, chaos)
    if plan["redis_down"] is not None:
        redis_server.start()
    for i in list(dead):
        hs[i].start_bridge(redis_server.url, "s")
    for h in hs:
        h.wait_bridge(40)
    for h in hs:  # one more each: a host's losses at its origin are counted on its next event
        h.publish()
    settle(hs, timeout=60)
    counted = check_exact(hs)
    print("gaps per origin->host after the chaos:", counted)
