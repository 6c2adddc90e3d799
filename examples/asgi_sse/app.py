"""Starlette app: one shmcast subscription per SSE request, read with ``async for``.

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
  stream writes an SSE comment ``: keepalive``.
* ``Last-Event-ID`` is ignored: a reconnecting EventSource gets a fresh
  snapshot.

``GET /`` is a page that shows the live topology; ``GET /healthz`` says which
worker answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

from shmcast import BusNotFoundError, TooManySubscribersError, subscribe

BUS_NAME = os.environ.get("SHMCAST_BUS", "sse-demo")
KEEPALIVE = float(os.environ.get("SHMCAST_KEEPALIVE", "15"))
# The page is the gunicorn example's: it only speaks to /events.
INDEX_HTML = (Path(__file__).parent.parent / "gunicorn_sse" / "index.html").read_text("utf-8")
logger = logging.getLogger("uvicorn.error")  # the worker sends it to gunicorn's error log

# Streams open in this worker process, so that drain() can end them.
_streams: set[asyncio.Task] = set()
_draining = asyncio.Event()


def drain() -> None:
    """End every open stream now; refuse new ones. Called (in the event loop)
    by sse_worker.DrainingUvicornWorker when the worker begins to stop."""
    _draining.set()
    for task in list(_streams):
        task.cancel()


def format_event(event) -> bytes:
    data = event.data.decode("utf-8")
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"id: {event.version}\nevent: {event.type}\n{lines}\n".encode()


class SSEResponse:
    """An ASGI response that streams one subscription and unsubscribes
    whatever way the stream ends (end of bus, client gone, drain, error)."""

    raw_headers = (
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
    )

    def __init__(self, sub) -> None:
        self.sub = sub
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
            await self._write(b"retry: 1000\n: waiting for a snapshot\n\n")
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
            self.sub.unsubscribe()

    async def _write(self, body: bytes) -> None:
        async with self._lock:  # the pump and the keepalive both write
            # waits here while the client reads slowly (uvicorn flow control):
            # meanwhile this subscription's ring fills and overwrites, the
            # publisher and the other streams do not wait.
            await self._send({"type": "http.response.body", "body": body, "more_body": True})
            self._last_write = time.monotonic()

    async def _pump(self) -> None:
        sub = self.sub
        synced = False  # the client has a snapshot and every event since
        last = 0
        dropped_seen = 0
        async for event in sub:  # ends when the bus closes or the master dies
            out = []
            dropped = sub.dropped
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


async def events(request):
    if _draining.is_set():
        return PlainTextResponse("worker stopping\n", status_code=503, headers={"Retry-After": "1"})
    try:
        sub = subscribe(BUS_NAME)
    except (BusNotFoundError, TooManySubscribersError) as exc:
        return PlainTextResponse(f"{exc}\n", status_code=503, headers={"Retry-After": "1"})
    return SSEResponse(sub)


async def index(request):
    return HTMLResponse(INDEX_HTML)


async def healthz(request):
    return JSONResponse({"pid": os.getpid(), "bus": BUS_NAME, "streams": len(_streams)})


app = Starlette(
    routes=[
        Route("/", index),
        Route("/events", events),
        Route("/healthz", healthz),
    ]
)
app.state.drain = drain
