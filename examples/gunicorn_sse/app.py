"""Flask app: one shmcast Hub per worker, one feed of it per SSE request.

``GET /events`` streams Server-Sent Events::

    id: <event.version>
    event: <event.type>
    data: <event.data, the JSON exactly as the master published it>

The worker's :class:`shmcast.Hub` is its one subscriber of the bus (made by
``start_hub()`` from gunicorn's ``post_worker_init``); each request reads a
:class:`shmcast.Feed` of it, a local buffer of ``SHMCAST_BUFFER`` events.

Rules of the stream (what a client may rely on):

* The stream opens with ``retry: 1000``. The first event is always a
  ``members`` event, a complete topology snapshot: a new client gets the last
  one the worker's hub received (``hub.latest("members")``) at once, then
  every event after it. Events before the first snapshot are withheld (they
  would describe a state the client does not have yet); a worker that has
  none yet says ``: waiting for a snapshot``.
* A client that reconnects with ``Last-Event-ID: N``, to any worker, first
  gets exactly the events after N that it missed (the hub keeps the last
  ``SHMCAST_HISTORY``), then the live ones: no snapshot, no hole, no
  duplicate. If some of them are no longer kept, the stream says ``: dropped
  K`` (the counted gap) and starts again from a fresh snapshot, as a new
  client would.
* After the snapshot, ids increase by exactly 1, unless events were lost.
  When the feed loses events (this client read too slowly and its buffer
  overflowed), the stream sends ``: dropped K`` and then withholds
  everything until the next ``members`` event. So: every hole in the ids is
  immediately followed by a ``members`` snapshot.
* When nothing was written for SHMCAST_KEEPALIVE seconds (default 15), the
  stream writes an SSE comment ``: keepalive``: it keeps proxies from timing
  out and finds dead clients.

``POST /publish`` publishes its body, a JSON object, as a ``message`` event
from this worker, through the worker's one :class:`shmcast.Publisher` (made by
``start_publisher()`` from ``post_worker_init``, closed by ``worker_exit``):
every stream of every worker gets it, once, in the bus's one order. The
answers:

* ``202`` and ``{"type": "message", "worker": <pid>, "dropped": <n>}``: the
  bus has the event (``dropped``: events this worker could not hand over so
  far). The bus gives it its version; the streams show it.
* ``400``: the body is not a JSON object (NaN and Infinity are not JSON);
  ``413``: it does not fit the bus's ``slot_size`` (or is over 1 MiB).
* ``503`` (with ``Retry-After``): the worker cannot publish: the bus is closed,
  its owner is gone, this worker is stopping, or the owner is not taking
  events (stopped or far behind: the event was dropped, and counted).
* ``405`` for any other method.

``GET /`` is a page that shows the live topology and posts messages; ``GET
/healthz`` says which worker answered, with its hub's figures.

Across hosts (``SHMCAST_STREAM_IDS=1``, with ``shmcast bridge NAME --redis URL
--echo`` on every host): the streams serve only the entries of the Redis
stream, with their stream id as ``id:``, and a client resumes by it on any
host; see ``stream_ids.py``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import stream_ids
from flask import Flask, Response, jsonify, request

from shmcast import (
    BusNotFoundError,
    EventTooLargeError,
    Hub,
    Publisher,
    ShmcastError,
    StreamClosed,
    TooManyPublishersError,
    TooManySubscribersError,
)

BUS_NAME = os.environ.get("SHMCAST_BUS", "sse-demo")
KEEPALIVE = float(os.environ.get("SHMCAST_KEEPALIVE", "15"))
BUFFER = int(os.environ.get("SHMCAST_BUFFER", "64"))  # events a stream may fall behind
HISTORY = int(os.environ.get("SHMCAST_HISTORY", "1024"))  # events kept for Last-Event-ID
HUB_SLOTS = int(os.environ.get("SHMCAST_HUB_SLOTS", "128"))  # the hub's ring on the bus
BATCH = 64  # events written at most in one go
LAGGING = 0.05  # seconds after its publication an event is late
MAX_BODY = 1 << 20  # bytes of a POST /publish body read at most; slot_size decides the rest
INDEX_HTML = (Path(__file__).parent / "index.html").read_text(encoding="utf-8")

app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = MAX_BODY  # a longer body: 413 before it is read

_hub_lock = threading.Lock()
_hub: Hub | None = None
_snapshots: stream_ids.Snapshots | None = None  # the cross-host mode's latest("members")
_draining = threading.Event()


def start_hub() -> Hub | None:
    """This worker's hub: made on first use (post_worker_init), again if it ended."""
    global _hub, _snapshots  # noqa: PLW0603  (one hub per worker process)
    with _hub_lock:
        if _draining.is_set():
            return None
        if _hub is None or _hub.closed:
            try:
                _hub = Hub(BUS_NAME, slots=HUB_SLOTS, buffer=BUFFER, history=HISTORY)
            except (BusNotFoundError, TooManySubscribersError):
                _hub = None
            if _hub is not None and stream_ids.ENABLED:
                _snapshots = stream_ids.Snapshots(_hub)
        return _hub


