"""The core issue's quick measurement: publish rate with 1 and 8 subscribers, and latency.

``python -m benchmarks.core_quick``: 100-byte JSON events; subscribers are forked
processes reading in a loop; latency is stamped with ``time.monotonic_ns()``
inside the payload. ``json.dumps`` of the same payload is timed in the same
run, as the yardstick of this machine's speed at that moment. The full
comparison with other libraries is ``python -m benchmarks``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import timeit
from typing import Any

import shmcast

PAD = "x" * 60  # with the stamp and the counter: about 100 bytes of JSON


def _subscriber(name: str, out: Any) -> None:
    latencies = []
    with shmcast.subscribe(name, slots=1024) as sub:
        out.put("ready")
        for event in sub:
            latencies.append(time.monotonic_ns() - event.payload["t"])
        out.put((len(latencies), sub.dropped, latencies))


def run(subscribers: int, events: int = 50_000, rate: float | None = None) -> str:
    """One measurement; returns its line of report."""
    name = f"quick-{os.getpid()}"
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_subscriber, args=(name, out)) for _ in range(subscribers)]
    with shmcast.Bus(name, slots=1024, slot_size=512) as bus:
        try:
            for proc in procs:
                proc.start()
            for _ in procs:
                out.get(timeout=30)
            start = next_at = time.perf_counter()
            for i in range(events):
                if rate:
                    next_at += 1 / rate
                    while time.perf_counter() < next_at:
                        pass
                bus.publish("x", {"t": time.monotonic_ns(), "i": i, "p": PAD})
            elapsed = time.perf_counter() - start
            bus.close()
            results = [out.get(timeout=60) for _ in procs]
        finally:
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    received = sum(r[0] for r in results)
    dropped = sum(r[1] for r in results)
    lat = sorted(x for r in results for x in r[2])
    p50 = lat[len(lat) // 2] / 1000
    p99 = lat[int(len(lat) * 0.99)] / 1000
    return (f"N={subscribers} {'max rate' if rate is None else f'{rate:.0f}/s'}: "
            f"publish {events / elapsed:,.0f}/s ({elapsed / events * 1e6:.2f} us each), "
            f"delivered {received / elapsed:,.0f}/s, lost {dropped / (received + dropped):.1%}, "
            f"latency p50 {p50:.0f} us p99 {p99:.0f} us")


def main() -> None:
    payload = {"t": time.monotonic_ns(), "i": 1, "p": PAD}
    dumps = min(timeit.repeat(lambda: json.dumps(payload, separators=(",", ":")).encode(),
                              number=20_000, repeat=5)) / 20_000 * 1e6
    print(f"json.dumps of the payload: {dumps:.2f} us (this machine, now); "
          f"load average {os.getloadavg()[0]:.1f}")
    for subscribers in (1, 8):
        print(run(subscribers))
    for subscribers in (1, 8):
        print(run(subscribers, events=6000, rate=2000))


if __name__ == "__main__":
    main()
