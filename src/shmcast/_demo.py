"""``shmcast demo``: one publisher, several subscriber processes, one of them slow.

Every subscriber checks what the contract promises it: versions strictly
increase, received + dropped == published, the missing versions are exactly
the dropped ones, and no payload is torn. The publisher checks that
``bus.dropped`` is the sum of the subscribers' drops.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import zlib
from typing import Any

from ._bus import Bus
from ._ring import NATIVE
from ._subscription import subscribe


def _subscriber(name: str, label: str, delay: float, out: Any) -> None:
    received = 0
    last = 0
    increasing = True
    torn = 0
    with subscribe(name) as sub:
        out.put(("ready", label))
        for event in sub:
            if event.version <= last:
                increasing = False
            last = event.version
            body = event.payload
            if zlib.crc32(body["blob"].encode()) != body["crc"]:
                torn += 1
            received += 1
            if delay:
                time.sleep(delay)
        out.put(("done", label, received, sub.dropped, increasing, torn))


def run(events: int = 20_000, subscribers: int = 4, slow_delay: float = 0.001,
        stream: Any = None) -> bool:
    """Run the demo, print its report, and return whether every invariant held."""
    stream = stream or sys.stdout
    name = f"demo-{os.getpid()}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    labels = [f"fast-{i}" for i in range(1, subscribers)] + ["slow"]
    procs = []
    ok = True
    core = "native (C extension)" if NATIVE else "pure Python"
    print(f"shmcast core: {core} (shmcast.native = {NATIVE})", file=stream)
    with Bus(name, slots=256, slot_size=1024) as bus:
        try:
            for label in labels:
                delay = slow_delay if label == "slow" else 0.0
                proc = ctx.Process(target=_subscriber, args=(name, label, delay, out), daemon=True)
                proc.start()
                procs.append(proc)
            for _ in labels:
                out.get(timeout=30)
            deadline = time.monotonic() + 10
            while bus.subscriber_count < len(labels) and time.monotonic() < deadline:
                time.sleep(0.01)
            print(f"bus {name!r}: {len(labels)} subscribers attached "
                  f"(one slow: {slow_delay * 1000:.1f} ms per event)", file=stream)
            start = time.perf_counter()
            for i in range(events):
                blob = f"event {i} " * (i % 20 + 1)
                bus.publish("members" if i % 10 else "heartbeat",
                            {"seq": i, "blob": blob, "crc": zlib.crc32(blob.encode())})
                if i % 2000 == 0 or i == events - 1:
                    rate = (i + 1) / max(time.perf_counter() - start, 1e-9)
                    print(f"\rpublished {i + 1:>7}/{events}  {rate:>9,.0f} events/s  "
                          f"dropped {bus.dropped:>7}", end="", file=stream, flush=True)
            elapsed = time.perf_counter() - start
            print(file=stream)
            published = bus.version
            bus.close()  # every subscriber drains its ring, then its stream ends
            reports = {}
            for _ in labels:
                msg = out.get(timeout=60)
                reports[msg[1]] = msg[2:]
            total_dropped = bus.dropped
        finally:
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    print(f"published {published} events in {elapsed:.2f} s "
          f"({published / elapsed:,.0f}/s)\n", file=stream)
    print(f"{'subscriber':<11}{'received':>10}{'dropped':>9}{'sum':>8}  "
          f"{'ordered':<8}{'torn':>5}  ok", file=stream)
    drops = 0
    for label in labels:
        received, dropped, increasing, torn = reports[label]
        drops += dropped
        good = received + dropped == published and increasing and not torn
        ok &= good
        print(f"{label:<11}{received:>10}{dropped:>9}{received + dropped:>8}  "
              f"{'yes' if increasing else 'NO':<8}{torn:>5}  {'yes' if good else 'NO'}",
              file=stream)
    sums = drops == total_dropped
    ok &= sums and all(p.exitcode == 0 for p in procs)
    print(f"\nbus.dropped = {total_dropped} (sum of subscribers: {drops}): "
          f"{'consistent' if sums else 'INCONSISTENT'}", file=stream)
    print("invariants held" if ok else "INVARIANTS VIOLATED", file=stream)
    return ok


__all__ = ["run"]
