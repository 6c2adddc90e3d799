"""gunicorn configuration: the master process owns the shmcast bus.

Run from this directory:

    SHMCAST_BUS=sse-demo gunicorn -c gunicorn.conf.py

* ``when_ready`` (master, once the listeners are bound, before the first
  worker is forked) creates the bus, with room for the workers' publishers,
  and starts a background thread that publishes ``members`` (the topology
  snapshot) and ``heartbeat`` events. The bus's own drain thread publishes
  what the workers hand it (``POST /publish``), in the same order for all.
* ``on_exit`` (master, after every worker has stopped) stops the thread and
  closes the bus, which removes everything it created in /dev/shm.
* ``post_worker_init`` (each worker, after it loaded the app) makes the
  worker's one :class:`shmcast.Hub`, its only subscriber of the bus, which
  every SSE request reads a feed of, and its one :class:`shmcast.Publisher`,
  which ``POST /publish`` publishes with; and tells the app when the worker
  starts to shut down (SIGTERM, SIGHUP reload, ``max_requests`` recycling) so
  that open SSE streams end at once instead of holding the worker for
  ``graceful_timeout``.
* ``worker_exit`` (each worker, as it exits) closes its publisher: its place
  on the bus frees at once (within a second of a worker's death anyway).

Everything the hooks share lives on the arbiter object (``server``), not in
this module: a SIGHUP reload executes this file again as a new module, and the
new ``on_exit`` must still find the bus created by the first ``when_ready``.

Settings read from the environment (gunicorn's own settings, ``-b``, ``-w``,
``--threads``, ``--max-requests``... can be given on the command line as usual):

    SHMCAST_BUS              bus name (letters, digits, _ and -)   sse-demo
    SHMCAST_HEARTBEAT        seconds between heartbeat events      1.0
    SHMCAST_CHURN            seconds between simulated node changes 2.0 (0: off)
    SHMCAST_KEYFRAME         republish the snapshot at least every 5.0 seconds
    SHMCAST_PAD              bytes of padding added to each snapshot 0
    SHMCAST_MAX_SUBSCRIBERS  places on the bus: one per worker's hub
                             (and any ``shmcast tail``)            64
    SHMCAST_MAX_PUBLISHERS   publisher places: one per worker, twice
                             over for a reload's overlap     2 x workers (4 at least)
    SHMCAST_KEEPALIVE        idle seconds before a worker writes an SSE comment
                             (read by the app, as the next three)  15
    SHMCAST_BUFFER           events one stream may fall behind     64
    SHMCAST_HISTORY          events each worker keeps for
                             ``Last-Event-ID``                     1024
    SHMCAST_HUB_SLOTS        the ring of each worker's hub         128
    SHMCAST_STREAM_IDS       1: the cross-host mode (app.py, stream_ids.py);
                             one more publisher place, for the
                             ``shmcast bridge NAME --redis URL --echo``
                             to run next to the master              off
"""

from __future__ import annotations

import os
import random
import threading
import time

from shmcast import Bus

# --- gunicorn settings --------------------------------------------------------
wsgi_app = "app:app"
bind = ["127.0.0.1:8000"]
worker_class = "gthread"
workers = 2
threads = 16  # each open SSE stream holds one thread (its feed costs none)
timeout = 30
graceful_timeout = 10
keepalive = 5

# --- shmcast settings -----------------------------------------------------------
BUS_NAME = os.environ.get("SHMCAST_BUS", "sse-demo")
HEARTBEAT = float(os.environ.get("SHMCAST_HEARTBEAT", "1.0"))
CHURN = float(os.environ.get("SHMCAST_CHURN", "2.0"))
KEYFRAME = float(os.environ.get("SHMCAST_KEYFRAME", "5.0"))
PAD = int(os.environ.get("SHMCAST_PAD", "0"))
MAX_SUBSCRIBERS = int(os.environ.get("SHMCAST_MAX_SUBSCRIBERS", "64"))
MAX_PUBLISHERS = int(os.environ.get("SHMCAST_MAX_PUBLISHERS", "0"))  # 0: from the workers
# Across hosts, a bridge publishes the Redis stream's entries into the bus: one place more.
BRIDGE_PLACES = 1 if os.environ.get("SHMCAST_STREAM_IDS", "").strip().lower() in (
    "1", "true", "yes") else 0
# A repair (republishing the snapshot because a worker's hub joined or lost
# events) happens at most this often.
REPAIR_MIN_INTERVAL = 0.2
POLL = 0.05


