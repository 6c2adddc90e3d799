"""gunicorn configuration of the broadcaster peer (``asgi_broadcaster:app``).

The harness passes ``-b``, ``-w``, ``--backlog`` and ``--worker-connections`` on the
command line, as it does for the shmcast examples.
"""

wsgi_app = "asgi_broadcaster:app"
worker_class = "uvicorn_worker.UvicornWorker"
workers = 2
timeout = 120  # the worker heartbeat: a loaded 2-core box must not get workers killed
# uvicorn waits for open responses before it stops a worker, and an SSE stream never
# ends by itself: the harness closes its clients first, this bounds the rest.
graceful_timeout = 5
keepalive = 5
