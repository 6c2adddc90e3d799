"""The WSGI peer: the Flask-SSE shape, one Redis pub/sub connection per SSE client.

Flask-SSE (``flask_sse.ServerSentEventsBlueprint.messages``) opens ``redis.pubsub()``
per request, subscribes, and yields every message of ``pubsub.listen()``, decoding
its JSON envelope and formatting it with ``Message.__str__`` (``event:``, ``data:``,
``id:`` lines, no space after the colon). This app does exactly that, without the
blueprint (so that it needs no extra package), plus one line the package does not
send: a ``retry:`` line once subscribed, so that the response headers go out at
once (gunicorn sends them with the first body bytes) and a client knows it is
subscribed. Served by gunicorn gthread workers: each open stream holds a thread
and a Redis connection. Redis URL and channel come from ``BENCH_REDIS_URL`` and
``BENCH_CHANNEL``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import redis
from flask import Flask, Response, jsonify

CHANNEL = os.environ.get("BENCH_CHANNEL", "sse")
client = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
app = Flask(__name__)
_lock = threading.Lock()
_open = 0


def message(data: Any, type: str | None = None, id: Any = None) -> str:
    """``flask_sse.Message.__str__``."""
    text = data if isinstance(data, str) else json.dumps(data)
    lines = [f"data:{line}" for line in text.splitlines()]
    if type:
        lines.insert(0, f"event:{type}")
    if id:
        lines.append(f"id:{id}")
    return "\n".join(lines) + "\n\n"


def stream() -> Iterator[str]:
    global _open  # noqa: PLW0603 - a per-worker gauge for /healthz
    pubsub = client.pubsub()
    pubsub.subscribe(CHANNEL)
    with _lock:
        _open += 1
    try:
        yield "retry: 1000\n\n"
        for item in pubsub.listen():
            if item["type"] == "message":
                yield message(**json.loads(item["data"]))
    finally:
        with _lock:
            _open -= 1
        pubsub.close()


@app.get("/events")
def events() -> Response:
    return Response(
        stream(),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@app.get("/healthz")
def healthz() -> Response:
    return jsonify(pid=os.getpid(), streams=_open)
