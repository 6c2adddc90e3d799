"""Starlette app: one shmcast Hub per worker, one feed of it per SSE request, read with
``async for``.

``GET /events`` streams Server-Sent Events::

    id: <event.version>
    event: <event.type>
    data: <event.data, the JSON exactly as the master published it>

The worker's :class:`shmcast.Hub` is its one subscriber of the bus, made when
the ASGI lifespan starts and closed when it ends; each request reads a
:class:`shmcast.Feed` of it, a local buffer of ``SHMCAST_BUFFER`` events. A
waiting feed costs no thread: the hub's one reader thread wakes every waiting
task of a batch of events through one call into the event loop.

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
  stream writes an SSE comment ``: keepalive``.

``POST /publish`` publishes its body, a JSON object, as a ``message`` event
from this worker, through the worker's one :class:`shmcast.Publisher` (made and
closed with the hub, by the lifespan): every stream of every worker gets it,
once, in the bus's one order. It answers as the gunicorn example does (see
``../gunicorn_sse/app.py``): 202 and the event's type, the worker's pid and
its publisher's drops; 400 for a body that is not a JSON object, 413 for one
too large for the bus, 503 when the worker cannot publish now (the bus closed,
its owner gone or stopped), 405 for another method. ``publish()`` never
waits, so the handler calls it in the event loop.

``GET /`` is a page that shows the live topology and posts messages; ``GET
/healthz`` says which worker answered, with its hub's figures.

Across hosts (``SHMCAST_STREAM_IDS=1``, with ``shmcast bridge NAME --redis URL
--echo`` on every host): the streams serve only the entries of the Redis
stream, with their stream id as ``id:``, and a client resumes by it on any
host; see ``../gunicorn_sse/stream_ids.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

# The cross-host mode is the gunicorn example's, as is the page.
sys.path.append(str(Path(__file__).resolve().parent.parent / "gunicorn_sse"))
import stream_ids

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
# The page is the gunicorn example's: it only speaks to /events and /publish.
INDEX_HTML = (Path(__file__).parent.parent / "gunicorn_sse" / "index.html").read_text("utf-8")
logger = logging.getLogger("uvicorn.error")  # the worker sends it to gunicorn's error log

# Streams open in this worker process, so that drain() can end them.
_streams: set[asyncio.Task] = set()
_draining = asyncio.Event()
_hub: Hub | None = None
_snapshots: stream_ids.Snapshots | None = None  # the cross-host mode's latest("members")
_pub: Publisher | None = None
_exited = False


def start_hub() -> Hub | None:
    """This worker's hub: made when the lifespan starts, again if it ended."""
    global _hub, _snapshots  # noqa: PLW0603  (one hub per worker process)
    if _draining.is_set():
        return None
    if _hub is None or _hub.closed:
        try:
            _hub = Hub(BUS_NAME, slots=HUB_SLOTS, buffer=BUFFER, history=HISTORY)
        except (BusNotFoundError, TooManySubscribersError) as exc:
            logger.warning("shmcast: no hub yet: %s", exc)
            _hub = None
        if _hub is not None and stream_ids.ENABLED:
            _snapshots = stream_ids.Snapshots(_hub)
    return _hub


def drain() -> None:
    """End every open stream now; refuse new ones. Called (in the event loop)
    by sse_worker.DrainingUvicornWorker when the worker begins to stop."""
    _draining.set()
    if _hub is not None:
        _hub.close()  # every feed ends, so does every pump
    for task in list(_streams):
        task.cancel()  # and a response blocked writing to a slow client


def start_publisher() -> Publisher | None:
    """This worker's publisher: made when the lifespan starts, again if it ended."""
    global _pub  # noqa: PLW0603  (one publisher per worker process)
    if _exited:
        return None
    if _pub is None or _pub.closed:
        try:
            _pub = Publisher(BUS_NAME)
        except (BusNotFoundError, TooManyPublishersError) as exc:
            logger.warning("shmcast: no publisher yet: %s", exc)
            _pub = None
    return _pub


