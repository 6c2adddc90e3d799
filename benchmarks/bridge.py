"""Cross-host fan-out: shmcast's bridge against every worker subscribing to Redis pub/sub itself.

``python -m benchmarks.bridge`` (``--quick`` for a short run; ``--json FILE`` to keep
the numbers). Both sides simulate the same deployment on this machine: 2 hosts x
2 workers x 100 SSE clients, one ``redis-server`` started by the benchmark on
127.0.0.1 (a free port), each host publishing its own events:

* **bridge**: per host, a publisher process owning a ``Bus`` (``max_publishers=1``),
  one ``shmcast bridge`` process (one Redis connection), and 2 worker processes,
  each with a ``Hub`` and 100 async feeds (the SSE clients);
* **bridge-q**: the same, but each worker reads one ``Subscription`` and fans out to
  100 asyncio queues exactly as the pubsub worker does (the transport alone);
* **pubsub**: per host, a publisher process that ``PUBLISH``es to one channel, and
  2 worker processes that each ``SUBSCRIBE`` to it (one connection each, the
  broadcaster/Flask-SSE way, redis.asyncio) and fan out to 100 asyncio queues.

Every client task records, for each event from the *other* host, the time from
publish (``time.time()`` in the payload) to its ``await`` returning. Two phases per
side: **latency** at a steady rate (default 200 events/s per host), and **load**
at a higher one (default 2,000 events/s per host) for delivered/s and loss.
Redis connections are read from ``INFO clients`` while the phase runs (minus the
benchmark's own). Loss for the bridge is split into events counted by
``shmcast.gap`` events and events missing with no count (the target is 0).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

HOSTS = 2
WORKERS = 2
CLIENTS = 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- processes


def _pace(rate: float, duration: float, publish: Any) -> int:
    """Call publish(i) *rate* times a second for *duration* seconds; returns the count."""
    start = time.monotonic()
    i = 0
    while True:
        t = time.monotonic() - start
        if t >= duration:
            return i
        due = int(t * rate)
        while i < due:
            publish(i)
            i += 1
        time.sleep(max(0.0, min(0.002, (i + 1) / rate - t)))


def _bus_owner(name: str, host: str, rate: float, duration: float, go: Any, ready: Any,
               done: Any, out: Any) -> None:
    import shmcast

    with shmcast.Bus(name, max_publishers=1, slots=4096) as bus:
        ready.set()
        go.wait(60)
        n = _pace(rate, duration, lambda i: bus.publish("tick", {"h": host, "i": i,
                                                                 "t": time.time()}))
        out.put(("published", host, n))
        done.wait(120)  # the bus lives until every worker is done


def _bridge_worker(name: str, host: str, end: float, out: Any, ready: Any) -> None:
    import shmcast
    from shmcast.bridge import GAP_TYPE, remote

    lat = array.array("d")
    counts = {"got": 0, "gap": 0, "seen": set()}

    async def client(feed: Any, first: bool) -> None:
        async for e in feed:
            r = remote(e)
            if r is not None:
                lat.append(time.time() - e.payload["t"])
                counts["got"] += 1
                if first:
                    counts["seen"].add(e.payload["i"])  # type: ignore[union-attr]
            elif e.type == GAP_TYPE and first:
                counts["gap"] += int(e.payload["count"])

    async def main() -> None:
        hub = shmcast.Hub(name, slots=4096, buffer=4096)
        feeds = [hub.subscribe() for _ in range(CLIENTS)]
        tasks = [asyncio.create_task(client(f, i == 0)) for i, f in enumerate(feeds)]
        ready.set()
        await asyncio.sleep(max(0.0, end - time.time()))
        hub.close()
        await asyncio.gather(*tasks)
        out.put(("worker", host, lat.tobytes(), counts["got"], counts["gap"],
                 len(counts["seen"]), feeds[0].dropped))

    asyncio.run(main())


def _bridge_queue_worker(name: str, host: str, end: float, out: Any, ready: Any) -> None:
    """The bridge's transport with the pub/sub worker's fan-out: one Subscription read by
    the event loop, 100 asyncio queues (isolates the cross-host path from the Hub's)."""
    import shmcast
    from shmcast.bridge import GAP_TYPE, remote

    lat = array.array("d")
    counts = {"got": 0, "gap": 0, "seen": set()}

    async def client(q: asyncio.Queue[Any], first: bool) -> None:
        while True:
            e = await q.get()
            if e is None:
                return
            if remote(e) is not None:
                lat.append(time.time() - e.payload["t"])
                counts["got"] += 1
                if first:
                    counts["seen"].add(e.payload["i"])  # type: ignore[union-attr]
            elif e.type == GAP_TYPE and first:
                counts["gap"] += int(e.payload["count"])

    async def main() -> None:
        sub = shmcast.subscribe(name, slots=4096)
        queues: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in range(CLIENTS)]
        tasks = [asyncio.create_task(client(q, i == 0)) for i, q in enumerate(queues)]
        ready.set()

        async def reader() -> None:
            async for e in sub:
                for q in queues:
                    q.put_nowait(e)

        rt = asyncio.create_task(reader())
        await asyncio.sleep(max(0.0, end - time.time()))
        sub.unsubscribe()
        await rt
        for q in queues:
            q.put_nowait(None)
        await asyncio.gather(*tasks)
        out.put(("worker", host, lat.tobytes(), counts["got"], counts["gap"],
                 len(counts["seen"]), sub.dropped))

    asyncio.run(main())


