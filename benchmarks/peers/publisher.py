"""Publishes heartbeat events into Redis at a fixed rate, for the SSE peers.

Usage: ``python -m benchmarks.peers.publisher --url redis://127.0.0.1:PORT/0 --rate 10
--format broadcaster|flask_sse``

The payload is the one the shmcast examples' master publishes in its ``heartbeat``
events (``{"ts": time.time(), "master": pid, "subscribers": 0, "dropped": 0}``);
``ts`` is what the load client measures latency against. Ids are 1, 2, 3, … (the
shmcast examples send the bus version, which grows the same way), so holes show.

Wire formats, each what its app expects:

* ``broadcaster``: ``"<id> heartbeat <json>"``, split once by the app (broadcaster
  hands the message to every subscriber as one ``str``);
* ``flask_sse``: Flask-SSE's envelope, ``{"data": …, "type": "heartbeat", "id": N}``
  as JSON, decoded and re-encoded per client as Flask-SSE does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--channel", default="sse")
    ap.add_argument("--rate", type=float, required=True, help="events per second")
    ap.add_argument("--format", choices=("broadcaster", "flask_sse"), required=True)
    args = ap.parse_args(argv)

    import redis

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    client = redis.Redis.from_url(args.url)
    pid = os.getpid()
    period = 1.0 / args.rate
    seq = 0
    next_at = time.monotonic()
    while not stop.is_set():
        seq += 1
        payload = {"ts": time.time(), "master": pid, "subscribers": 0, "dropped": 0}
        if args.format == "broadcaster":
            message = f"{seq} heartbeat {json.dumps(payload, separators=(',', ':'))}"
        else:
            message = json.dumps({"data": payload, "type": "heartbeat", "id": seq})
        try:
            client.publish(args.channel, message)
        except redis.ConnectionError:  # the broker is going away at the end of a run
            if stop.wait(0.1):
                break
        # Fixed schedule, like the examples' heartbeat (next += period), so a slow
        # publish does not lower the rate.
        next_at = max(next_at + period, time.monotonic() - period)
        stop.wait(max(0.0, next_at - time.monotonic()))
    client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
