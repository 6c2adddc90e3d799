"""A uvicorn worker for gunicorn that tells the app when it starts to stop.

uvicorn waits for open responses to finish before it shuts a worker down, and
an SSE response never finishes by itself: without help every SIGTERM, SIGHUP
reload and ``max_requests`` recycling would hold the worker until gunicorn's
``graceful_timeout`` runs out and the master SIGKILLs it. This worker calls
``app.state.drain()`` (if the app has one) the moment uvicorn begins its
shutdown, so the app can end its streams; as a backstop it lets uvicorn
cancel whatever is still running shortly before gunicorn would kill it. It
also makes SIGQUIT (what the master sends its workers on Ctrl-C) stop uvicorn.
"""

from __future__ import annotations

import sys

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker


class DrainingServer(Server):
    def __init__(self, config, on_shutdown) -> None:
        super().__init__(config=config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets=None) -> None:
        self._on_shutdown()
        await super().shutdown(sockets=sockets)


class DrainingUvicornWorker(UvicornWorker):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config.timeout_graceful_shutdown = max(1.0, self.cfg.graceful_timeout * 0.8)

    def handle_exit(self, sig, frame) -> None:
        # SIGQUIT: gunicorn's quick shutdown (Ctrl-C on the master). The base
        # class only clears self.alive, which uvicorn never looks at.
        super().handle_exit(sig, frame)
        server = getattr(self, "_server", None)
        if server is not None:
            server.should_exit = True

    def _drain_app(self) -> None:
        drain = getattr(getattr(self.wsgi, "state", None), "drain", None)
        if callable(drain):
            drain()

    async def _serve(self) -> None:  # as UvicornWorker._serve, with DrainingServer
        self.config.app = self.wsgi
        server = DrainingServer(config=self.config, on_shutdown=self._drain_app)
        self._server = server
        install_sigquit = getattr(self, "_install_sigquit_handler", None)
        if install_sigquit is not None:
            install_sigquit()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