def _pubsub_owner(url: str, channel: str, host: str, rate: float, duration: float, go: Any,
                  ready: Any, done: Any, out: Any) -> None:
    import redis

    r = redis.Redis.from_url(url)
    r.ping()
    ready.set()
    go.wait(60)
    n = _pace(rate, duration, lambda i: r.publish(
        channel, json.dumps({"h": host, "i": i, "t": time.time()})))
    out.put(("published", host, n))
    done.wait(120)
    r.close()


def _pubsub_worker(url: str, channel: str, host: str, end: float, out: Any, ready: Any) -> None:
    import redis.asyncio as aioredis

    lat = array.array("d")
    counts = {"got": 0, "seen": set()}

    async def client(q: asyncio.Queue[Any], first: bool) -> None:
        while True:
            m = await q.get()
            if m is None:
                return
            if m["h"] != host:
                lat.append(time.time() - m["t"])
                counts["got"] += 1
                if first:
                    counts["seen"].add(m["i"])  # type: ignore[union-attr]

    async def main() -> None:
        r = aioredis.Redis.from_url(url)
        ps = r.pubsub()
        await ps.subscribe(channel)
        queues: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in range(CLIENTS)]
        tasks = [asyncio.create_task(client(q, i == 0)) for i, q in enumerate(queues)]

        async def reader() -> None:
            while True:
                m = await ps.get_message(ignore_subscribe_messages=True, timeout=0.1)
                if m is None:
                    if time.time() > end:
                        return
                    continue
                payload = json.loads(m["data"])
                for q in queues:
                    q.put_nowait(payload)

        ready.set()
        await reader()
        for q in queues:
            q.put_nowait(None)
        await asyncio.gather(*tasks)
        await ps.aclose()
        await r.aclose()
        out.put(("worker", host, lat.tobytes(), counts["got"], 0, len(counts["seen"]), 0))

    asyncio.run(main())


# --------------------------------------------------------------------------- phases


def _connections(url: str) -> int:
    import redis

    r = redis.Redis.from_url(url)
    try:
        return int(r.info("clients")["connected_clients"]) - 1  # not this one
    finally:
        r.close()


