"""One event to 10,000 async feeds in one process: shmcast's Hub against encode/broadcaster.

``python -m benchmarks.hub_fanout`` (``--quick`` for a short run; ``--json FILE`` to
keep the numbers). Both sides run in this one process, on one asyncio event loop,
with N tasks each iterating its own stream (``async for``) and counting events:

* **shmcast**: a ``Bus`` and a ``Hub`` (one ring, one reader thread) in this
  process, ``hub.subscribe()`` per task; ``bus.publish`` from the loop;
* **broadcaster**: encode/broadcaster 0.3.1's in-process backend, ``memory://``
  (one asyncio.Queue per subscriber, filled by broadcaster's listener task);
  ``await broadcast.publish`` from the loop.

Per event: the wall time from the call to publish until the last of the N tasks
has the event, and the CPU time this process spent meanwhile (every thread: the
hub's reader thread included). Events are published one at a time, a short
pause apart, after two warm-up events. Trials alternate between the two sides
(shmcast first in even trials, broadcaster first in odd ones), each with fresh
tasks and streams; the report gives the median of all events, the 10th and 90th
percentiles, and the spread of the per-trial medians. Threads are counted
before the feeds open and while they all wait.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import shmcast

_perf = time.perf_counter
_cpu = time.process_time


class _Count:
    """How many events the tasks have had; resolves a future at a target."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.got = 0
        self.target = -1
        self.fut: asyncio.Future[float] = loop.create_future()

    def expect(self, target: int) -> asyncio.Future[float]:
        self.target = target
        self.fut = self.loop.create_future()
        if self.got >= target:
            self.fut.set_result(_perf())
        return self.fut

    def hit(self) -> None:
        self.got += 1
        if self.got == self.target:
            self.fut.set_result(_perf())


async def _measure(n: int, events: int, pause: float, count: _Count,
                   publish: Callable[[int], Awaitable[None]]) -> list[tuple[float, float]]:
    """(wall, cpu) seconds per event, after two warm-up events."""
    out = []
    for i in range(events + 2):
        fut = count.expect(n * (i + 1))
        cpu0 = _cpu()
        t0 = _perf()
        await publish(i)
        t1 = await fut
        cpu1 = _cpu()
        if i >= 2:
            out.append((t1 - t0, cpu1 - cpu0))
        await asyncio.sleep(pause)
    return out


def _payload(i: int) -> dict[str, Any]:
    return {"ts": time.time(), "i": i, "master": os.getpid()}


