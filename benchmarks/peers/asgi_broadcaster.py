"""The ASGI peer: a Starlette SSE app on encode/broadcaster 0.3.1 over Redis pub/sub.

What a user of broadcaster deploys: one ``Broadcast`` per worker process (one Redis
pub/sub connection, connected in the app's lifespan), one ``subscribe()`` per SSE
request, each an unbounded ``asyncio.Queue`` that broadcaster's listener task fills.
Redis URL and channel come from ``BENCH_REDIS_URL`` and ``BENCH_CHANNEL``.

broadcaster 0.3.1 silently delivers nothing with redis-py 8 (checked with 8.0.1 and
8.1.0; 5.3 to 7.4 work): every stream stays open and empty. The ``bench`` extra in
pyproject.toml pins ``redis>=5,<6``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

CHANNEL = os.environ.get("BENCH_CHANNEL", "sse")
broadcast = Broadcast(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
_open = 0


async def events(request: Request) -> Response:
    async def stream() -> AsyncIterator[str]:
        global _open  # noqa: PLW0603 - a per-worker gauge for /healthz
        _open += 1
        try:
            async with broadcast.subscribe(channel=CHANNEL) as subscriber:
                # Subscribed: from here on this client gets every message.
                yield "retry: 1000\n\n"
                async for event in subscriber:
                    version, etype, data = event.message.split(" ", 2)
                    yield f"id: {version}\nevent: {etype}\ndata: {data}\n\n"
        finally:
            _open -= 1

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def healthz(request: Request) -> Response:
    return JSONResponse({"pid": os.getpid(), "streams": _open})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await broadcast.connect()
    try:
        yield
    finally:
        await broadcast.disconnect()


app = Starlette(routes=[Route("/events", events), Route("/healthz", healthz)], lifespan=lifespan)
