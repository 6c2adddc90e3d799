"""gunicorn configuration for the ASGI example: the master side is the gunicorn example's.

Run from this directory:

    SHMCAST_BUS=sse-demo gunicorn -c gunicorn.conf.py

The master's hooks (``when_ready`` creates the bus and starts the thread that
publishes ``members`` and ``heartbeat`` events; ``on_exit`` closes the bus) and
every ``SHMCAST_*`` setting are those of ``../gunicorn_sse/gunicorn.conf.py``,
executed here. Only the workers differ: ``sse_worker.DrainingUvicornWorker``
(uvicorn workers from the ``uvicorn-worker`` package) that tell the app when
they start to shut down (SIGTERM, SIGHUP reload, ``max_requests``
recycling), so open SSE streams end at once instead of holding the worker for
``graceful_timeout``. Each worker's :class:`shmcast.Hub` and
:class:`shmcast.Publisher` are made by the app's ASGI lifespan, and closed
when it ends, not by gunicorn hooks.
"""

from __future__ import annotations

import pathlib

_MASTER_SIDE = pathlib.Path(__file__).resolve().parent.parent / "gunicorn_sse" / "gunicorn.conf.py"
exec(compile(_MASTER_SIDE.read_text(), str(_MASTER_SIDE), "exec"))

wsgi_app = "app:app"  # an ASGI app: the worker class serves it
worker_class = "sse_worker.DrainingUvicornWorker"
# The gthread-only settings and hooks of the WSGI example do not apply here.
del threads, post_worker_init, worker_int, worker_exit  # noqa: F821
