"""Flask app: one shmcast subscription per SSE request.

``GET /events`` streams Server-Sent Events::

    id: <event.version>
    event: <event.type>
    data: <event.data, the JSON exactly as the master published it>

Rules of the stream (what a client may rely on):

* The first event is always a ``members`` event: a complete topology
  snapshot. Events that arrive before it are withheld (they would describe a
  state the client does not have yet).
* After it, ids increase by exactly 1, unless events were lost. When the
  subscription loses events (its ring overflowed because this client read too
  slowly), the stream sends ``: dropped N`` and then withholds everything
  until the next ``members`` event, which the master republishes as soon as it
  sees ``bus.dropped`` grow. So: every hole in the ids is immediately followed
  by a ``members`` snapshot. There is no replay.
* When nothing was written for SHMCAST_KEEPALIVE seconds (default 15), the
  stream writes an SSE comment ``: keepalive``: it keeps proxies from timing
  out and finds dead clients.
* ``Last-Event-ID`` is ignored: a reconnecting EventSource gets a fresh
  snapshot.

``GET /`` is a page that shows the live topology; ``GET /healthz`` says which
worker answered.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from flask import Flask, Response, jsonify

from shmcast import BusNotFoundError, StreamClosed, TooManySubscribersError, subscribe

BUS_NAME = os.environ.get("SHMCAST_BUS", "sse-demo")
KEEPALIVE = float(os.environ.get("SHMCAST_KEEPALIVE", "15"))
INDEX_HTML = (Path(__file__).parent / "index.html").read_text(encoding="utf-8")

app = Flask(__name__)

# Streams open in this worker process, so that drain() can end them.
_streams_lock = threading.Lock()
_streams: set = set()
_draining = threading.Event()


def drain() -> None:
    """End every open stream now; refuse new ones. Called when the worker stops."""
    _draining.set()
    with _streams_lock:
        subs = list(_streams)
    for sub in subs:
        sub.unsubscribe()  # a get() blocked in another thread returns promptly


def format_event(event) -> str:
    data = event.data.decode("utf-8")
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"id: {event.version}\nevent: {event.type}\n{lines}\n"


def sse_lines(sub):
    """Yield SSE text for one subscription, following the rules in the module doc."""
    yield "retry: 1000\n: waiting for a snapshot\n\n"
    synced = False  # the client has a snapshot and every event since
    last = 0
    dropped_seen = 0
    last_write = time.monotonic()
    while not _draining.is_set():
        try:
            event = sub.get(timeout=min(KEEPALIVE, 1.0))
        except TimeoutError:
            if time.monotonic() - last_write >= KEEPALIVE:
                last_write = time.monotonic()
                yield ": keepalive\n\n"
            continue
        except StreamClosed:  # bus closed, master gone, or drain()
            return
        out = []
        dropped = sub.dropped
        if dropped != dropped_seen:
            out.append(f": dropped {dropped - dropped_seen}\n\n")
            dropped_seen = dropped
        if synced and event.version != last + 1:
            synced = False  # a hole: wait for the next snapshot
        if not synced and event.type == "members":
            synced = True
        if synced:
            out.append(format_event(event))
            last = event.version
        if out:
            last_write = time.monotonic()
            yield "".join(out)


class SSEBody:
    """The response iterable: owns the subscription and ends it on close().

    gunicorn calls close() when the response ends, when the client went away
    (the next write failed) and when the worker stops; a bare generator that
    never started would not run its ``finally``.
    """

    def __init__(self, sub) -> None:
        self.sub = sub
        self._gen = sse_lines(sub)
        with _streams_lock:
            _streams.add(sub)

    def __iter__(self):
        return self._gen

    def close(self) -> None:
        self._gen.close()
        with _streams_lock:
            _streams.discard(self.sub)
        self.sub.unsubscribe()


@app.get("/events")
def events():
    if _draining.is_set():
        return Response("worker stopping\n", status=503, headers={"Retry-After": "1"})
    try:
        sub = subscribe(BUS_NAME)
    except (BusNotFoundError, TooManySubscribersError) as exc:
        return Response(f"{exc}\n", status=503, headers={"Retry-After": "1"})
    return Response(
        SSEBody(sub),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@app.get("/")
def index():
    return Response(INDEX_HTML, mimetype="text/html")


@app.get("/healthz")
def healthz():
    with _streams_lock:
        open_streams = len(_streams)
    return jsonify(pid=os.getpid(), bus=BUS_NAME, streams=open_streams)