def drain() -> None:
    """End every open stream now; refuse new ones. Called when the worker stops."""
    _draining.set()
    with _hub_lock:
        hub = _hub
    if hub is not None:
        hub.close()  # every feed ends: a get() blocked in another thread returns promptly


_pub_lock = threading.Lock()
_pub: Publisher | None = None


def start_publisher() -> Publisher | None:
    """This worker's publisher: made on first use (post_worker_init), again if it ended."""
    global _pub  # noqa: PLW0603  (one publisher per worker process)
    with _pub_lock:
        if _draining.is_set():
            return None
        if _pub is None or _pub.closed:
            try:
                _pub = Publisher(BUS_NAME)
            except (BusNotFoundError, TooManyPublishersError):
                _pub = None
        return _pub


def stop_publisher() -> None:
    """Give this worker's publisher place back, for good. Called when the worker exits."""
    global _pub
    _draining.set()
    with _pub_lock:
        pub, _pub = _pub, None
    if pub is not None:
        pub.close()


# The SSE text of the last events, formatted once for all the streams of the worker.
_formatted: dict[tuple[int, float], str] = {}


def format_event(event) -> str:
    key = (event.version, event.timestamp)
    text = _formatted.get(key)
    if text is None:
        data = event.data.decode("utf-8")
        lines = "".join(f"data: {line}\n" for line in data.split("\n"))
        text = f"id: {event.version}\nevent: {event.type}\n{lines}\n"
        if len(_formatted) >= 256:
            _formatted.clear()
        _formatted[key] = text
    return text


