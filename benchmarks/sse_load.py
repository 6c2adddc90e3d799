"""The load side of ``python -m benchmarks sse``: C raw-socket SSE clients in one asyncio process.

Usage (the harness starts it; by hand for a server already running)::

    python -m benchmarks.sse_load --port 8000 --clients 1000 --settle 5 --duration 20

Every client opens a TCP connection to ``127.0.0.1:PORT`` with asyncio streams, sends
``GET /events`` (``Accept: text/event-stream``, optionally ``Last-Event-ID``) and reads
the stream until the end of the run. The first ``--sample`` clients that get a 200 are
parsed in full (chunked transfer decoding, every SSE field, the JSON of each
``heartbeat`` event for its publish timestamp ``ts``: latency is the receive time minus
``ts``, same host clock); the others only pull the ids out of what they read with one
regular expression per read (``\\nid: N``), so that this process is not the bottleneck.

Timeline, printed as one JSON object per line on stdout for the harness:

1. ``{"phase": "connected", ...}`` once every client got its response head (or was
   refused: HTTP status other than 200, a connection error or no head in time);
2. ``--settle`` seconds later ``{"phase": "start", "t": time.time()}``: the measuring
   window opens (the harness reads CPU counters of the servers now);
3. ``--duration`` seconds later ``{"phase": "end", "t": ...}``: it closes;
4. once every connected client got the last event published in the window (or
   ``--drain`` seconds passed), ``{"phase": "result", ...}`` with the counts below, and
   the process closes its connections and exits.

Counting: the events *published in the window* are the ids from the first heartbeat
whose ``ts`` falls in the window to the last one (any non-heartbeat event between them,
the examples' ``members`` snapshots, counts too: ids are consecutive at the source). A
client expects all of them, or those published before it was disconnected; it
delivered those of them it received. A gap is a run of missing ids followed by a received
one (or by the end of a stream the server closed); the missing ids after the last one an
open stream received by the drain deadline are counted apart, as late.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import re
import sys
import time
from array import array
from typing import Any

ID_RE = re.compile(rb"\nid: ?(\d+)")
HEAD_END = b"\r\n\r\n"


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def pct(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, round(q / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


class Client:
    """One SSE connection's counters. ``feed`` is the bulk path; ``FullClient`` parses."""

    __slots__ = ("bytes", "carry", "closed_at", "error", "ids", "last", "reads", "status", "writer")

    def __init__(self) -> None:
        self.ids = array("q")
        self.last = 0  # the highest id seen: the drain check reads it
        self.carry = b"\n"  # the body's first line has no newline before it
        self.status = 0
        self.error = ""
        self.closed_at = 0.0  # when the server ended the stream (0: still open)
        self.bytes = 0
        self.reads = 0
        self.writer: asyncio.StreamWriter | None = None

    def feed(self, data: bytes, now: float) -> None:
        # Only complete lines are searched; the rest (from the last newline on, so that
        # the regex still sees the "\n" before a split "id:" line) waits for the next read.
        # Chunked transfer framing sits between events (one write per event on every
        # server here) and ends in "\r\n", so "\nid:" still matches after it.
        self.bytes += len(data)
        buf = self.carry + data
        cut = buf.rfind(b"\n")
        if cut <= 0:
            self.carry = buf[-4096:]
            return
        found = ID_RE.findall(buf, 0, cut)
        if found:
            ids = [int(x) for x in found]
            self.ids.extend(ids)
            last = max(ids)
            self.last = max(self.last, last)
        self.carry = buf[cut:]


