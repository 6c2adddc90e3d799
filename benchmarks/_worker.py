"""The subscriber process: receive, decode, stamp, count.

Counters live in a shared ``RawArray`` so the harness reads them while the
subscriber runs (and after it was SIGSTOPped or killed); latencies go back
through a pipe when the harness raises the stop flag.
"""

from __future__ import annotations

import importlib
import os
import time
import traceback
from array import array
from typing import Any

from benchmarks import _codec

# Layout of the control array: slot 0 is the stop flag, then STRIDE slots per subscriber.
STOP = 0
BASE = 8
STRIDE = 8
READY, COUNT, FIRST, LAST, GAPS = range(5)
POLL = 0.05  # seconds a subscriber blocks before it looks at the stop flag


def counters(raw: Any) -> memoryview:
    return memoryview(raw).cast("B").cast("q")


def main(
    module: str,
    spec: Any,
    index: int,
    raw: Any,
    conn: Any,
    warmup: int,
    keep_latency: bool,
    json_impl: str,
) -> None:
    """Subscriber *index*: attach with *module*'s ``open_receiver``, read until told to stop."""
    os.environ[_codec.ENV] = json_impl
    ctrl = counters(raw)
    b = BASE + index * STRIDE
    lat = array("q")
    gaps = 0
    try:
        mod = importlib.import_module(f"benchmarks.adapters.{module}")
        rx = mod.open_receiver(spec)
        try:
            ctrl[b + READY] = 1
            recv = rx.recv
            mono = time.monotonic_ns
            append = lat.append
            n = 0
            nxt = 0
            while not ctrl[STOP]:
                obj = recv(POLL)
                if obj is None:
                    continue
                now = mono()
                i = obj["i"]
                if i > nxt:
                    gaps += i - nxt
                nxt = i + 1
                if keep_latency and i >= warmup:
                    append(now - obj["t"])
                n += 1
                if n == 1:
                    ctrl[b + FIRST] = now
                ctrl[b + COUNT] = n
                ctrl[b + LAST] = now
        finally:
            rx.close()
        ctrl[b + GAPS] = gaps
        conn.send(("ok", lat.tobytes()))
    except BaseException:
        ctrl[b + READY] = -1
        conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


__all__ = ["BASE", "COUNT", "FIRST", "GAPS", "LAST", "READY", "STOP", "STRIDE", "counters", "main"]
