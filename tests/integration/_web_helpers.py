"""Helpers for the real-gunicorn tests of examples/gunicorn_sse and examples/asgi_sse.

Every process here is started by the test and stopped by its pid (SIGTERM,
then SIGKILL of its process group on timeout). Every wait has a deadline.
Only loopback addresses are used.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from _support import bus_entries, wait_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def require(*modules: str) -> None:
    for module in modules:
        pytest.importorskip(module)


# How often the waits here poll: they read logs, scan /proc and make HTTP requests.
POLL = 0.05


def children_of(pid: int) -> set[int]:
    """Live (non-zombie) direct children of `pid`, from /proc."""
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            kids.add(int(entry))
    return kids


# --- gunicorn ------------------------------------------------------------------
class Gunicorn:
    """One gunicorn master started from an example directory."""

    def __init__(
        self,
        example: str,
        bus: str,
        tmp_path: Path,
        *,
        args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        workers: int = 2,
        sndbuf: int | None = None,
    ) -> None:
        self.example_dir = EXAMPLES / example
        self.bus = bus
        self.workers = workers
        self.log_path = tmp_path / f"gunicorn-{example}.log"
        runtime = tmp_path / "run"  # gunicorn>=24 puts its control socket there
        runtime.mkdir(exist_ok=True)
        self.env = {
            **os.environ,
            "SHMCAST_BUS": bus,
            "SHMCAST_HEARTBEAT": "0.1",
            "SHMCAST_CHURN": "0.5",
            "SHMCAST_KEYFRAME": "1.0",
            "SHMCAST_KEEPALIVE": "1.0",
            "XDG_RUNTIME_DIR": str(runtime),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.listener: socket.socket | None = None
        bind = "127.0.0.1:0"  # gunicorn picks a free port and logs it
        if sndbuf is not None:
            # A listening socket of our own, handed over as fd://N: the
            # connections gunicorn accepts on it inherit its small send
            # buffer, so a client that stops reading blocks the server soon.
            self.listener = socket.socket()
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            self.listener.bind(("127.0.0.1", 0))
            self.listener.listen(64)
            self.listener.set_inheritable(True)
            bind = f"fd://{self.listener.fileno()}"
        self.args = [
            sys.executable, "-m", "gunicorn",
            "-c", "gunicorn.conf.py",
            "--chdir", str(self.example_dir),
            "-b", bind,
            "-w", str(workers),
            "--graceful-timeout", "5",
            *args,
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> Gunicorn:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.args,
                cwd=self.example_dir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for the SIGKILL fallback
                pass_fds=(self.listener.fileno(),) if self.listener else (),
            )
        if self.listener is not None:
            self.listener.close()  # gunicorn has its own copy

        def listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited early:\n{self.log()}")
            m = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", self.log())
            return m and m.group(1)

        try:
            self.url = wait_until(listening, timeout, "gunicorn to listen", POLL)
            self.wait_workers(self.workers, timeout)
        except BaseException:
            with contextlib.suppress(AssertionError):
                self.stop()
            raise

    def worker_pids(self) -> set[int]:
        return children_of(self.pid)

    def wait_workers(self, n: int, timeout: float = 15.0, exclude: Iterable[int] = ()):
        """Wait until `n` workers, none in `exclude`, have booted and /healthz answers."""
        import httpx

        exclude = set(exclude)

        def ready():
            pids = self.worker_pids()
            if len(pids) != n or pids & exclude:
                return None
            log = self.log()
            if not all(f"Booting worker with pid: {pid}" in log for pid in pids):
                return None
            try:
                httpx.get(self.url + "/healthz", timeout=2.0).raise_for_status()
            except httpx.HTTPError:
                return None
            return pids

        return wait_until(ready, timeout, f"{n} gunicorn workers to boot", interval=0.1)

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> float:
        """Signal the master (SIGTERM: graceful stop, SIGINT: Ctrl-C); SIGKILL
        its group on timeout. Returns the seconds it took."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        start = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.reclaim_bus()
            raise AssertionError(
                f"gunicorn ignored {signal.Signals(sig).name} for {timeout}s:\n{self.log()}"
            ) from None
        return time.monotonic() - start

    def reclaim_bus(self) -> None:
        """After a SIGKILLed master: remove the bus it left, through shmcast."""
        from shmcast import Bus

        # workers notice the dead master within ~1 s and exit
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not children_of(self.pid), 5, "orphaned workers", POLL)
        with contextlib.suppress(Exception):
            Bus(self.bus).close()  # a stale bus of a dead publisher is reclaimed


