"""gunicorn configuration of the Flask-SSE peer (``wsgi_flask_sse:app``).

The harness passes ``-b``, ``-w``, ``--threads``, ``--worker-connections`` and
``--backlog`` on the command line (threads sized to the clients: each open stream
holds one), as it does for the shmcast WSGI example.
"""

wsgi_app = "wsgi_flask_sse:app"
worker_class = "gthread"
workers = 2
threads = 16
timeout = 120  # the worker heartbeat: a loaded 2-core box must not get workers killed
graceful_timeout = 5
keepalive = 5