def parse_last_event_id(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if value.isdigit() and len(value) <= 19 else None


def open_feed(hub: Hub, last_event_id: int | None):
    """A feed for a new stream and what to write first, following the module doc's rules.

    Returns ``(feed, head, synced, last)``: *head* is the text to write before
    the feed's events; *synced* tells whether the client has a snapshot and
    every event up to version *last*.
    """
    def replay(since: int) -> int:  # room for what the hub replays, and the usual slack
        return BUFFER + min(HISTORY, max(0, hub.version - since))

    head = ["retry: 1000\n"]
    if last_event_id is not None:
        feed = hub.subscribe(since=last_event_id, buffer=replay(last_event_id))
        if not feed.dropped:
            return feed, "".join(head) + "\n", True, last_event_id  # exactly what it missed
        head.append(f": dropped {feed.dropped}\n")  # a counted gap: start again from a snapshot
        feed.close()
    snapshot = hub.latest("members")
    if snapshot is not None and (last_event_id is None or snapshot.version > last_event_id):
        feed = hub.subscribe(since=snapshot.version, buffer=replay(snapshot.version))
        return feed, "".join(head) + "\n" + format_event(snapshot), True, snapshot.version
    head.append(": waiting for a snapshot\n\n")
    return hub.subscribe(), "".join(head), False, 0


def sse_lines(feed, head: str, synced: bool, last: int, renderer=None):
    """Yield SSE text for one feed, following the rules in the module doc (those of
    stream_ids.py when a *renderer* of its is given)."""
    yield head
    dropped_seen = 0
    last_write = time.monotonic()
    while not _draining.is_set():
        try:
            event = feed.get(timeout=min(KEEPALIVE, 1.0))
        except TimeoutError:
            if time.monotonic() - last_write >= KEEPALIVE:
                last_write = time.monotonic()
                yield ": keepalive\n\n"
            continue
        except StreamClosed:  # bus closed, master gone, or drain()
            return
        # A stream that fell behind writes what else is ready in the same write: it
        # catches up in a few writes, not one per event.
        batch = [event]
        while len(batch) < BATCH and time.time() - event.timestamp > LAGGING:
            try:
                batch.append(feed.get_nowait())
            except (TimeoutError, StreamClosed):
                break
        out = []
        for event in batch:
            if renderer is not None:
                renderer.render(event, out)
                continue
            dropped = feed.dropped
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
    """The response iterable: owns the feed and closes it on close().

    gunicorn calls close() when the response ends, when the client went away
    (the next write failed) and when the worker stops; a bare generator that
    never started would not run its ``finally``.
    """

    def __init__(self, feed, head: str, synced: bool, last: int, renderer=None) -> None:
        self.feed = feed
        self._gen = sse_lines(feed, head, synced, last, renderer)

    def __iter__(self):
        return self._gen

    def close(self) -> None:
        self._gen.close()
        self.feed.close()


def unavailable(why: str) -> Response:
    return Response(f"{why}\n", status=503, headers={"Retry-After": "1"})


@app.get("/events")
def events():
    if _draining.is_set():
        return unavailable("worker stopping")
    hub = start_hub()
    if hub is None:
        return unavailable(f"no bus named {BUS_NAME!r} yet")
    last_event_id = request.headers.get("Last-Event-ID")
    try:
        if _snapshots is not None:  # the cross-host mode
            feed, head, synced = stream_ids.open_feed(
                hub, _snapshots, stream_ids.parse_stream_id(last_event_id), BUFFER + HISTORY)
            body = SSEBody(feed, head, synced, 0, stream_ids.Renderer(feed, synced))
        else:
            body = SSEBody(*open_feed(hub, parse_last_event_id(last_event_id)))
    except StreamClosed:  # the hub ended meanwhile (the bus closed, the worker stops)
        return unavailable("the bus is closing")
    return Response(
        body,
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                 "X-Shmcast-Worker": str(os.getpid())},
    )


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def decode_object(body: bytes) -> dict:
    """The body as a JSON object; ValueError for anything else."""
    payload = json.loads(body, parse_constant=_not_json)  # a page's JSON.parse fails on NaN
    if not isinstance(payload, dict):
        raise ValueError(f"a JSON {type(payload).__name__}, not an object")
    return payload


@app.post("/publish")
def publish():
    pub = start_publisher()
    if pub is None:
        return unavailable("worker stopping" if _draining.is_set() else
                           f"cannot publish on {BUS_NAME!r} now")
    try:
        payload = decode_object(request.get_data(cache=False))
    except ValueError as exc:
        return Response(f"the body must be a JSON object: {exc}\n", status=400)
    try:
        # The lock makes a drop seen here this request's: publish() never waits,
        # so neither does the next request.
        with _pub_lock:
            before = pub.dropped
            pub.publish("message", payload)
            dropped = pub.dropped
    except EventTooLargeError as exc:
        return Response(f"{exc}\n", status=413)
    except ShmcastError as exc:  # the bus closed or its owner died
        return unavailable(str(exc))
    except ValueError as exc:  # a lone surrogate: JSON can say it, UTF-8 cannot
        return Response(f"the body cannot be published: {exc}\n", status=400)
    if dropped > before:
        return unavailable("the bus owner is not taking events now: dropped")
    return jsonify(type="message", worker=os.getpid(), dropped=dropped), 202


@app.get("/")
def index():
    return Response(INDEX_HTML, mimetype="text/html")


@app.get("/healthz")
def healthz():
    hub = _hub
    figures = {"version": hub.version, "dropped": hub.dropped} if hub is not None else None
    return jsonify(pid=os.getpid(), bus=BUS_NAME,
                   streams=hub.subscriber_count if hub is not None else 0, hub=figures)