# --- SSE clients --------------------------------------------------------------
@dataclass
class SSEEvent:
    id: int  # or a stream id "<ms>-<seq>" (str), from an example in the cross-host mode
    type: str
    data: str
    conn: int  # which connection of the client delivered it
    t: float = field(default_factory=time.monotonic)

    def json(self):
        return json.loads(self.data)


class SSEParser:
    def __init__(self, id_type=int) -> None:
        self.id_type = id_type
        self.id = self.type = None
        self.data: list[str] = []

    def feed(self, line: str, conn: int, on_event, on_comment) -> None:
        if line == "":
            if self.data or self.type:
                on_event(SSEEvent(self.id_type(self.id), self.type or "message",
                                  "\n".join(self.data), conn))
            self.id = self.type = None
            self.data = []
        elif line.startswith(":"):
            on_comment(line[1:].strip())
        else:
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "id":
                self.id = value
            elif key == "event":
                self.type = value
            elif key == "data":
                self.data.append(value)


class SSEClient(threading.Thread):
    """An httpx client reading /events in a thread, reconnecting when a stream ends.

    Like a browser's EventSource, it reconnects with ``Last-Event-ID`` (the id of
    the last event it received), unless ``resume=False``.
    """

    def __init__(self, url: str, *, reconnect: bool = True, max_seconds: float = 60.0,
                 resume: bool = True, id_type=int) -> None:
        super().__init__(daemon=True, name=f"sse-client-{url}")
        self.id_type = id_type
        self.url = url + "/events"
        self.reconnect = reconnect
        self.resume = resume
        self.deadline = time.monotonic() + max_seconds
        self.events: list[SSEEvent] = []
        self.comments: list[tuple[int, str]] = []
        self.ends: list[tuple[int, str]] = []  # (conn, how the stream ended)
        self.sent_ids: dict[int, int] = {}  # conn: the Last-Event-ID it sent
        self.workers: dict[int, int] = {}  # conn: the pid of the worker that served it
        self.conns = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import httpx

        timeout = httpx.Timeout(5.0, read=3.0)
        with httpx.Client(timeout=timeout) as client:
            while not self._halt.is_set() and time.monotonic() < self.deadline:
                conn = self.conns
                self.conns += 1
                parser = SSEParser(self.id_type)
                headers = {}
                if self.resume and self.events:
                    self.sent_ids[conn] = self.events[-1].id
                    headers["Last-Event-ID"] = str(self.events[-1].id)
                try:
                    with client.stream("GET", self.url, headers=headers) as response:
                        if response.status_code != 200:
                            self.ends.append((conn, f"status {response.status_code}"))
                            time.sleep(0.1)
                            continue
                        self.workers[conn] = int(response.headers["x-shmcast-worker"])
                        for line in response.iter_lines():
                            parser.feed(
                                line,
                                conn,
                                self.events.append,
                                lambda c, conn=conn: self.comments.append((conn, c)),
                            )
                            if self._halt.is_set():
                                break
                        else:
                            self.ends.append((conn, "closed"))
                except httpx.HTTPError as exc:
                    self.ends.append((conn, f"error {type(exc).__name__}: {exc}"))
                if not self.reconnect:
                    break
                time.sleep(0.05)

    def halt(self) -> None:
        """Ask the thread to stop at the next line it reads (stop() waits for it)."""
        self._halt.set()

    def stop(self) -> None:
        self.halt()
        self.join(timeout=10)
        assert not self.is_alive(), "SSE client thread did not stop"

    def wait_events(self, n: int, timeout: float, where=lambda e: True) -> list[SSEEvent]:
        return wait_until(
            lambda: len([e for e in list(self.events) if where(e)]) >= n and self.events,
            timeout,
            f"{n} events at {self.url}",
            POLL,
        )

    def by_conn(self) -> dict[int, list[SSEEvent]]:
        out: dict[int, list[SSEEvent]] = {}
        for e in list(self.events):
            out.setdefault(e.conn, []).append(e)
        return out


