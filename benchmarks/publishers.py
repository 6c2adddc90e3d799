"""Publishing from worker processes (issue 11): shmcast ``Publisher`` against a zmq XSUB/XPUB proxy.

Usage (from the repository root)::

    python -m benchmarks.publishers            # full run, about a minute
    python -m benchmarks.publishers --quick    # a few seconds: checks that it runs
    python -m benchmarks.publishers --out FILE # also write the numbers as JSON

The shape is a gunicorn deployment's: a bus owner that only hosts the bus
(shmcast: the ``Bus`` and its drain thread; zmq: ``zmq.proxy`` between an XSUB
and an XPUB socket on ``ipc://``, the usual many-to-many answer on one host),
P worker processes that publish (``Publisher.publish``; a PUB socket connected
to the proxy), and S other processes that subscribe. Every event is the same
JSON object ``{"t": monotonic_ns, "i": seq, "p": publisher, "d": pad}``,
encoded once by its publisher and decoded once by each subscriber; latency is
the subscriber's ``time.monotonic_ns()`` minus ``t``.

Cells:

* latency at 2,000 events/s (one publisher, paced), p50 and p99 over every
  subscriber's samples;
* delivered/s with 1, 4 and 8 publishers publishing as fast as they can:
  events each subscriber received per second, averaged over subscribers, and
  what the publishers counted as dropped (shmcast: ``pub.dropped``; zmq's PUB
  socket drops at its high-water mark without telling); and where the CPU went,
  from each process's own clock: the owner's process (shmcast: the harness,
  whose drain thread does the work; zmq: the proxy) and each subscriber per
  event a subscriber received, each publisher per event it gave.

Both sides get the same queue depth (``slots`` of the bus and of each
subscriber's ring; the HWM of every zmq socket).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python benchmarks/publishers.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEPTH = 1024
PAYLOAD = 100  # bytes of the encoded event, about
POLL = 0.05


def _event(i: int, p: int, pad: str) -> dict[str, Any]:
    return {"t": time.monotonic_ns(), "i": i, "p": p, "d": pad}


def _pad() -> str:
    return "x" * max(0, PAYLOAD - len(json.dumps(_event(0, 0, ""))))


# --------------------------------------------------------------------------- child processes


def _subscriber(kind: str, where: str, ready: Any, stop: Any, conn: Any, warmup: int) -> None:
    """Receive until *stop*; send back (count, dropped, latencies in ns of the events
    after each publisher's first *warmup*)."""
    lat = array("q")
    count = 0
    dropped = 0
    mono = time.monotonic_ns
    cpu0 = time.process_time()
    try:
        if kind == "shmcast":
            from shmcast import StreamClosed, subscribe

            sub = subscribe(where, slots=DEPTH)
            ready.set()
            get = sub.get
            get_nowait = sub.get_nowait
            ended = False
            # As the zmq loop below: wait, then take what is ready, and look at the
            # stop flag (a multiprocessing.Event: a lock round trip) only in between.
            while not ended and not stop.is_set():
                try:
                    event = get(timeout=POLL)
                except TimeoutError:
                    continue
                except StreamClosed:
                    break
                while True:
                    now = mono()
                    obj = event.payload
                    count += 1
                    if obj["i"] >= warmup:
                        lat.append(now - obj["t"])
                    try:
                        event = get_nowait()
                    except TimeoutError:
                        break
                    except StreamClosed:
                        ended = True
                        break
            dropped = sub.dropped
            sub.close()
        else:
            import zmq

            from shmcast._codecs import BUILTIN  # the same decoder as shmcast's subscribers

            ctx = zmq.Context()
            sock = ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.RCVHWM, DEPTH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(where)
            ready.set()
            loads = BUILTIN["json"].loads
            recv = sock.recv
            poll = sock.poll
            while not stop.is_set():
                if not poll(int(POLL * 1000)):
                    continue
                while True:
                    try:
                        data = recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    now = mono()
                    obj = loads(data)
                    count += 1
                    if obj["i"] >= warmup:
                        lat.append(now - obj["t"])
            sock.close(linger=0)
            ctx.term()
        conn.send(("ok", count, dropped, lat.tobytes(), time.process_time() - cpu0))
    except BaseException as e:  # noqa: BLE001 - reported to the harness
        conn.send(("error", repr(e), 0, b"", 0.0))


def _publisher(kind: str, where: str, index: int, rate: float, seconds: float, ready: Any,
               go: Any, conn: Any) -> None:
    """Publish for *seconds* (paced at *rate* per second, or flat out if 0); send back
    (events given to publish, dropped, CPU seconds from the start)."""
    try:
        pad = _pad()
        if kind == "shmcast":
            from shmcast import Publisher

            pub = Publisher(where)
            send = lambda obj: pub.publish("e", obj)  # noqa: E731
        else:
            import zmq

            ctx = zmq.Context()
            sock = ctx.socket(zmq.PUB)
            sock.setsockopt(zmq.SNDHWM, DEPTH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(where)
            zsend = sock.send
            from shmcast._codecs import BUILTIN  # the same encoder as the bus's

            dumps = BUILTIN["json"].dumps
            send = lambda obj: zsend(dumps(obj))  # noqa: E731
        ready.set()
        go.wait(60)
        cpu0 = time.process_time()
        i = 0
        start = time.monotonic()
        end = start + seconds
        if rate:
            period = 1.0 / rate
            nxt = start
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                if now < nxt:
                    time.sleep(nxt - now)
                send(_event(i, index, pad))
                i += 1
                nxt += period
        else:
            while time.monotonic() < end:
                for _ in range(64):
                    send(_event(i, index, pad))
                    i += 1
        cpu = time.process_time() - cpu0
        if kind == "shmcast":
            dropped = pub.dropped
            pub.close()
        else:
            dropped = 0  # a PUB socket drops at its HWM without counting
            time.sleep(0.2)  # let the socket flush what it queued
            sock.close(linger=0)
            ctx.term()
        conn.send(("ok", i, dropped, cpu))
    except BaseException as e:  # noqa: BLE001 - reported to the harness
        conn.send(("error", repr(e), 0, 0.0))


def _proxy(xsub: str, xpub: str, ready: Any) -> None:
    """The zmq peer's bus owner: zmq.proxy between an XSUB and an XPUB socket (in C)."""
    import zmq

    ctx = zmq.Context()
    front = ctx.socket(zmq.XSUB)
    back = ctx.socket(zmq.XPUB)
    for sock in (front, back):
        sock.setsockopt(zmq.SNDHWM, DEPTH)
        sock.setsockopt(zmq.RCVHWM, DEPTH)
        sock.setsockopt(zmq.LINGER, 0)
    front.bind(xsub)
    back.bind(xpub)
    ready.set()
    with contextlib.suppress(zmq.ContextTerminated, KeyboardInterrupt):
        zmq.proxy(front, back)


# --------------------------------------------------------------------------- one cell


class Owner:
    """The bus owner of one peer, alive for the whole run of that peer."""

    def __init__(self, kind: str, ctx: Any, tmp: str) -> None:
        self.kind = kind
        self.proc: Any = None
        self.bus: Any = None
        if kind == "shmcast":
            from shmcast import Bus

            self.target = self.source = f"bench-pub-{os.getpid()}"
            self.bus = Bus(self.target, slots=DEPTH, slot_size=512, max_publishers=8,
                           max_subscribers=8)
        else:
            self.target = f"ipc://{tmp}/xsub.ipc"
            self.source = f"ipc://{tmp}/xpub.ipc"
            ready = ctx.Event()
            self.proc = ctx.Process(target=_proxy, args=(self.target, self.source, ready),
                                    daemon=True)
            self.proc.start()
            if not ready.wait(30):
                raise RuntimeError("the zmq proxy did not start")

    def cpu(self) -> float:
        """CPU seconds the owner's process used so far (shmcast: this process, whose
        main thread only waits on the children meanwhile; zmq: the proxy's)."""
        pid = os.getpid() if self.proc is None else self.proc.pid
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.bus is not None:
            self.bus.close()
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(10)


def cell(owner: Owner, ctx: Any, *, publishers: int, subscribers: int, rate: float,
         seconds: float, warmup: int) -> dict[str, Any]:
    """Run one measurement; every child is reaped (killed by pid if it hangs)."""
    stop, go = ctx.Event(), ctx.Event()
    procs: list[Any] = []
    sub_conns, pub_conns = [], []
    try:
        sub_ready = []
        # Subscribers first: an event published before one attached would count as lost.
        for _ in range(subscribers):
            rd, wr = ctx.Pipe(duplex=False)
            ready = ctx.Event()
            p = ctx.Process(target=_subscriber, daemon=True,
                            args=(owner.kind, owner.source, ready, stop, wr, warmup))
            p.start()
            wr.close()
            procs.append(p)
            sub_conns.append(rd)
            sub_ready.append(ready)
        for ready in sub_ready:
            if not ready.wait(60):
                raise RuntimeError("a subscriber did not start")
        pub_ready = []
        for k in range(publishers):
            rd, wr = ctx.Pipe(duplex=False)
            ready = ctx.Event()
            p = ctx.Process(target=_publisher, daemon=True,
                            args=(owner.kind, owner.target, k, rate / publishers if rate else 0,
                                  seconds, ready, go, wr))
            p.start()
            wr.close()
            procs.append(p)
            pub_conns.append(rd)
            pub_ready.append(ready)
        for ready in pub_ready:
            if not ready.wait(60):
                raise RuntimeError("a publisher did not start")
        if owner.kind == "zmq":
            time.sleep(0.5)  # subscriptions travel XPUB -> proxy -> XSUB -> each PUB
        owner_cpu = owner.cpu()
        go.set()
        start = time.monotonic()
        pubs = [conn.recv() if conn.poll(seconds + 60) else ("error", "no answer", 0, 0.0)
                for conn in pub_conns]
        elapsed = time.monotonic() - start
        owner_cpu = owner.cpu() - owner_cpu
        time.sleep(0.5)  # what is in flight arrives
        stop.set()
        subs = [conn.recv() if conn.poll(60) else ("error", "no answer", 0, b"", 0.0)
                for conn in sub_conns]
    finally:
        stop.set()
        go.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = [r[1] for r in pubs + subs if r[0] != "ok"]
    if errors:
        raise RuntimeError(f"{owner.kind}: {errors}")
    given = sum(r[1] for r in pubs)
    received = [r[1] for r in subs]
    lat = array("q")
    for r in subs:
        lat.frombytes(r[3])
    out: dict[str, Any] = {
        "publishers": publishers, "subscribers": subscribers, "seconds": round(elapsed, 3),
        "given": given, "pub_dropped": sum(r[2] for r in pubs),
        "sub_dropped": sum(r[2] for r in subs),
        "received_per_sub": round(statistics.mean(received)),
        "delivered_per_s": round(statistics.mean(received) / seconds),
        # CPU per event, from each process's own clock: the owner's and each
        # subscriber's per event a subscriber received, the publishers' per event given.
        "owner_cpu_us": round(owner_cpu / max(1, statistics.mean(received)) * 1e6, 2),
        "publisher_cpu_us": round(sum(r[3] for r in pubs) / max(1, given) * 1e6, 2),
        "subscriber_cpu_us": round(statistics.mean(r[4] / max(1, r[1]) for r in subs) * 1e6,
                                   2),
    }
    if rate and len(lat) >= 20:
        qs = statistics.quantiles(sorted(lat), n=100)
        out.update(p50_us=round(qs[49] / 1000, 1), p99_us=round(qs[98] / 1000, 1),
                   samples=len(lat))
    return out


# --------------------------------------------------------------------------- the run


def wait_for_quiet(max_load: float | None, max_wait: float) -> float:
    """Wait (up to *max_wait* s) until the 1-minute load average is below *max_load*;
    the load when the cell starts. A shared two-core machine is rarely idle."""
    if max_load is not None:
        deadline = time.monotonic() + max_wait
        while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
            time.sleep(1)
    return round(os.getloadavg()[0], 2)


def run(quick: bool, repeat: int = 1, max_load: float | None = None,
        max_load_wait: float = 120.0) -> dict[str, Any]:
    """Every cell for every peer, the peers taking turns cell by cell (so a change in
    the machine's load hits both alike), *repeat* times; the median of each number."""
    ctx = mp.get_context("spawn")
    seconds = 0.5 if quick else 3.0
    subscribers = 2
    pub_counts = [1, 4] if quick else [1, 4, 8]
    kinds = ["shmcast"]
    unavailable: dict[str, str] = {}
    try:
        import zmq  # noqa: F401

        kinds.append("zmq")
    except ImportError as e:
        unavailable["zmq"] = repr(e)
    cells: list[tuple[str, dict[str, Any]]] = [
        ("latency_2000", {"publishers": 1, "rate": 2000, "seconds": seconds + 0.5,
                          "warmup": 200}),
        *[(f"throughput_{n}", {"publishers": n, "rate": 0, "seconds": seconds, "warmup": 0})
          for n in pub_counts],
    ]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {k: {c: [] for c, _ in cells}
                                                        for k in kinds}
    with tempfile.TemporaryDirectory(prefix="bench-pub-") as tmp:
        owners = {}
        try:
            for kind in kinds:
                owners[kind] = Owner(kind, ctx, tmp)
            for _ in range(repeat):
                for name, params in cells:
                    for kind in kinds:
                        load = wait_for_quiet(max_load, max_load_wait)
                        out = cell(owners[kind], ctx, subscribers=subscribers, **params)
                        out["load"] = load
                        runs[kind][name].append(out)
                        print(f"{kind:8} {name:14} load {load:5.2f}  "
                              f"{out['delivered_per_s']:>8,}/s  given {out['given']:>8,}  "
                              f"pub dropped {out['pub_dropped']:>7,}  sub dropped "
                              f"{out['sub_dropped']:>7,}  p50 {out.get('p50_us', '-')} µs  "
                              f"p99 {out.get('p99_us', '-')} µs  CPU µs/event: owner "
                              f"{out['owner_cpu_us']} pub {out['publisher_cpu_us']} sub "
                              f"{out['subscriber_cpu_us']}", file=sys.stderr, flush=True)
        finally:
            for owner in owners.values():
                owner.close()

    def median_of(samples: list[dict[str, Any]]) -> dict[str, Any]:
        merged = dict(samples[0])
        for key, value in samples[0].items():
            if isinstance(value, (int, float)) and key not in ("publishers", "subscribers"):
                mid = statistics.median(s[key] for s in samples if key in s)
                merged[key] = round(mid, 1) if key.endswith("_us") or key == "load" else \
                    round(mid)
        merged["runs"] = samples
        return merged

    peers: dict[str, Any] = {k: {"unavailable": why} for k, why in unavailable.items()}
    for kind in kinds:
        peers[kind] = {
            "latency_2000": median_of(runs[kind]["latency_2000"]),
            "throughput": [median_of(runs[kind][f"throughput_{n}"]) for n in pub_counts],
        }
    return {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "kernel": platform.release()},
            "quick": quick, "repeat": repeat, "depth": DEPTH, "payload": PAYLOAD,
            "subscribers": subscribers, "peers": peers}


def table(results: dict[str, Any]) -> str:
    """The numbers as a Markdown table."""
    measured = [p for p in results["peers"].values() if "throughput" in p]
    counts = [c["publishers"] for c in measured[0]["throughput"]]
    lines = ["| peer | latency p50 at 2,000/s | p99 | "
             + " | ".join(f"delivered/s, {n} publisher{'s' if n > 1 else ''}" for n in counts)
             + " |", "|---" * (3 + len(counts)) + "|"]
    for kind, peer in results["peers"].items():
        if "unavailable" in peer:
            lines.append(f"| {kind} | not measured: {peer['unavailable']} |")
            continue
        lat = peer["latency_2000"]
        cells = [f"{round(c['delivered_per_s']):,}"
                 + (f" ({round(c['pub_dropped']):,} dropped)" if c["pub_dropped"] else "")
                 for c in peer["throughput"]]
        lines.append(f"| {kind} | {lat.get('p50_us', '-')} µs | {lat.get('p99_us', '-')} µs | "
                     + " | ".join(cells) + " |")
    # Where the CPU went in the same cells: owner / each publisher / each subscriber.
    lines += ["", "| peer | " + " | ".join(
        f"CPU µs per event (owner / publisher / subscriber), {n} publisher{'s' if n > 1 else ''}"
        for n in counts) + " |", "|---" * (1 + len(counts)) + "|"]
    for kind, peer in results["peers"].items():
        if "throughput" in peer:
            lines.append(f"| {kind} | " + " | ".join(
                f"{c.get('owner_cpu_us', '-')} / {c.get('publisher_cpu_us', '-')} / "
                f"{c.get('subscriber_cpu_us', '-')}" for c in peer["throughput"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.publishers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: checks that it runs")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every cell this many times; report the medians")
    parser.add_argument("--max-load", type=float,
                        help="before each cell, wait until the 1-minute load average is below")
    parser.add_argument("--max-load-wait", type=float, default=120.0,
                        help="...for at most this many seconds (default 120)")
    args = parser.parse_args(argv)
    # Killed with SIGTERM, still close the bus and reap the children (finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = run(args.quick, args.repeat, args.max_load, args.max_load_wait)
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