def _run_phase(side: str, url: str, rate: float, duration: float, tmp: str,
               tag: str) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    go, done = ctx.Event(), ctx.Event()
    procs: list[Any] = []
    bridges: list[subprocess.Popen[bytes]] = []
    channel = f"bench-{tag}"
    names = [f"bench-{tag}-h{h}" for h in range(HOSTS)]
    try:
        owners_ready = []
        for h in range(HOSTS):
            ready = ctx.Event()
            owners_ready.append(ready)
            if side.startswith("bridge"):
                p = ctx.Process(target=_bus_owner,
                                args=(names[h], f"h{h}", rate, duration, go, ready, done, out))
            else:
                p = ctx.Process(target=_pubsub_owner,
                                args=(url, channel, f"h{h}", rate, duration, go, ready, done, out))
            p.start()
            procs.append(p)
        for ready in owners_ready:
            if not ready.wait(30):
                raise RuntimeError("a publisher did not start")
        if side.startswith("bridge"):
            for h in range(HOSTS):
                bridges.append(subprocess.Popen(
                    [sys.executable, "-m", "shmcast", "bridge", names[h], "--redis", url,
                     "--stream", f"bench-{tag}", "--host-id", f"h{h}", "--state-dir", tmp],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 30
            while _connections(url) < HOSTS:
                if time.monotonic() > deadline:
                    raise RuntimeError("the bridges did not connect")
                time.sleep(0.1)
            time.sleep(1.0)  # attached to their buses
        settle = 3.0
        end = time.time() + 3.0 + duration + settle  # workers start, publish, drain
        workers_ready = []
        for h in range(HOSTS):
            for _ in range(WORKERS):
                ready = ctx.Event()
                workers_ready.append(ready)
                if side.startswith("bridge"):
                    target = _bridge_worker if side == "bridge" else _bridge_queue_worker
                    p = ctx.Process(target=target, args=(names[h], f"h{h}", end, out, ready))
                else:
                    p = ctx.Process(target=_pubsub_worker, args=(url, channel, f"h{h}", end,
                                                                 out, ready))
                p.start()
                procs.append(p)
        for ready in workers_ready:
            if not ready.wait(30):
                raise RuntimeError("a worker did not start")
        time.sleep(0.5)
        conns = _connections(url)
        go.set()
        t0 = time.monotonic()
        time.sleep(duration / 2)
        conns_mid = _connections(url)
        published: dict[str, int] = {}
        lat = array.array("d")
        got = gaps = feed_drops = 0
        first_seen: list[tuple[str, int]] = []  # per worker: what its first client got
        for _ in range(HOSTS + HOSTS * WORKERS):
            msg = out.get(timeout=duration + 60)
            if msg[0] == "published":
                published[msg[1]] = msg[2]
            else:
                _, host, raw, n, g, s, dropped = msg
                feed_drops += dropped
                a = array.array("d")
                a.frombytes(raw)
                lat.extend(a)
                got += n
                gaps += g
                first_seen.append((host, s))
        elapsed = time.monotonic() - t0
        done.set()
        # Each client should get every event of the other host(s).
        expected = {f"h{h}": sum(n for k, n in published.items() if k != f"h{h}")
                    for h in range(HOSTS)}
        expected_total = sum(expected.values()) * WORKERS * CLIENTS
        lost_first = sum(expected[host] - s for host, s in first_seen)
        xs = sorted(lat)

        def pct(p: float) -> float:
            return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000 if xs else float("nan")

        return {
            "side": side, "rate_per_host": rate, "seconds": duration,
            "published": sum(published.values()),
            "deliveries_expected": expected_total, "deliveries": got,
            "delivered_per_s": got / max(duration, elapsed - settle) if got else 0.0,
            "lost": expected_total - got, "counted_by_gap_events_first_clients": gaps,
            "lost_first_clients": lost_first, "feed_drops_first_clients": feed_drops,
            # Feed drops count local events too: what is left is an upper bound of 0.
            "uncounted_first_clients": max(0, lost_first - gaps - feed_drops),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0),
            "redis_connections_idle": conns, "redis_connections_running": conns_mid,
        }
    finally:
        done.set()
        for b in bridges:
            with contextlib.suppress(ProcessLookupError):
                os.kill(b.pid, signal.SIGTERM)
        for b in bridges:
            try:
                b.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(b.pid, signal.SIGKILL)
                b.wait(10)
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bridge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short phases")
    ap.add_argument("--rate", type=float, default=200.0, help="latency phase, events/s per host")
    ap.add_argument("--load-rate", type=float, default=2000.0,
                    help="load phase, events/s per host")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=100, help="SSE clients per worker")
    ap.add_argument("--phases", default="latency,load", help="latency, load or both")
    ap.add_argument("--json", metavar="FILE", help="write the numbers here")
    args = ap.parse_args(argv)
    global CLIENTS  # noqa: PLW0603 (read by the forked workers)
    CLIENTS = args.clients
    server = shutil.which("redis-server")
    if server is None:
        print("redis-server is not installed: nothing measured", file=sys.stderr)
        return 1
    seconds = 2.0 if args.quick else args.seconds
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="shmcast-bench-bridge-")
    redis_proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    results: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                _connections(url)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        tag = f"{os.getpid()}"
        phases = [(p, r) for p, r in (("latency", args.rate), ("load", args.load_rate))
                  if p in args.phases.split(",")]
        for phase, rate in phases:
            for side in ("bridge", "bridge-q", "pubsub"):
                r = _run_phase(side, url, rate, seconds, tmp, f"{tag}-{phase}-{side}")
                r["phase"] = phase
                results.append(r)
                print(f"{phase:7} {side:8} rate {rate:6.0f}/s/host  p50 {r['p50_ms']:7.2f} ms  "
                      f"p99 {r['p99_ms']:7.2f} ms  delivered {r['delivered_per_s']:9.0f}/s  "
                      f"lost {r['lost']:6d} (first clients: {r['lost_first_clients']}, counted "
                      f"by gap events {r['counted_by_gap_events_first_clients']}, by feed drops "
                      f"{r['feed_drops_first_clients']}, uncounted "
                      f"{r['uncounted_first_clients']})  "
                      f"redis connections {r['redis_connections_running']}", flush=True)
    finally:
        os.kill(redis_proc.pid, signal.SIGKILL)
        redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{HOSTS} hosts x {WORKERS} workers x {CLIENTS} clients, load average "
          f"{os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    for (phase, _), side in ((ph, sd) for ph in phases for sd in ("bridge", "bridge-q")):
        b = next(r for r in results if r["phase"] == phase and r["side"] == side)
        p = next(r for r in results if r["phase"] == phase and r["side"] == "pubsub")
        if p["p99_ms"] and p["delivered_per_s"]:
            print(f"{phase}: {side}/pubsub p50 {b['p50_ms'] / p['p50_ms']:.2f}x, "
                  f"p99 {b['p99_ms'] / p['p99_ms']:.2f}x, delivered/s "
                  f"{b['delivered_per_s'] / p['delivered_per_s']:.2f}x; Redis connections "
                  f"{b['redis_connections_running']} vs {p['redis_connections_running']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "load_average": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