def check_stream(events: list[SSEEvent], *, allow_gaps: bool, after: int | None = None) -> int:
    """The stream rules of the examples; returns the number of holes.

    Ids strictly increase; the first event is a members snapshot, unless the
    stream resumed one that ended at id *after* (sent as ``Last-Event-ID``): then
    it may go on at ``after + 1``; every hole in the ids is immediately followed
    by a members snapshot.
    """
    assert events, "no events"
    if after is None or events[0].id != after + 1:
        assert events[0].type == "members", f"first event is {events[0].type}, not a snapshot"
    holes = 0
    for prev, cur in itertools.pairwise(events):
        assert cur.id > prev.id, f"ids not increasing: {prev.id} then {cur.id}"
        if cur.id != prev.id + 1:
            holes += 1
            assert allow_gaps, f"hole {prev.id} -> {cur.id} in a stream that should have none"
            assert cur.type == "members", f"hole {prev.id} -> {cur.id} not healed by a snapshot"
    return holes


class StalledClient:
    """A raw socket that asks for /events and then does not read, until resume()."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(5)
        self.sock.connect((host, int(port)))
        self.sock.sendall(f"GET /events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        self.events: list[SSEEvent] = []
        self.comments: list[str] = []
        self.worker: int | None = None  # the pid that served it, once read

    def read_for(self, seconds: float) -> None:
        """Read (and parse) whatever arrives for `seconds`."""
        deadline = time.monotonic() + seconds
        buf = b""
        self.sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                break
            buf += chunk
        self._parse(buf)

    def _parse(self, raw: bytes) -> None:
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        found = re.search(rb"(?im)^x-shmcast-worker:\s*(\d+)", head)
        self.worker = int(found.group(1)) if found else None
        assert b"chunked" in head.lower(), head
        text = b""
        while body:  # de-chunk; a trailing partial chunk is cut off
            size_line, sep, rest = body.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line.split(b";")[0], 16)
            if size == 0 or len(rest) < size + 2:
                text += rest[:size] if size else b""
                break
            text += rest[:size]
            body = rest[size + 2 :]
        parser = SSEParser()
        complete, _, _ = text.decode("utf-8", "replace").rpartition("\n\n")
        for line in (complete + "\n\n").split("\n"):
            parser.feed(line, 0, self.events.append, self.comments.append)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --- scenarios, run for each example ------------------------------------------
def members_workers(event: SSEEvent) -> set[int]:
    return {w["pid"] for w in event.json()["workers"]}


def heartbeat_gaps(events: list[SSEEvent], start: float, end: float) -> tuple[float, float, int]:
    """(largest arrival gap, largest publish-time gap, count) of heartbeats in [start, end]."""
    beats = [e for e in events if e.type == "heartbeat" and start <= e.t <= end]
    assert len(beats) >= 2, f"only {len(beats)} heartbeats between {start} and {end}"
    arrival = max(b.t - a.t for a, b in itertools.pairwise(beats))
    ts = [e.json()["ts"] for e in beats]
    published = max(b - a for a, b in itertools.pairwise(ts))
    return arrival, published, len(beats)


def workers_health(server: Gunicorn, timeout: float = 10.0) -> dict[int, dict]:
    """/healthz of each worker (new connections until each answered, or *timeout*)."""
    import httpx

    out: dict[int, dict] = {}
    pids = server.worker_pids()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            health = httpx.get(server.url + "/healthz", timeout=2,
                               headers={"Connection": "close"}).json()
            out[health["pid"]] = health
        if set(out) >= pids:
            break
        # The kernel hands a new connection to whichever worker waits in accept
        # first, and a loaded machine can favour one of them for many in a row.
        time.sleep(POLL)
    return out


def scenario_fanout_and_stalled_client(example: str, bus: str, tmp_path: Path) -> None:
    """Four clients read every event in version order while a fifth stops
    reading: the others and the heartbeat are not slowed, and the stalled one,
    once it reads again, sees a hole healed by a snapshot."""
    stall = 2.5
    env = {"SHMCAST_HEARTBEAT": "0.02", "SHMCAST_CHURN": "0.25", "SHMCAST_PAD": "16000"}
    with Gunicorn(example, bus, tmp_path, env=env, sndbuf=16384) as server:
        clients = [SSEClient(server.url, reconnect=False) for _ in range(4)]
        stalled = None
        try:
            for client in clients:
                client.start()
            stalled = StalledClient(server.url)
            for client in clients:
                client.wait_events(10, timeout=10)
            t0 = time.monotonic()
            time.sleep(stall)
            t1 = time.monotonic()
            stalled.read_for(1.5)  # reads again: old bytes, then the healed stream
            hub_dropped = {pid: h["hub"]["dropped"] for pid, h in workers_health(server).items()}
        finally:
            for client in clients:
                client.stop()
            if stalled is not None:
                stalled.close()
        assert_quick_stop(server)
    assert bus_entries(bus) == [], "bus left in /dev/shm after SIGTERM"

    # Every reading client: one connection, a snapshot first, then every
    # event in version order. A client starved of CPU for longer than its ring
    # lasts (a loaded CI machine) may lose events, but then it is told so and
    # the hole is healed by a snapshot; on an idle machine there are none.
    for client in clients:
        assert client.conns == 1, client.ends
        holes = check_stream(client.events, allow_gaps=True)
        dropped = [c for _, c in client.comments if c.startswith("dropped")]
        assert holes <= len(dropped), (holes, dropped)
        assert holes <= 2, (holes, dropped)
    # ...the same events, byte for byte, over the range they all saw.
    lo = max(c.events[1].id for c in clients)
    hi = min(c.events[-1].id for c in clients)
    assert hi - lo > 50, (lo, hi)
    by_id: dict[int, tuple[str, str]] = {}
    for client in clients:
        for e in client.events:
            if lo <= e.id <= hi:
                assert by_id.setdefault(e.id, (e.type, e.data)) == (e.type, e.data)
    assert sorted(by_id) == list(range(lo, hi + 1))  # together they saw every version
    # The stalled client slowed neither the publisher nor the other clients: a
    # blocked publisher or a blocked fan-out would stop the heartbeat for the
    # whole stall; CPU contention alone stays far below that.
    for client in clients:
        arrival, published, count = heartbeat_gaps(client.events, t0, t1)
        assert count >= stall / 0.02 * 0.3, count
        assert published < stall * 0.6, f"publisher stalled {published:.2f}s"
        assert arrival < stall * 0.6, f"heartbeats reached a client {arrival:.2f}s apart"
    # The stalled client lost events, was told so, and got a snapshot after the hole.
    assert any(c.startswith("dropped") for c in stalled.comments), stalled.comments
    assert check_stream(stalled.events, allow_gaps=True) >= 1
    # Its losses were its own feed's, counted by its worker's hub (not by the bus:
    # the workers' hubs kept up, whatever the stalled client did).
    assert stalled.worker is not None
    assert hub_dropped.get(stalled.worker, 0) > 0, (stalled.worker, hub_dropped)


def _check_clients_across_restarts(clients: list[SSEClient], master: int) -> None:
    for client in clients:
        conns = client.by_conn()
        previous_last = 0
        for conn, events in sorted(conns.items()):
            # a resumed stream goes on exactly where the last one ended, or starts
            # again from a snapshot newer than that after a counted gap
            check_stream(events, allow_gaps=False, after=client.sent_ids.get(conn))
            # one bus all along: versions never start over
            assert events[0].id > previous_last, (conn, events[0].id, previous_last)
            previous_last = events[-1].id
        for e in client.events:
            if e.type in ("members", "heartbeat"):
                assert e.json()["master"] == master


def _wait_snapshot_with(client: SSEClient, pids: set[int], timeout: float) -> None:
    wait_until(
        lambda: any(
            e.type == "members" and members_workers(e) == pids for e in list(client.events)
        ),
        timeout,
        f"a snapshot listing workers {sorted(pids)}",
        POLL,
    )


def scenario_worker_killed_and_reload(example: str, bus: str, tmp_path: Path) -> None:
    """The bus survives a worker SIGKILLed (gunicorn respawns it) and a SIGHUP
    reload; clients reconnect and see the new workers in the snapshot."""
    with Gunicorn(example, bus, tmp_path) as server:
        clients = [SSEClient(server.url) for _ in range(3)]
        try:
            for client in clients:
                client.start()
            for client in clients:
                client.wait_events(5, timeout=10)
            first = server.worker_pids()
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            respawned = server.wait_workers(2, timeout=10, exclude={victim})
            for client in clients:
                _wait_snapshot_with(client, respawned, timeout=10)
            # the dead worker's hub is gone from the bus (one hub per live worker), and
            # the live workers' hubs serve the 3 streams
            wait_until(
                lambda: any(
                    e.type == "heartbeat"
                    and e.json()["subscribers"] == 2
                    and e.id > max(c.events[-1].id for c in clients) - 5
                    for e in list(clients[0].events)[-5:]
                ),
                10,
                "subscriber_count back to 2",
                POLL,
            )
            wait_until(
                lambda: sum(h["streams"] for h in workers_health(server).values()) == 3,
                10, "3 streams on the live workers' hubs", POLL,
            )
            mark = max(c.events[-1].id for c in clients)

            server.send_signal(signal.SIGHUP)
            # new workers up and the old ones gone well within graceful_timeout
            # (5 s): their streams ended at once, they did not wait to be killed
            reloaded = server.wait_workers(2, timeout=4.5, exclude=respawned)
            for client in clients:
                _wait_snapshot_with(client, reloaded, timeout=10)
                client.wait_events(5, timeout=10, where=lambda e, m=mark: e.id > m + 20)
        finally:
            for client in clients:
                client.stop()
        assert_quick_stop(server)
    assert bus_entries(bus) == [], "bus left in /dev/shm after SIGTERM"
    _check_clients_across_restarts(clients, server.pid)
    for client in clients:
        assert client.conns >= 2  # the reload ended every stream; each client came back
        assert any(how == "closed" for _, how in client.ends), client.ends  # a clean end


def check_endpoints(server: Gunicorn) -> None:
    """/ serves the page, /healthz names the worker, /events is an event stream."""
    import httpx

    page = httpx.get(server.url + "/", timeout=5)
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert 'new EventSource("/events")' in page.text
    health = httpx.get(server.url + "/healthz", timeout=5).json()
    assert health["bus"] == server.bus
    assert health["pid"] in server.worker_pids()
    with httpx.stream("GET", server.url + "/events", timeout=5) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        lines = response.iter_lines()
        assert next(lines) == "retry: 1000"


# Workers that drain their streams stop in well under a second; a worker that
# waits out --graceful-timeout (5 s) is SIGKILLed by the master, which logs it.
# The time bound leaves room for a loaded CI machine; the log catches the hang.
STOP_BOUND = 8.0


def assert_quick_stop(server: Gunicorn, sig: int = signal.SIGTERM) -> None:
    """Stop gunicorn with *sig* and check that no worker had to be SIGKILLed."""
    name = signal.Signals(sig).name
    before = len(server.log())
    took = server.stop(sig=sig)
    assert took < STOP_BOUND, f"{name} took {took:.1f} s"
    assert "was sent SIGKILL" not in server.log()[before:], (
        f"a worker had to be SIGKILLed after {name}")


def scenario_max_requests(
    example: str, bus: str, tmp_path: Path, stop_signal: int = signal.SIGTERM
) -> None:
    """Workers recycled by max_requests: the bus and the clients carry on.
    Then `stop_signal` (SIGINT: Ctrl-C) stops gunicorn quickly and cleanly."""
    import httpx

    args = ["--max-requests", "6", "--max-requests-jitter", "0"]
    with Gunicorn(example, bus, tmp_path, args=args) as server:
        clients = [SSEClient(server.url) for _ in range(2)]
        try:
            for client in clients:
                client.start()
            for client in clients:
                client.wait_events(5, timeout=10)
            first = server.worker_pids()
            deadline = time.monotonic() + 15
            while server.worker_pids() & first:  # until both first workers retired
                assert time.monotonic() < deadline, "workers were not recycled"
                with contextlib.suppress(httpx.HTTPError):
                    httpx.get(server.url + "/healthz", timeout=2, headers={"Connection": "close"})
                time.sleep(0.05)
            now = server.wait_workers(2, timeout=10, exclude=first)
            mark = max(c.events[-1].id for c in clients)
            for client in clients:
                client.wait_events(5, timeout=10, where=lambda e, m=mark: e.id > m)
            for client in clients:
                assert any(e.type == "members" and members_workers(e) & now for e in client.events)
        finally:
            for client in clients:
                client.stop()
        # On Ctrl-C the master asks its workers for a quick exit (SIGQUIT);
        # either way they must not wait for graceful_timeout (5 s) and a SIGKILL
        name = signal.Signals(stop_signal).name
        assert_quick_stop(server, stop_signal)
    assert bus_entries(bus) == [], f"bus left in /dev/shm after {name}"
    _check_clients_across_restarts(clients, server.pid)


def scenario_quiet_bus(example: str, bus: str, tmp_path: Path) -> None:
    """The endpoints answer; a new stream gets a snapshot at once, without waiting
    for a change or a keyframe (the last one its worker's hub received: the master
    republishes it when a worker's hub joins the bus); an idle stream gets
    keepalive comments."""
    env = {
        "SHMCAST_HEARTBEAT": "100",
        "SHMCAST_CHURN": "0",
        "SHMCAST_KEYFRAME": "100",
        "SHMCAST_KEEPALIVE": "0.3",
    }
    with Gunicorn(example, bus, tmp_path, env=env) as server:
        check_endpoints(server)
        time.sleep(0.5)  # the repairs for the workers' hubs are out
        client = SSEClient(server.url, reconnect=False)
        t0 = time.monotonic()
        client.start()
        try:
            client.wait_events(1, timeout=5)
            wait_until(
                lambda: sum(c == "keepalive" for _, c in list(client.comments)) >= 3,
                5,
                "keepalive comments",
                POLL,
            )
        finally:
            client.stop()
        assert client.events[0].type == "members"
        assert client.events[0].json()["reason"] in ("repair", "change")  # not a keyframe
        assert client.events[0].t - t0 < 2.0
        assert (0, "waiting for a snapshot") not in client.comments  # the hub had it
        assert_quick_stop(server)
    assert bus_entries(bus) == [], "bus left in /dev/shm after SIGTERM"


def read_stream(url: str, *, last_event_id: int | str | None = None,
                until=lambda events: True, timeout: float = 10.0, not_from: int | None = None,
                id_type=int) -> tuple[int, list[SSEEvent], list[str]]:
    """One /events connection, read until ``until(events)`` holds: (worker pid, events,
    comments). *last_event_id* is sent as ``Last-Event-ID``. If worker *not_from*
    answers, nothing is read."""
    import httpx

    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    events: list[SSEEvent] = []
    comments: list[str] = []
    parser = SSEParser(id_type)
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", url + "/events", headers=headers,
                      timeout=httpx.Timeout(5.0, read=3.0)) as response:
        assert response.status_code == 200, response.status_code
        pid = int(response.headers["x-shmcast-worker"])
        if pid == not_from:
            return pid, events, comments
        for line in response.iter_lines():
            parser.feed(line, 0, events.append, comments.append)
            if line == "" and until(events):
                break
            assert time.monotonic() < deadline, f"stream did not get there: {events[-3:]}"
    return pid, events, comments


def scenario_resume_on_another_worker(example: str, bus: str, tmp_path: Path) -> None:
    """A client that reconnects with Last-Event-ID to another worker gets exactly the
    events it missed, then the live ones; one that missed more than the workers keep
    gets a counted gap, then a fresh snapshot; an id this bus never gave waits for
    the next snapshot."""
    history = 200  # 4 s of events at 50 per second
    env = {"SHMCAST_HEARTBEAT": "0.02", "SHMCAST_HISTORY": str(history),
           "SHMCAST_KEYFRAME": "1.0"}
    with Gunicorn(example, bus, tmp_path, env=env) as server:
        witness = SSEClient(server.url, reconnect=False)
        witness.start()
        try:
            # Every worker's hub keeps history from its own subscribe on: a worker that
            # boots late cannot give back what was published before it.
            witness.wait_events(1, timeout=20, where=lambda e: e.type == "heartbeat" and
                                json.loads(e.data)["subscribers"] >= server.workers)
            # 1. A first stream, then a pause in which it misses 20 events.
            pid, first, _ = read_stream(server.url, until=lambda ev: len(ev) >= 10)
            check_stream(first, allow_gaps=False)
            last = first[-1].id
            witness.wait_events(1, timeout=10, where=lambda e, m=last: e.id >= m + 20)
            # 2. Back, to another worker: exactly what it missed, then live events.
            for _ in range(100):
                other, resumed, comments = read_stream(
                    server.url, last_event_id=last, until=lambda ev: len(ev) >= 30,
                    not_from=pid)
                if other != pid:
                    break
            else:
                raise AssertionError(f"every reconnection went to worker {pid}")
            assert resumed[0].id == last + 1, (last, resumed[:2])
            assert [e.id for e in resumed] == list(range(last + 1, last + 31))
            assert not any(c.startswith("dropped") for c in comments), comments
            # 3. Back after missing more than the events each worker keeps.
            witness.wait_events(1, timeout=20,
                                where=lambda e, m=resumed[-1].id: e.id >= m + history + 50)
            old = resumed[-1].id
            _, healed, comments = read_stream(
                server.url, last_event_id=old, until=lambda ev: len(ev) >= 5)
            assert any(c.startswith("dropped") for c in comments), comments
            assert healed[0].type == "members", healed[0]
            assert healed[0].id > old
            check_stream(healed, allow_gaps=False)
            # 4. An id from another bus (this one never gave it): the next snapshot.
            _, fresh, _ = read_stream(server.url, last_event_id=10**12,
                                      until=lambda ev: len(ev) >= 2)
            assert fresh[0].type == "members"
            check_stream(fresh, allow_gaps=False)
        finally:
            witness.stop()
        assert_quick_stop(server)
    assert bus_entries(bus) == [], "bus left in /dev/shm after SIGTERM"
    # What the streams said is what the witness saw, byte for byte.
    seen = {e.id: (e.type, e.data) for e in witness.events}
    for e in [*first, *resumed, *healed, *fresh[1:]]:
        if e.id in seen:
            assert seen[e.id] == (e.type, e.data), e.id


def post_publish(client, url: str, body: bytes | str, method: str = "POST"):
    """One request to /publish on a new connection (so any worker may take it)."""
    return client.request(method, url + "/publish", content=body, timeout=5,
                          headers={"Content-Type": "application/json", "Connection": "close"})


def stop_clients(clients: list[SSEClient]) -> None:
    for client in clients:
        client.halt()  # all at once: each ends at its next line
    for client in clients:
        client.stop()


def streams_on_every_worker(server: Gunicorn, per_worker: int = 2,
                            tries: int = 100) -> list[SSEClient]:
    """SSE clients, *per_worker* streams held by each worker.

    A new connection goes to whichever worker accepts it first, often the same
    one: the streams one worker has too many of are closed at once (a gthread
    worker has a thread for each)."""
    kept: list[SSEClient] = []
    extra: list[SSEClient] = []
    pids = server.worker_pids()
    try:
        for _ in range(tries):
            held = [c.workers[0] for c in kept]
            if all(held.count(pid) >= per_worker for pid in pids):
                return kept
            client = SSEClient(server.url, reconnect=False)
            client.start()
            client.wait_events(1, timeout=10)  # the header came before the first event
            if held.count(client.workers[0]) < per_worker:
                kept.append(client)
            else:
                client.halt()
                extra.append(client)
        raise AssertionError(f"{tries} streams, and not {per_worker} on each of workers {pids}")
    except BaseException:
        stop_clients(kept)
        raise
    finally:
        stop_clients(extra)


def scenario_publish_from_workers(example: str, bus: str, tmp_path: Path) -> None:
    """POST /publish to any worker: the event reaches the streams of every worker,
    the one that took the request and the others, exactly once, the body intact,
    with one version for all and each worker's events in the order it took them.
    A body that is not a JSON object (or does not fit the bus) publishes nothing
    and is told so; other methods are refused."""
    bodies = [
        {"text": f"hello {i}\nsecond line, «ünïcode» ✓", "i": i,
         "nested": {"list": [1, 2.5, None, True, "x" * 37 * i]}}
        for i in range(8)
    ]
    # not an object, not JSON, NaN (a page's JSON.parse refuses it), a lone
    # surrogate (JSON, but no UTF-8), not UTF-8
    bad = [b"[1, 2]", b'"text"', b"not json", b"", b'{"a": NaN}', rb'{"a": "\ud800"}',
           b'{"a": "\xff"}']
    import httpx

    with Gunicorn(example, bus, tmp_path, workers=3) as server, httpx.Client() as http:
        workers = server.worker_pids()
        clients = streams_on_every_worker(server)
        try:
            answers = []
            for body in bodies:
                r = post_publish(http, server.url, json.dumps(body, ensure_ascii=False).encode())
                assert r.status_code == 202, (r.status_code, r.text)
                answers.append(r.json())
            refused = [post_publish(http, server.url, body) for body in bad]
            too_large = post_publish(http, server.url, json.dumps({"pad": "x" * 20_000}))
            wrong_method = post_publish(http, server.url, b"", method="GET")
            t_bad = time.time()
            # Anything published by now has been drained: a heartbeat the master
            # publishes later comes after it in every stream.
            for client in clients:
                client.wait_events(1, timeout=10, where=lambda e: e.type == "heartbeat"
                                   and e.json()["ts"] > t_bad + 0.3)
        finally:
            stop_clients(clients)
        assert_quick_stop(server)
    assert bus_entries(bus) == [], "bus left in /dev/shm after SIGTERM"

    assert [r.status_code for r in refused] == [400] * len(bad), [r.text for r in refused]
    assert too_large.status_code == 413, too_large.text
    assert wrong_method.status_code == 405
    assert all(a["type"] == "message" and a["dropped"] == 0 for a in answers), answers
    posters = [a["worker"] for a in answers]
    holders = {c.workers[0] for c in clients}
    assert holders == workers, (holders, workers)
    versions: dict[int, int] = {}  # body index: its version, the same at every stream
    for client in clients:
        check_stream(client.events, allow_gaps=False)
        messages = [e for e in client.events if e.type == "message"]
        got = [e.json() for e in messages]
        assert sorted(got, key=lambda b: b["i"]) == bodies, (  # each once, intact
            client.workers[0], [b.get("i") for b in got])
        for e in messages:
            assert versions.setdefault(e.json()["i"], e.id) == e.id, (e.json()["i"], e.id)
        for worker in set(posters):  # each worker's events in the order it took them
            mine = [b["i"] for b in got if posters[b["i"]] == worker]
            assert mine == sorted(mine), (worker, mine)
    # So each event reached the streams of the worker that published it and those
    # of the two others.
    assert set(posters) <= workers, (posters, workers)


def scenario_publish_while_the_master_is_stopped(example: str, bus: str, tmp_path: Path) -> None:
    """With the master (the bus owner) SIGSTOPped, POST /publish still answers at once:
    202 while the worker's inbox has room, then 503 (dropped, counted); after SIGCONT
    every stream gets exactly the accepted events, in order, and posts succeed again."""
    import httpx

    env = {"SHMCAST_BUFFER": "512"}  # room for the accepted events, delivered in one burst
    with Gunicorn(example, bus, tmp_path, env=env) as server, httpx.Client() as http:
        clients = streams_on_every_worker(server, per_worker=1)
        stopped = False
        try:
            server.send_signal(signal.SIGSTOP)
            stopped = True
            answers = []
            slowest = 0.0
            # One kept-alive connection: one worker's publisher, one inbox to fill.
            for i in range(200):
                t = time.monotonic()
                r = http.post(server.url + "/publish", json={"i": i}, timeout=5)
                slowest = max(slowest, time.monotonic() - t)
                answers.append(r)
                if r.status_code == 503:
                    break
            server.send_signal(signal.SIGCONT)
            stopped = False
            accepted = sum(r.status_code == 202 for r in answers)
            for client in clients:  # the bus takes what the inbox holds
                client.wait_events(accepted, timeout=10, where=lambda e: e.type == "message")

            def taken():
                # The inbox has room again once the master's drain thread marked those
                # events read, which may come just after they reached the streams.
                r = post_publish(http, server.url, b'{"i": "after"}')
                return r if r.status_code != 503 else None

            after = wait_until(taken, 5, "POST /publish to be taken again", POLL)
            for client in clients:
                client.wait_events(1, timeout=10, where=lambda e: e.type == "message"
                                   and e.json()["i"] == "after")
        finally:
            if stopped:
                server.send_signal(signal.SIGCONT)
            stop_clients(clients)
        assert_quick_stop(server)
    assert bus_entries(bus) == [], "bus left in /dev/shm after SIGTERM"

    codes = [r.status_code for r in answers]
    assert 503 in codes, f"{len(codes)} events accepted with the master stopped"
    assert codes == [202] * accepted + [503], codes  # then the inbox was full: 64 slots
    assert accepted >= 32, codes
    assert "dropped" in answers[-1].text, answers[-1].text
    assert len({r.json()["worker"] for r in answers[:accepted]}) == 1
    assert slowest < 2.0, f"a POST took {slowest:.2f} s with the master stopped"
    assert after.status_code == 202, (after.status_code, after.text)
    for client in clients:
        check_stream(client.events, allow_gaps=False)
        got = [e.json()["i"] for e in client.events if e.type == "message"]
        assert got == [*range(accepted), "after"], (client.workers[0], got)