class FullClient(Client):
    """A sampled client: de-chunks, parses every SSE field, timestamps heartbeats."""

    __slots__ = (
        "cbuf",
        "chunked",
        "clen",
        "ctrail",
        "disorder",
        "ev_data",
        "ev_id",
        "ev_type",
        "hb",
        "lbuf",
    )

    def __init__(self) -> None:
        super().__init__()
        self.chunked = False
        self.cbuf = bytearray()
        self.clen = 0  # data bytes left in the current chunk
        self.ctrail = 0  # CRLF bytes left after it
        self.lbuf = b""
        self.ev_id: int | None = None
        self.ev_type = b"message"
        self.ev_data: list[bytes] = []
        self.hb: list[tuple[int, float, float]] = []  # (id, ts at publish, receive time)
        self.disorder = 0  # ids not greater than the previous one

    def _dechunk(self, data: bytes) -> bytes:
        cbuf = self.cbuf
        cbuf += data
        out = []
        while cbuf:
            if self.clen:
                take = min(self.clen, len(cbuf))
                out.append(bytes(cbuf[:take]))
                del cbuf[:take]
                self.clen -= take
                if not self.clen:
                    self.ctrail = 2
            elif self.ctrail:
                take = min(self.ctrail, len(cbuf))
                del cbuf[:take]
                self.ctrail -= take
            else:
                i = cbuf.find(b"\r\n")
                if i < 0:
                    break
                size = int(bytes(cbuf[:i]).split(b";")[0].strip() or b"0", 16)
                del cbuf[: i + 2]
                if size == 0:  # last chunk: the server ended the response
                    cbuf.clear()
                    break
                self.clen = size
        return b"".join(out)

    def feed(self, data: bytes, now: float) -> None:
        self.bytes += len(data)
        if self.chunked:
            data = self._dechunk(data)
        lines = (self.lbuf + data).split(b"\n")
        self.lbuf = lines.pop()
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                self._dispatch(now)
                continue
            if line[0] == 0x3A:  # ":" a comment (keepalive, "dropped N", "waiting ...")
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self.ev_data.append(value)
            elif name == b"id":
                with contextlib.suppress(ValueError):
                    self.ev_id = int(value)
            elif name == b"event":
                self.ev_type = value

    def _dispatch(self, now: float) -> None:
        vid, etype, data = self.ev_id, self.ev_type, self.ev_data
        self.ev_id, self.ev_type, self.ev_data = None, b"message", []
        if vid is None:
            return  # a retry: line or an event without id: not counted
        if vid <= self.last:
            self.disorder += 1
        else:
            self.last = vid
        self.ids.append(vid)
        if etype == b"heartbeat" and data:
            try:
                ts = float(json.loads(b"\n".join(data))["ts"])
            except (ValueError, KeyError, TypeError):
                return
            self.hb.append((vid, ts, now))