def stop_publisher() -> None:
    """Give this worker's publisher place back, for good. Called when the lifespan ends."""
    global _pub, _exited  # noqa: PLW0603
    _exited = True
    if _pub is not None:
        _pub.close()
        _pub = None


@contextlib.asynccontextmanager
async def lifespan(app):
    start_hub()
    start_publisher()
    try:
        yield
    finally:
        drain()
        stop_publisher()


# The SSE text of the last events, formatted once for all the streams of the worker.
_formatted: dict[tuple[int, float], bytes] = {}


def format_event(event) -> bytes:
    key = (event.version, event.timestamp)
    text = _formatted.get(key)
    if text is None:
        data = event.data.decode("utf-8")
        lines = "".join(f"data: {line}\n" for line in data.split("\n"))
        text = f"id: {event.version}\nevent: {event.type}\n{lines}\n".encode()
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

    head = [b"retry: 1000\n"]
    if last_event_id is not None:
        feed = hub.subscribe(since=last_event_id, buffer=replay(last_event_id))
        if not feed.dropped:
            return feed, b"".join(head) + b"\n", True, last_event_id  # exactly what it missed
        head.append(f": dropped {feed.dropped}\n".encode())  # a counted gap: from a snapshot
        feed.close()
    snapshot = hub.latest("members")
    if snapshot is not None and (last_event_id is None or snapshot.version > last_event_id):
        feed = hub.subscribe(since=snapshot.version, buffer=replay(snapshot.version))
        return feed, b"".join(head) + b"\n" + format_event(snapshot), True, snapshot.version
    head.append(b": waiting for a snapshot\n\n")
    return hub.subscribe(), b"".join(head), False, 0


