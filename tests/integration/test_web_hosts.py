"""The SSE examples across two hosts (issue 13): resume on another host by stream id.

Two "hosts" on this machine: two gunicorn servers of one example, each with its
own bus and its own ``shmcast bridge --echo`` process, both bridged through one
Redis stream of a ``redis-server`` on 127.0.0.1, all started here and stopped
by pid. The servers run in the cross-host mode (``SHMCAST_STREAM_IDS=1``): a
stream carries the Redis stream's entries, with their stream ids. A client that
leaves host a and comes back to host b with its ``Last-Event-ID`` gets exactly
what it missed there (same ids, same data as a witness on host a), then the live
entries; one that missed more than host b keeps gets ``: dropped`` and a
snapshot.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import shmcast
from _support import bus_entries, kill_popen, skip_or_fail, wait_until

try:
    from . import _web_helpers as web
except ImportError:  # tests/ is not a package
    import _web_helpers as web

HISTORY = 100  # entries each worker keeps
ENV = {
    "SHMCAST_STREAM_IDS": "1",
    "SHMCAST_HISTORY": str(HISTORY),
    "SHMCAST_HEARTBEAT": "0.5",  # two hosts: 4 entries a second, and the messages
    "SHMCAST_CHURN": "0",
    "SHMCAST_KEYFRAME": "1.0",
    "SHMCAST_BUFFER": "512",  # the witness keeps up with a burst of 120 messages
}
DEPS = {"gunicorn_sse": ("gunicorn", "flask", "httpx"),
        "asgi_sse": ("gunicorn", "starlette", "uvicorn", "uvicorn_worker", "httpx")}


@pytest.fixture
def redis_url(tmp_path: Path):
    if shutil.which("redis-server") is None:
        skip_or_fail("redis-server is not installed (CI installs Debian's redis-server)")
    try:
        import redis  # noqa: F401  (the bridge's client)
    except ImportError:
        skip_or_fail("redis-py is missing (pip install 'shmcast[redis]')")
    try:
        from .test_bridge import RedisServer
    except ImportError:
        from test_bridge import RedisServer
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server.url
    finally:
        server.kill()


class BridgeProcess:
    """``shmcast bridge NAME --echo`` of one host, stopped by pid."""

    def __init__(self, bus: str, host_id: str, url: str, stream: str, state_dir: Path) -> None:
        state_dir.mkdir()
        self.state_dir = state_dir
        self.log = state_dir / "bridge.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shmcast", "bridge", bus, "--redis", url,
                 "--stream", stream, "--host-id", host_id, "--echo",
                 "--state-dir", str(state_dir)],
                stdout=log, stderr=subprocess.STDOUT)

    def connected(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text(errors="replace")
        for path in self.state_dir.glob("bridge.*.json"):
            with contextlib.suppress(OSError, ValueError):
                status = json.loads(path.read_text())
                return status.get("pid") == self.proc.pid and bool(status.get("connected"))
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                kill_popen(self.proc)
                raise AssertionError("the bridge ignored SIGTERM") from None


def message(n: int):
    return lambda e: e.type == "message" and e.json() == {"n": n}


def entries(events):
    return [(e.id, e.type, e.data) for e in events]


@pytest.mark.parametrize("example", ["gunicorn_sse", "asgi_sse"])
@pytest.mark.timeout(90)
def test_resume_on_another_host_by_stream_id(example, bus_name, tmp_path, redis_url):
    web.require(*DEPS[example])
    import httpx

    stream = f"shmcast:{bus_name}"
    buses = [f"{bus_name}-a", f"{bus_name}-b"]
    servers: list[web.Gunicorn] = []
    bridges: list[BridgeProcess] = []
    witness = None
    try:
        for bus, h in zip(buses, "ab", strict=True):
            (tmp_path / h).mkdir()
            server = web.Gunicorn(example, bus, tmp_path / h, env=ENV)
            servers.append(server)
            server.start()
            bridges.append(BridgeProcess(bus, h, redis_url, stream, tmp_path / h / "state"))
        for bridge in bridges:
            wait_until(bridge.connected, 20, "the bridges to connect", web.POLL)
        a, b = servers
        http = httpx.Client(timeout=5)
        n = 0

        def publish(count: int) -> None:  # POST /publish on either host, in turn
            nonlocal n
            for _ in range(count):
                r = http.post((a, b)[n % 2].url + "/publish", json={"n": n})
                assert r.status_code == 202, (r.status_code, r.text)
                n += 1

        witness = web.SSEClient(a.url, reconnect=False, id_type=str)
        witness.start()
        witness.wait_events(1, 20, where=lambda e: e.type == "members")
        publish(5)
        witness.wait_events(1, 20, where=message(4))
        # Only the stream's entries, each once, with their stream ids: what was published
        # on this host directly is not served (it comes back through the echo).
        seen = witness.events[:]
        assert all(isinstance(e.id, str) and e.id.count("-") == 1 for e in seen), seen[:3]
        assert len({e.id for e in seen}) == len(seen)
        assert sorted(e.json()["n"] for e in seen if e.type == "message") == [0, 1, 2, 3, 4]

        # 1. A client reads host a: a snapshot, then the entries after it, as the witness
        # saw them; it goes away and misses 10 messages.
        _, first, _ = web.read_stream(a.url, until=lambda ev: len(ev) >= 4, id_type=str)
        assert first[0].type == "members", first[0]
        last = first[-1].id
        witness.wait_events(1, 20, where=lambda e: e.id == last)
        at = [e.id for e in witness.events].index(first[0].id)
        assert entries(first) == entries(witness.events[at:at + len(first)])
        publish(10)
        witness.wait_events(1, 20, where=message(14))

        # 2. Back on host b with its Last-Event-ID: exactly what it missed, then live ones.
        def until_live(events):
            if n == 15 and any(map(message(14), events)):
                publish(1)  # sent while the stream is open: a live entry
            return any(map(message(15), events))

        _, resumed, comments = web.read_stream(b.url, last_event_id=last, until=until_live,
                                               id_type=str, timeout=20)
        assert not [c for c in comments if c.startswith(("dropped", "waiting"))], comments
        witness.wait_events(1, 20, where=message(15))
        ids = [e.id for e in witness.events]
        after = ids.index(last) + 1
        assert entries(resumed) == entries(witness.events[after:after + len(resumed)])
        assert {e.json()["n"] for e in resumed if e.type == "message"} >= set(range(5, 16))

        # 3. Back on host b after missing more than it keeps: a counted gap, a snapshot.
        old = resumed[-1].id
        publish(HISTORY + 20)
        witness.wait_events(1, 30, where=message(n - 1))
        _, healed, comments = web.read_stream(b.url, last_event_id=old,
                                              until=lambda ev: len(ev) >= 3, id_type=str)
        dropped = [int(c.split()[1]) for c in comments if c.startswith("dropped")]
        missed = len(witness.events) - 1 - [e.id for e in witness.events].index(old)
        assert len(dropped) == 1, comments
        assert 20 <= dropped[0] <= missed, (dropped, missed)
        assert healed[0].type == "members", healed[0]
        witness.wait_events(1, 20, where=lambda e: e.id == healed[-1].id)
        at = [e.id for e in witness.events].index(healed[0].id)
        assert at > [e.id for e in witness.events].index(old)
        assert entries(healed) == entries(witness.events[at:at + len(healed)])
        # Every entry once, from both hosts, and the witness never fell behind.
        assert len({e.id for e in witness.events}) == len(witness.events)
        assert {e.json()["master"] for e in witness.events if e.type == "heartbeat"} \
            == {a.pid, b.pid}
        # (in the stream's order: that of the XADDs of two bridges, each in its host's order)
        got = [e.json()["n"] for e in witness.events if e.type == "message"]
        assert sorted(got) == list(range(n))
        assert [i for i in got if i % 2 == 0] == list(range(0, n, 2))
        assert [i for i in got if i % 2] == list(range(1, n, 2))
        assert not [c for _, c in witness.comments if c.startswith("dropped")]
        http.close()
    finally:
        if witness is not None:
            witness.stop()
        for bridge in bridges:
            bridge.stop()
        for server in servers:
            server.stop()
    for bus in buses:
        assert bus_entries(bus) == [], f"bus {bus} left in /dev/shm"


@pytest.mark.timeout(10)
def test_stream_rules_of_the_cross_host_mode():
    """stream_ids.Renderer alone: only entries, with their ids; a gap or a feed's loss is
    ``: dropped K``, then nothing until the next members entry."""
    path = web.EXAMPLES / "gunicorn_sse" / "stream_ids.py"
    spec = importlib.util.spec_from_file_location("stream_ids_under_test", path)
    assert spec is not None
    assert spec.loader is not None
    stream_ids = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stream_ids)
    versions = iter(range(1, 100))

    def event(type_: str, payload) -> shmcast.Event:
        return shmcast.Event(type_, payload, next(versions), 0.0, json.dumps(payload).encode())

    feed = SimpleNamespace(dropped=0)
    renderer = stream_ids.Renderer(feed, synced=True)

    def render(*events) -> str:
        out: list[str] = []
        for e in events:
            renderer.render(e, out)
        return "".join(out)

    assert render(event("heartbeat", {"h": 0}),  # published here: it comes back echoed
                  event("shmcast.in:5-0:a:heartbeat", {"h": 1})) \
        == 'id: 5-0\nevent: heartbeat\ndata: {"h": 1}\n\n'
    assert render(event("shmcast.gap", {"count": 3}), event("shmcast.in:9-0:b:heartbeat", {}),
                  event("shmcast.in:9-1:b:members", {"m": 1}),
                  event("shmcast.in:9-2:a:message", {"n": 1})) \
        == (': dropped 3\n\nid: 9-1\nevent: members\ndata: {"m": 1}\n\n'
            'id: 9-2\nevent: message\ndata: {"n": 1}\n\n')
    feed.dropped = 2
    assert render(event("shmcast.in:10-0:a:message", {}),
                  event("shmcast.in:11-0:a:members", {"m": 2})) \
        == ': dropped 2\n\nid: 11-0\nevent: members\ndata: {"m": 2}\n\n'
    assert stream_ids.parse_stream_id(" 1733094000123-7 ") == "1733094000123-7"
    assert [stream_ids.parse_stream_id(v) for v in ("42", "", None, "1-2-3", "a-1")] \
        == [None] * 5