async def trial_shmcast(name: str, n: int, events: int, pause: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    count = _Count(loop)
    with shmcast.Bus(name, slots=256) as bus, shmcast.Hub(name, buffer=64) as hub:
        threads_before = threading.active_count()
        feeds = [hub.subscribe() for _ in range(n)]

        async def consume(feed: shmcast.Feed) -> None:
            hit = count.hit
            async for _ in feed:
                hit()

        tasks = [asyncio.ensure_future(consume(f)) for f in feeds]
        await asyncio.sleep(0.2)  # every task waits on its feed

        async def publish(i: int) -> None:
            bus.publish("heartbeat", _payload(i))

        threads_waiting = threading.active_count()
        samples = await _measure(n, events, pause, count, publish)
        for f in feeds:
            f.close()
        await asyncio.gather(*tasks)
        dropped = hub.dropped
    return {"samples": samples, "threads_before": threads_before,
            "threads_waiting": threads_waiting, "dropped": dropped}


async def trial_broadcaster(n: int, events: int, pause: float) -> dict[str, Any]:
    from broadcaster import Broadcast

    loop = asyncio.get_running_loop()
    count = _Count(loop)
    threads_before = threading.active_count()
    async with Broadcast("memory://") as broadcast:
        ready = 0
        all_ready = loop.create_future()
        stop = asyncio.Event()

        async def consume() -> None:
            nonlocal ready
            async with broadcast.subscribe("sse") as sub:
                ready += 1
                if ready == n:
                    all_ready.set_result(None)
                hit = count.hit
                reader = asyncio.ensure_future(_read(sub, hit))
                await stop.wait()
                reader.cancel()

        async def _read(sub: Any, hit: Callable[[], None]) -> None:
            async for _ in sub:
                hit()

        tasks = [asyncio.ensure_future(consume()) for _ in range(n)]
        await all_ready
        await asyncio.sleep(0.2)

        async def publish(i: int) -> None:
            await broadcast.publish("sse", json.dumps(_payload(i)))

        threads_waiting = threading.active_count()
        samples = await _measure(n, events, pause, count, publish)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"samples": samples, "threads_before": threads_before,
            "threads_waiting": threads_waiting, "dropped": 0}


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    walls = [w for t in trials for w, _ in t["samples"]]
    cpus = [c for t in trials for _, c in t["samples"]]
    medians = [statistics.median(w for w, _ in t["samples"]) for t in trials]
    return {
        "events": len(walls),
        "wall_median_ms": statistics.median(walls) * 1e3,
        "wall_p10_ms": _pct(walls, 10) * 1e3,
        "wall_p90_ms": _pct(walls, 90) * 1e3,
        "cpu_median_ms": statistics.median(cpus) * 1e3,
        "trial_medians_ms": [m * 1e3 for m in medians],
        "threads_before": [t["threads_before"] for t in trials],
        "threads_waiting": [t["threads_waiting"] for t in trials],
        "dropped": sum(t["dropped"] for t in trials),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hub_fanout", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--feeds", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=20, help="measured events per trial")
    ap.add_argument("--repeat", type=int, default=6, help="trials per side, interleaved")
    ap.add_argument("--pause", type=float, default=0.05, help="seconds between events")
    ap.add_argument("--quick", action="store_true", help="1,000 feeds, 2 trials of 5 events")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.feeds, args.events, args.repeat = 1000, 5, 2
    try:
        import broadcaster  # noqa: F401
    except ImportError:
        print("broadcaster is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2

    results: dict[str, list[dict[str, Any]]] = {"shmcast": [], "broadcaster": []}
    name = f"bench-hub-{os.getpid()}"
    for r in range(args.repeat):
        order = ["shmcast", "broadcaster"] if r % 2 == 0 else ["broadcaster", "shmcast"]
        for side in order:
            gc.collect()
            if side == "shmcast":
                res = asyncio.run(trial_shmcast(name, args.feeds, args.events, args.pause))
            else:
                res = asyncio.run(trial_broadcaster(args.feeds, args.events, args.pause))
            results[side].append(res)
            med = statistics.median(w for w, _ in res["samples"]) * 1e3
            print(f"  trial {r + 1}/{args.repeat} {side:<11} median {med:7.2f} ms per event",
                  flush=True)

    summary = {side: summarize(trials) for side, trials in results.items()}
    s, b = summary["shmcast"], summary["broadcaster"]
    print()
    print(f"One event to {args.feeds:,} async subscribers in one process "
          f"({args.repeat} interleaved trials x {args.events} events; Python "
          f"{sys.version.split()[0]}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}):")
    print()
    print("| | wall per event, median (p10-p90) | CPU per event, median | "
          "spread of trial medians | threads before / waiting |")
    print("|---|---|---|---|---|")
    for side, row in (("shmcast Hub", s), ("broadcaster memory://", b)):
        spread = f"{min(row['trial_medians_ms']):.1f}-{max(row['trial_medians_ms']):.1f} ms"
        print(f"| {side} | {row['wall_median_ms']:.1f} ms ({row['wall_p10_ms']:.1f}-"
              f"{row['wall_p90_ms']:.1f}) | {row['cpu_median_ms']:.1f} ms | {spread} | "
              f"{max(row['threads_before'])} / {max(row['threads_waiting'])} |")
    ratio = s["wall_median_ms"] / b["wall_median_ms"]
    print()
    print(f"shmcast / broadcaster, median wall per event: {ratio:.2f}; CPU: "
          f"{s['cpu_median_ms'] / b['cpu_median_ms']:.2f}; shmcast feeds dropped "
          f"{s['dropped']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "ratio_wall": ratio}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
