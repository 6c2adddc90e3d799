"""The peers of ``python -m benchmarks sse``: what a user would deploy instead of shmcast.

* ``asgi_broadcaster``: a Starlette SSE app on encode/broadcaster 0.3.1 over Redis
  pub/sub (one Redis pub/sub connection per worker, fanned out in the worker to one
  asyncio queue per client), served by gunicorn with uvicorn workers
  (``gunicorn_broadcaster.conf.py``).
* ``wsgi_flask_sse``: the Flask-SSE shape, one Redis pub/sub connection per client,
  served by gunicorn's gthread workers (``gunicorn_flask_sse.conf.py``).
* ``publisher``: the process that publishes the same heartbeat events, at the same
  rate, that the shmcast examples' gunicorn master publishes on its bus.

Both apps stream ``GET /events`` and answer ``GET /healthz`` like the examples do.
"""