class Load:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.clients: list[Client] = []
        self.done_heads = 0
        self.headed: list[bool] = []
        self.heads_done = asyncio.Event()
        self.samples = 0
        self.lags: list[float] = []
        self.window = (0.0, 0.0)
        headers = [
            f"GET {opts.path} HTTP/1.1",
            f"Host: {opts.host}:{opts.port}",
            "Accept: text/event-stream",
            "Cache-Control: no-cache",
            "User-Agent: shmcast-bench-sse",
        ]
        if opts.last_event_id is not None:
            headers.append(f"Last-Event-ID: {opts.last_event_id}")
        self.request = ("\r\n".join(headers) + "\r\n\r\n").encode()

    def _head_done(self, index: int) -> None:
        self.headed[index] = True
        self.done_heads += 1
        if self.done_heads >= self.opts.clients:
            self.heads_done.set()

    async def client(self, index: int, gate: asyncio.Semaphore) -> None:
        o = self.opts
        c: Client = Client()
        self.clients[index] = c
        async with gate:  # bounded handshakes in flight: no SYN storm past the backlog
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(o.host, o.port), o.head_timeout
                )
            except (OSError, asyncio.TimeoutError) as exc:
                c.error = type(exc).__name__
                self._head_done(index)
                return
            c.writer = writer
            try:
                writer.write(self.request)
                head = await asyncio.wait_for(reader.readuntil(HEAD_END), o.head_timeout)
                c.status = int(head.split(b" ", 2)[1])
            except (
                OSError,
                asyncio.TimeoutError,
                asyncio.IncompleteReadError,
                ValueError,
                IndexError,
                asyncio.LimitOverrunError,
            ) as exc:
                c.error = type(exc).__name__
        if c.status != 200:
            writer.close()
            self._head_done(index)
            return
        if self.samples < o.sample:
            # The first connected clients are the sample (not the first by index: when the
            # server refuses most of them, the sample still measures the ones it serves).
            self.samples += 1
            full = FullClient()
            full.status, full.writer = c.status, c.writer
            full.chunked = b"transfer-encoding: chunked" in head.lower()
            self.clients[index] = c = full
        self._head_done(index)
        read = reader.read
        feed = c.feed
        clock = time.time
        try:
            while True:
                data = await read(262144)
                if not data:
                    break
                c.reads += 1
                feed(data, clock())
        except OSError as exc:
            c.error = type(exc).__name__
        c.closed_at = time.time()

    async def lag_probe(self) -> None:
        """How late the event loop runs a 20 ms timer: shows whether this process kept up."""
        step = 0.02
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(step)
            t0, t1 = self.window
            now = time.time()
            if t0 and (not t1 or now <= t1):
                self.lags.append(loop.time() - t - step)

    async def run(self) -> None:
        o = self.opts
        self.clients = [Client() for _ in range(o.clients)]
        self.headed = [False] * o.clients
        gate = asyncio.Semaphore(o.concurrency)
        probe = asyncio.ensure_future(self.lag_probe())
        t_connect = time.monotonic()
        tasks = [asyncio.ensure_future(self.client(i, gate)) for i in range(o.clients)]
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.heads_done.wait(), o.connect_deadline)
            connect_s = time.monotonic() - t_connect
            for i, task in enumerate(tasks):
                if not self.headed[i]:  # still waiting past the deadline: refused
                    task.cancel()
                    self.clients[i].error = "connect deadline"
            connected = [c for c in self.clients if c.status == 200]
            _emit({"phase": "connected", "connected": len(connected), "connect_s": connect_s})
            await asyncio.sleep(o.settle)
            cpu0 = time.process_time()
            t0 = time.time()
            self.window = (t0, 0.0)
            _emit({"phase": "start", "t": t0})
            await asyncio.sleep(o.duration)
            t1 = time.time()
            self.window = (t0, t1)
            cpu = (time.process_time() - cpu0) / (t1 - t0)
            _emit({"phase": "end", "t": t1})
            drain_s = await self.drain(t1)
            result = self.result(t0, t1, connect_s, drain_s, cpu)
            _emit({"phase": "result", **result})
        finally:
            probe.cancel()
            for t in tasks:
                t.cancel()
            for c in self.clients:
                if c.writer is not None:
                    with contextlib.suppress(Exception):
                        c.writer.transport.abort()  # RST: no FIN_WAIT/TIME_WAIT pile-up
            await asyncio.gather(probe, *tasks, return_exceptions=True)

    def _heartbeats(self) -> list[tuple[float, int]]:
        """(ts, id) of every heartbeat any sampled client received, by publish time."""
        seen: dict[int, float] = {}
        for c in self.clients:
            if isinstance(c, FullClient):
                for vid, ts, _ in c.hb:
                    seen.setdefault(vid, ts)
        return sorted((ts, vid) for vid, ts in seen.items())

    async def drain(self, t1: float) -> float:
        """Wait until every open client has the last id published in the window."""
        start = time.monotonic()
        deadline = start + self.opts.drain
        while time.monotonic() < deadline:
            hb = self._heartbeats()
            if hb and hb[-1][0] > t1:  # some heartbeat after the window arrived: v1 is known
                i = bisect.bisect_right(hb, (t1, float("inf")))
                v1 = hb[i - 1][1] if i else 0
                if all(c.last >= v1 or c.closed_at for c in self.clients if c.status == 200):
                    break
            await asyncio.sleep(0.1)
        return time.monotonic() - start

    def result(
        self, t0: float, t1: float, connect_s: float, drain_s: float, cpu: float
    ) -> dict[str, Any]:
        o = self.opts
        statuses: dict[str, int] = {}
        errors: dict[str, int] = {}
        for c in self.clients:
            if c.status != 200:
                if c.status:
                    statuses[str(c.status)] = statuses.get(str(c.status), 0) + 1
                else:
                    errors[c.error or "no head"] = errors.get(c.error or "no head", 0) + 1
        connected = [c for c in self.clients if c.status == 200]
        out: dict[str, Any] = {
            "clients": o.clients,
            "connected": len(connected),
            "refused": o.clients - len(connected),
            "refused_status": statuses,
            "refused_errors": errors,
            "connect_s": connect_s,
            "drain_s": drain_s,
            "window_s": t1 - t0,
            "sampled": sum(isinstance(c, FullClient) for c in connected),
            "load_cpu": cpu,
            "loop_lag_p99_ms": None,
            "loop_lag_max_ms": None,
            "bytes": sum(c.bytes for c in self.clients),
            "reads": sum(c.reads for c in self.clients),  # one wakeup of this process each
            "events_total": sum(len(c.ids) for c in self.clients),
        }
        if self.lags:
            lags = sorted(self.lags)
            out["loop_lag_p99_ms"] = (pct(lags, 99) or 0) * 1e3
            out["loop_lag_max_ms"] = lags[-1] * 1e3
        hb = self._heartbeats()
        in_window = [(ts, vid) for ts, vid in hb if t0 <= ts <= t1]
        # How far behind the sampled streams were when the run ended: the age of the newest
        # heartbeat each had (about 1/R on a server that keeps up), median over the sample.
        now = time.time()
        ages = sorted(
            now - max(ts for _, ts, _ in c.hb)
            for c in connected
            if isinstance(c, FullClient) and c.hb
        )
        out["behind_at_end_s"] = pct(ages, 50)
        if not in_window and connected:
            # Nothing published in the window reached the sample before the drain deadline:
            # the server was that far behind. Every window event's latency exceeds the time
            # from the window's start to now, and none of them was delivered in time.
            out.update(
                published=None,
                expected=None,
                received=0,
                delivered=0.0 if ages else None,
                latency_floor_ms=(now - t0) * 1e3,
                gaps=None,
                missing=None,
                clients_with_gaps=None,
                disconnected=sum(bool(c.closed_at) for c in connected),
                p50_ms=None,
                p99_ms=None,
                max_ms=None,
                latency_samples=0,
                disorder=0,
            )
            return out
        if not in_window:
            out.update(
                published=0,
                expected=0,
                received=0,
                delivered=None,
                gaps=0,
                missing=0,
                clients_with_gaps=0,
                disconnected=sum(bool(c.closed_at) for c in connected),
                p50_ms=None,
                p99_ms=None,
                max_ms=None,
                latency_samples=0,
                disorder=0,
            )
            return out
        v0 = min(vid for _, vid in in_window)
        v1 = max(vid for _, vid in in_window)
        hb_ts = [ts for ts, _ in hb]
        expected = received = gaps = with_gaps = disconnected = late = late_clients = 0
        for c in connected:
            end = v1
            if c.closed_at and c.closed_at < t1:
                disconnected += 1
                i = bisect.bisect_right(hb_ts, c.closed_at)
                end = min(v1, hb[i - 1][1]) if i else v0 - 1
            want = max(0, end - v0 + 1)
            got = sorted({v for v in c.ids if v0 <= v <= end})
            expected += want
            received += len(got)
            holes = 0
            prev = v0 - 1
            for v in got:
                if v > prev + 1:
                    holes += 1
                prev = v
            if want and prev < end:
                if c.closed_at:
                    holes += 1  # the stream ended without them
                else:  # still open: they had not arrived by the drain deadline (late, maybe lost)
                    late += end - prev
                    late_clients += 1
            gaps += holes
            with_gaps += holes > 0
        lat = sorted(
            (recv - ts) * 1e3
            for c in connected
            if isinstance(c, FullClient)
            for _, ts, recv in c.hb
            if t0 <= ts <= t1
        )
        out.update(
            published=v1 - v0 + 1,
            expected=expected,
            received=received,
            delivered=(received / expected) if expected else None,
            missing=expected - received,
            gaps=gaps,
            clients_with_gaps=with_gaps,
            late=late,
            late_clients=late_clients,
            disconnected=disconnected,
            disorder=sum(c.disorder for c in connected if isinstance(c, FullClient)),
            p50_ms=pct(lat, 50),
            p99_ms=pct(lat, 99),
            max_ms=lat[-1] if lat else None,
            latency_samples=len(lat),
        )
        return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sse_load", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/events")
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--sample", type=int, default=50, help="clients parsed in full")
    ap.add_argument("--concurrency", type=int, default=256, help="handshakes in flight")
    ap.add_argument("--head-timeout", type=float, default=30.0, help="per connect and per head")
    ap.add_argument("--connect-deadline", type=float, default=120.0)
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--drain", type=float, default=10.0, help="at most this long after the window")
    ap.add_argument("--last-event-id", default=None, help="send this Last-Event-ID header")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    with contextlib.suppress(ImportError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # one socket per client
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Load(opts).run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
