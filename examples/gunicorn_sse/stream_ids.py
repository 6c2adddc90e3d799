"""The cross-host mode of the SSE examples (``SHMCAST_STREAM_IDS=1``), shared by
``app.py`` here and ``../asgi_sse/app.py``.

Each host runs ``shmcast bridge NAME --redis URL --echo`` next to its gunicorn
master, so that every host's bus holds the whole Redis stream, in one order,
each entry with its stream id (docs/howto-bridge.md, section 5). A stream then
serves only those entries::

    id: <stream id, e.g. 1733094000123-0>
    event: <the type the event was published with, on whichever host>
    data: <its data>

Events published directly on this host's bus are skipped: they come back through
the echo, with their id. A ``Last-Event-ID`` that is a stream id resumes with
``hub.subscribe(since=<stream id>)``, on any worker of any host: the client gets
exactly the entries after it, or ``: dropped K`` and a fresh snapshot (the last
``members`` entry, of whichever host). Entries the bridge could not bring (a
``shmcast.gap`` event) and a feed's own losses are written ``: dropped K``, and
the stream then waits for the next ``members`` entry, as in the default mode.
"""

from __future__ import annotations

import os
import re
import threading

from shmcast import Event, Hub, StreamClosed
from shmcast.bridge import GAP_TYPE, remote

ENABLED = os.environ.get("SHMCAST_STREAM_IDS", "").strip().lower() in ("1", "true", "yes")
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


def parse_stream_id(value: str | None) -> str | None:
    """The Last-Event-ID if it is a stream id ``<ms>-<seq>``; anything else is None
    (a new client, or one that comes from a server in the default mode)."""
    value = (value or "").strip()
    return value if _STREAM_ID.fullmatch(value) else None


def _key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq)


class Snapshots:
    """The last ``members`` entry of the stream that the hub received.

    ``hub.latest()`` is by exact type, and a bridged type carries its stream id,
    so one thread per worker follows a feed of the hub instead. It may be an
    entry or two behind: a new client then gets an older snapshot and everything
    after it, which is as good.
    """

    def __init__(self, hub: Hub) -> None:
        self.latest: Event | None = None
        self._feed = hub.subscribe()
        threading.Thread(target=self._run, name="shmcast-snapshots", daemon=True).start()

    def _run(self) -> None:
        feed = self._feed
        while True:
            try:
                event = feed.get(timeout=1.0)
            except TimeoutError:
                continue
            except StreamClosed:  # the hub ended
                return
            r = remote(event)
            if r is not None and r.type == "members":
                self.latest = event


_formatted: dict[tuple[int, float], str] = {}


def format_entry(event: Event) -> str | None:
    """The SSE text of a stream entry (formatted once per worker), None for another event."""
    key = (event.version, event.timestamp)
    text = _formatted.get(key)
    if text is None:
        r = remote(event)
        if r is None:
            return None
        lines = "".join(f"data: {line}\n" for line in event.data.decode("utf-8").split("\n"))
        text = f"id: {r.stream_id}\nevent: {r.type}\n{lines}\n"
        if len(_formatted) >= 256:
            _formatted.clear()
        _formatted[key] = text
    return text


def open_feed(hub: Hub, snapshots: Snapshots, last_event_id: str | None, buffer: int):
    """A feed for a new stream: ``(feed, head, synced)`` as in the apps' ``open_feed``.

    *buffer*: the feed's room, the replay included (a stream id does not say how
    many events came after it on this bus).
    """
    head = ["retry: 1000\n"]
    if last_event_id is not None:
        feed = hub.subscribe(since=last_event_id, buffer=buffer)
        if not feed.dropped:
            return feed, "".join(head) + "\n", True  # exactly what it missed
        head.append(f": dropped {feed.dropped}\n")  # a counted gap: start again from a snapshot
        feed.close()
    snapshot = snapshots.latest
    if snapshot is not None:
        sid = remote(snapshot).stream_id  # type: ignore[union-attr]
        if last_event_id is None or _key(sid) > _key(last_event_id):
            feed = hub.subscribe(since=sid, buffer=buffer)
            if not feed.dropped:
                return feed, "".join(head) + "\n" + format_entry(snapshot), True
            feed.close()  # it left the history meanwhile: the next one will do
    head.append(": waiting for a snapshot\n\n")
    return hub.subscribe(), "".join(head), False


class Renderer:
    """One stream's rules after its head: what to write for each event of its feed."""

    def __init__(self, feed, synced: bool) -> None:
        self.feed = feed
        self.synced = synced
        self.dropped_seen = 0

    def render(self, event: Event, out: list[str]) -> None:
        dropped = self.feed.dropped
        if dropped != self.dropped_seen:  # the feed lost events: perhaps entries
            out.append(f": dropped {dropped - self.dropped_seen}\n\n")
            self.dropped_seen = dropped
            self.synced = False
        if event.type == GAP_TYPE:  # entries this host's bridge never got
            out.append(f": dropped {event.payload.get('count', 1)}\n\n")
            self.synced = False
            return
        r = remote(event)
        if r is None:
            return  # published on this host: it comes back echoed, with its id
        if not self.synced and r.type == "members":
            self.synced = True
        if self.synced:
            out.append(format_entry(event))  # type: ignore[arg-type]