class SSEResponse:
    """An ASGI response that streams one feed and closes it whatever way the stream
    ends (end of bus, client gone, drain, error)."""

    raw_headers = (
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
        (b"x-shmcast-worker", str(os.getpid()).encode()),  # which worker serves the stream
    )

    def __init__(self, feed, head: bytes, synced: bool, last: int, renderer=None) -> None:
        self.feed = feed
        self.renderer = renderer  # the cross-host mode's rules (stream_ids.Renderer)
        self.head = head
        self.synced = synced
        self.last = last
        self._lock = asyncio.Lock()
        self._last_write = time.monotonic()

    async def __call__(self, scope, receive, send) -> None:
        me = asyncio.current_task()
        _streams.add(me)
        try:
            await send(
                {"type": "http.response.start", "status": 200, "headers": list(self.raw_headers)}
            )
            self._send = send
            await self._write(self.head)
            tasks = [
                asyncio.ensure_future(self._pump()),
                asyncio.ensure_future(self._keepalive()),
                asyncio.ensure_future(self._wait_disconnect(receive)),
            ]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception) and not isinstance(result, OSError):
                    logger.error("SSE stream failed", exc_info=result)
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not _draining.is_set():
                raise
            # drain(): end the response cleanly, the worker is stopping
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            _streams.discard(me)
            self.feed.close()

    async def _write(self, body: bytes) -> None:
        async with self._lock:  # the pump and the keepalive both write
            # waits here while the client reads slowly (uvicorn flow control):
            # meanwhile this feed's buffer fills and overwrites, the hub and
            # the other streams do not wait.
            await self._send({"type": "http.response.body", "body": body, "more_body": True})
            self._last_write = time.monotonic()

    async def _pump(self) -> None:
        feed = self.feed
        synced, last = self.synced, self.last
        dropped_seen = 0
        async for first in feed:  # ends when the bus closes, the master dies or drain()
            # A stream that fell behind writes what else is ready in the same write: it
            # catches up in a few writes, not one per event.
            batch = [first]
            while len(batch) < BATCH and time.time() - first.timestamp > LAGGING:
                try:
                    batch.append(feed.get_nowait())
                except (TimeoutError, StreamClosed):
                    break
            if self.renderer is not None:  # the cross-host mode
                text: list[str] = []
                for event in batch:
                    self.renderer.render(event, text)
                if text:
                    await self._write("".join(text).encode())
                continue
            out = []
            for event in batch:
                dropped = feed.dropped
                if dropped != dropped_seen:
                    out.append(f": dropped {dropped - dropped_seen}\n\n".encode())
                    dropped_seen = dropped
                if synced and event.version != last + 1:
                    synced = False  # a hole: wait for the next snapshot
                if not synced and event.type == "members":
                    synced = True
                if synced:
                    out.append(format_event(event))
                    last = event.version
            if out:
                await self._write(b"".join(out))

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self._last_write + KEEPALIVE - time.monotonic()))
            if time.monotonic() - self._last_write >= KEEPALIVE:
                await self._write(b": keepalive\n\n")

    @staticmethod
    async def _wait_disconnect(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


def unavailable(why: str) -> PlainTextResponse:
    return PlainTextResponse(f"{why}\n", status_code=503, headers={"Retry-After": "1"})


async def events(request):
    if _draining.is_set():
        return unavailable("worker stopping")
    hub = start_hub()
    if hub is None:
        return unavailable(f"no bus named {BUS_NAME!r} yet")
    last_event_id = request.headers.get("last-event-id")
    try:
        if _snapshots is not None:  # the cross-host mode
            feed, head, synced = stream_ids.open_feed(
                hub, _snapshots, stream_ids.parse_stream_id(last_event_id), BUFFER + HISTORY)
            return SSEResponse(feed, head.encode(), synced, 0, stream_ids.Renderer(feed, synced))
        stream = open_feed(hub, parse_last_event_id(last_event_id))
    except StreamClosed:  # the hub ended meanwhile (the bus closed, the worker stops)
        return unavailable("the bus is closing")
    return SSEResponse(*stream)


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def decode_object(body: bytes) -> dict:
    """The body as a JSON object; ValueError for anything else."""
    payload = json.loads(body, parse_constant=_not_json)  # a page's JSON.parse fails on NaN
    if not isinstance(payload, dict):
        raise ValueError(f"a JSON {type(payload).__name__}, not an object")
    return payload


async def read_body(request) -> bytes | None:
    """The request body, or None if it is longer than MAX_BODY (read no further)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return None
    return bytes(body)


async def publish(request):
    pub = None if _draining.is_set() else start_publisher()
    if pub is None:
        return unavailable("worker stopping" if _draining.is_set() else
                           f"cannot publish on {BUS_NAME!r} now")
    body = await read_body(request)
    if body is None:
        return PlainTextResponse(f"the body is over {MAX_BODY} bytes\n", status_code=413)
    try:
        payload = decode_object(body)
    except ValueError as exc:
        return PlainTextResponse(f"the body must be a JSON object: {exc}\n", status_code=400)
    before = pub.dropped
    try:
        pub.publish("message", payload)
    except EventTooLargeError as exc:
        return PlainTextResponse(f"{exc}\n", status_code=413)
    except ShmcastError as exc:  # the bus closed or its owner died
        return unavailable(str(exc))
    except ValueError as exc:  # a lone surrogate: JSON can say it, UTF-8 cannot
        return PlainTextResponse(f"the body cannot be published: {exc}\n", status_code=400)
    dropped = pub.dropped
    if dropped > before:  # nothing ran in this worker between the two reads
        return unavailable("the bus owner is not taking events now: dropped")
    return JSONResponse({"type": "message", "worker": os.getpid(), "dropped": dropped},
                        status_code=202)


async def index(request):
    return HTMLResponse(INDEX_HTML)


async def healthz(request):
    hub = _hub
    figures = {"version": hub.version, "dropped": hub.dropped} if hub is not None else None
    return JSONResponse({"pid": os.getpid(), "bus": BUS_NAME, "streams": len(_streams),
                         "hub": figures})


app = Starlette(
    routes=[
        Route("/", index),
        Route("/events", events),
        Route("/healthz", healthz),
        Route("/publish", publish, methods=["POST"]),
    ],
    lifespan=lifespan,
)
app.state.drain = drain