class TopologyPublisher:
    """Publishes the topology from a thread of the gunicorn master.

    ``members`` payloads are always the *complete* snapshot, never a delta, so
    any one members event brings a subscriber up to date. Each worker's hub
    keeps the last one it received for its new streams (``hub.latest``), so
    a new SSE client costs the master nothing. The master republishes it:

    * when the topology changes (a worker forked or died, a simulated node
      changed state);
    * when ``bus.subscriber_count`` grew: the subscribers are the workers'
      hubs, so this is a worker that just started, whose hub has no snapshot
      yet (the one published when it forked came before its hub existed);
    * when ``bus.dropped`` grew: a hub's ring lost events, perhaps a
      ``members`` one;
    * at least every KEYFRAME seconds, as a backstop.
    """

    def __init__(self, server, bus: Bus) -> None:
        self.server = server
        self.bus = bus
        self.generation = 0
        self._rng = random.Random(os.getpid())
        self._nodes = {f"node-{c}": "up" for c in "abcde"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shmcast-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # -- topology -------------------------------------------------------------
    def _workers(self) -> list[dict]:
        for _ in range(10):
            try:
                items = list(self.server.WORKERS.items())  # mutated by the arbiter's thread
                break
            except RuntimeError:  # dict changed size during iteration
                time.sleep(0.001)
        else:
            items = []
        return [{"pid": pid, "age": w.age} for pid, w in sorted(items)]

    def _churn(self) -> None:
        name = self._rng.choice(sorted(self._nodes))
        choices = [s for s in ("up", "degraded", "down") if s != self._nodes[name]]
        self._nodes[name] = self._rng.choice(choices)

    def _topology(self) -> dict:
        return {"master": os.getpid(), "workers": self._workers(), "nodes": dict(self._nodes)}

    # -- loop -----------------------------------------------------------------
    def _publish_members(self, topology: dict, reason: str) -> None:
        payload = {"generation": self.generation, "reason": reason, **topology}
        if PAD:
            payload["pad"] = "x" * PAD
        self.bus.publish("members", payload)

    def _run(self) -> None:
        now = time.monotonic()
        next_heartbeat = now
        next_churn = now + CHURN if CHURN > 0 else float("inf")
        last_members = float("-inf")
        last_topology: dict | None = None
        seen_subscribers = 0
        seen_dropped = 0
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_churn:
                    self._churn()
                    next_churn = now + CHURN
                topology = self._topology()
                subscribers = self.bus.subscriber_count
                dropped = self.bus.dropped
                reason = None
                if topology != last_topology:
                    self.generation += 1
                    reason = "change"
                elif now - last_members >= REPAIR_MIN_INTERVAL and (
                    subscribers > seen_subscribers or dropped > seen_dropped
                ):
                    reason = "repair"
                elif now - last_members >= KEYFRAME:
                    reason = "keyframe"
                if reason is not None:
                    self._publish_members(topology, reason)
                    last_topology, last_members = topology, now
                    seen_dropped = dropped
                # Follow decreases at once (a stream closed), increases only
                # once a snapshot went out for them.
                if reason is not None or subscribers < seen_subscribers:
                    seen_subscribers = subscribers
                if now >= next_heartbeat:
                    self.bus.publish(
                        "heartbeat",
                        {
                            "ts": time.time(),
                            "master": os.getpid(),
                            "subscribers": subscribers,
                            "dropped": dropped,
                        },
                    )
                    next_heartbeat = max(next_heartbeat + HEARTBEAT, now)
            except Exception:  # keep publishing whatever happens
                self.server.log.exception("shmcast publisher error")
                self._stop.wait(1.0)
            wait = min(POLL, next_heartbeat - time.monotonic())
            self._stop.wait(max(wait, 0.0))


# --- hooks -------------------------------------------------------------------
def when_ready(server):
    if getattr(server, "shmcast_publisher", None) is not None:
        return  # already running (when_ready runs once, but be safe)
    bus = Bus(
        BUS_NAME,
        slots=64,  # the default ring; each worker's hub asks for SHMCAST_HUB_SLOTS
        slot_size=max(16384, PAD + 8192),  # the largest event
        max_subscribers=MAX_SUBSCRIBERS,  # hubs (one per worker) and tools
        # One Publisher per worker; during a SIGHUP reload or max_requests
        # recycling the old workers' places are still held as the new ones boot.
        max_publishers=MAX_PUBLISHERS or min(64, max(4, 2 * server.cfg.workers)) + BRIDGE_PLACES,
    )
    publisher = TopologyPublisher(server, bus)
    server.shmcast_bus = bus
    server.shmcast_publisher = publisher
    publisher.start()
    server.log.info("shmcast bus %r ready", BUS_NAME)


def on_exit(server):
    publisher = getattr(server, "shmcast_publisher", None)
    if publisher is not None:
        publisher.stop()
        server.shmcast_publisher = None
    bus = getattr(server, "shmcast_bus", None)
    if bus is not None:
        bus.close()
        server.shmcast_bus = None
        server.log.info("shmcast bus %r closed", BUS_NAME)


def post_worker_init(worker):
    import app as app_module  # the module wsgi_app names, already imported

    app_module.start_hub()  # the worker's one subscriber; /events retries if it failed
    app_module.start_publisher()  # and its one publisher; POST /publish retries likewise

    def watch() -> None:
        # worker.alive turns False on SIGTERM, SIGHUP reload (the master
        # SIGTERMs old workers), max_requests and a vanished master.
        while worker.alive:
            time.sleep(0.1)
        app_module.drain()

    threading.Thread(target=watch, name="shmcast-drain-watch", daemon=True).start()


def worker_int(worker):  # SIGINT / SIGQUIT: quick exit
    import app as app_module

    app_module.drain()


def worker_exit(server, worker):  # in the worker, once it stopped serving
    import app as app_module

    app_module.stop_publisher()
