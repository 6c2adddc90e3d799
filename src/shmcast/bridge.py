"""Bridge a bus across hosts through one Redis Stream, one Redis connection per host.

Each host runs one :class:`Bridge` (a thread, or ``shmcast bridge NAME --redis
URL``) next to its bus. *Out*, it subscribes to the local bus and appends every
event there (the owner's and every :class:`~shmcast.Publisher`'s) to the
stream with ``XADD KEY MAXLEN ~ N * ...``; *in*, it reads the stream with
``XREAD BLOCK`` from the last id it delivered and publishes each other host's
entry into the local bus through a ``Publisher``. Every subscriber, ``Hub`` and
SSE client of every host then reads the events of all hosts from shared
memory; the network carries one stream per host. See docs/howto-bridge.md.

Wire format, one stream entry per event::

    XADD KEY MAXLEN ~ N * type T data D origin HOST version V ts TS epoch E seq S

``data`` is the event's encoded payload as published (``event.data``),
``version`` its version on the origin's bus. ``epoch``/``seq`` number the
origin's events: ``seq`` grows by one per local event of the origin, lost or
sent, within one ``epoch`` (a random number picked with the bridge's state).

Local events from other hosts carry the stream id and the origin in their
type: ``shmcast.in:<stream id>:<origin>:<type>`` (:func:`remote` takes it
apart), and their payload bytes unchanged. With ``echo``, this host's own
entries come back the same way, so that every host's bus holds the whole
stream in its order: :meth:`shmcast.Hub.subscribe` resumes by those ids
(``since="<ms>-<seq>"``) on any host. Types beginning with ``shmcast.``
are reserved for the bridge: they are never sent out. That is the loop
prevention, and it is exact: an event the bridge published locally carries
that prefix, one published by anyone else does not (unless they use the
reserved prefix, which they must not).

Accounting: every entry is delivered once or counted. A receiver keeps, per
origin, the last ``(epoch, seq)`` it delivered: an entry at or below it is a
duplicate (a retried ``XADD``) and is skipped; a jump is a gap (entries trimmed
by ``MAXLEN`` before they were read, lost with a Redis restart, or lost at the
origin, which marks them by advancing its ``seq``). The gaps found in one
``XREAD`` batch become ONE local event of type ``shmcast.gap`` (payload
``{"count", "origins", "after", "before", "reason"}``), published before the
batch's events, and are summed in :attr:`Bridge.stats`. Whether entries were
trimmed is also seen by comparing the last id with ``XINFO STREAM``'s first
entry; the count comes from the per-origin numbering, which is exact and
needs no counting of the stream's history.

The bridge's position survives SIGKILL: a small state file (mapped memory,
two copies written alternately, each valid only once completely written)
holds the last id delivered, the per-origin numbering, the out numbering, and
an *intent* written before each local publish. A bridge restarted after a
kill inside a publish reads the inbox the dead one wrote to, to tell whether
that event was handed over, so it is neither lost nor published twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import mmap
import os
import pickle
import random
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._errors import ShmcastError, StreamClosed
from ._event import Event
from ._hub import IN_PREFIX as _HUB_IN_PREFIX

RESERVED_PREFIX = "shmcast."
IN_PREFIX = _HUB_IN_PREFIX  # the Hub resumes by the stream id these carry
GAP_TYPE = "shmcast.gap"

_HOST_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_ID_RE = re.compile(rb"(\d+)-(\d+)")
MAX_ORIGINS = 64
_INBOX_PATIENCE = 5.0  # s: how long an entry waits for room in a full inbox before it is a gap
_POLL_MIN = 0.0005
_COUNT = 500  # entries per XREAD
_UNSEEN_LIMIT = 2.0  # s: an own event not seen back by then, while versions are missing, was lost

DIRECTIONS = ("in", "out", "both")


# --------------------------------------------------------------------------- helpers


@dataclasses.dataclass(frozen=True)
class Remote:
    """What the type of an event from another host says: see :func:`remote`."""

    stream_id: str  #: the entry's id in the Redis stream (resume from it)
    origin: str  #: the host id of the bridge that sent it
    type: str  #: the type it was published with on its origin


def remote(event: Event | str) -> Remote | None:
    """Take apart the type of an event a bridge brought from another host; None for a local one.

    >>> remote("shmcast.in:1700000000000-0:h1:members")
    Remote(stream_id='1700000000000-0', origin='h1', type='members')
    """
    type_ = event if isinstance(event, str) else event.type
    if not type_.startswith(IN_PREFIX):
        return None
    parts = type_[len(IN_PREFIX):].split(":", 2)
    if len(parts) != 3:
        return None
    return Remote(parts[0], parts[1], parts[2])


def default_state_dir() -> Path:
    """Where bridges keep their state and status files: ``$SHMCAST_RUN_DIR``, else
    ``$XDG_RUNTIME_DIR/shmcast``, else ``/tmp/shmcast-<uid>``."""
    env = os.environ.get("SHMCAST_RUN_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "shmcast"
    return Path(f"/tmp/shmcast-{os.geteuid()}")


def _slug(key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", key)[:40]
    return f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"  # noqa: S324 (a file name)


def _parse_id(raw: bytes) -> tuple[int, int]:
    m = _ID_RE.fullmatch(raw)
    if m is None:
        raise ShmcastError(f"not a stream id: {raw!r}")
    return int(m.group(1)), int(m.group(2))


def _fmt_id(ident: tuple[int, int]) -> str:
    return f"{ident[0]}-{ident[1]}"


class _Bytes:
    """A codec that hands bytes through: the bridge forwards payloads exactly as encoded."""

    def __init__(self, name: str) -> None:
        self.name = name

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return bytes(obj)

    @staticmethod
    def loads(data: bytes) -> Any:
        return data


# --------------------------------------------------------------------------- state file

_MAGIC = b"SHMCBRG1"
_GAP_B = GAP_TYPE.encode()
_GAP_MAX = 2048  # bytes of a gap event's payload kept in the state until it is published
_HEAD = struct.Struct(f"<QQ QQqQ 32sQQ H256s QQQ QQ QI H{_GAP_MAX}s")
_ORIGIN = struct.Struct("<32sQQ")
_COPY = 8192
_COPY_OFF = (64, 64 + _COPY)
_STATE_SIZE = 64 + 2 * _COPY
assert _HEAD.size + MAX_ORIGINS * _ORIGIN.size + 8 <= _COPY


class _Stopping(Exception):
    """Asked to stop while waiting for room in the local bus: end without advancing."""


class _State:
    """The bridge's position, kept in a mapped file so that it survives SIGKILL.

    Two copies, written alternately: a copy's generation (its first 8 bytes) is
    zeroed, its body copied, then its generation stored (one aligned store). A
    process killed in between leaves that copy invalid and the other one
    whole; the reader takes the valid copy of the highest generation.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ShmcastError(f"another bridge already runs with the state file {path}") from None
        self.fd = fd
        fresh = os.fstat(fd).st_size < _STATE_SIZE
        if fresh:
            os.ftruncate(fd, _STATE_SIZE)
        self.mm = mmap.mmap(fd, _STATE_SIZE)
        self.buf = memoryview(self.mm)
        self.q = self.buf.cast("Q")
        # The fields (see _HEAD).
        self.last_in = (0, 0)
        self.intent = (0, 0)
        self.intent_place = -1
        self.intent_w = 0
        self.intent_origin = ""
        self.intent_epoch = 0
        self.intent_seq = 0
        self.intent_type = b""
        self.nonce = 0  # of the local bus the versions below are about
        self.last_version = 0  # L: the last local version the out side has processed
        self.unseen = 0  # k: own events handed to the bus, not yet seen back
        self.missing = 0  # m: local versions missed, not yet attributed
        self.out_epoch = 0
        self.out_seq = 0
        self.gap_pending = b""  # a gap event written ahead, until it is published
        self.gen = 0
        self.origins: dict[str, tuple[int, int]] = {}
        self.loaded = False
        if not fresh and bytes(self.buf[:8]) == _MAGIC:
            self._load()
        if not self.loaded:
            self.buf[:8] = _MAGIC
            self.out_epoch = random.getrandbits(63) or 1
        self.table = bytearray(MAX_ORIGINS * _ORIGIN.size)
        self.slot_of: dict[str, int] = {}
        for i, (origin, (epoch, seq)) in enumerate(list(self.origins.items())[:MAX_ORIGINS]):
            self.slot_of[origin] = i
            _ORIGIN.pack_into(self.table, i * _ORIGIN.size, origin.encode(), epoch, seq)

    def _load(self) -> None:
        best: tuple[int, int] | None = None
        for off in _COPY_OFF:
            gen = self.q[off // 8]
            if gen and (best is None or gen > best[0]):
                best = (gen, off)
        if best is None:
            return
        gen, off = best
        f = _HEAD.unpack_from(self.buf, off + 8)
        (lm, ls, im, is_, self.intent_place, self.intent_w, origin, self.intent_epoch,
         self.intent_seq, tlen, ttype, self.nonce, self.last_version, self.unseen,
         self.missing, self.out_epoch, self.out_seq, n, glen, gap) = f
        self.gap_pending = gap[:glen]
        self.last_in, self.intent = (lm, ls), (im, is_)
        self.intent_origin = origin.rstrip(b"\0").decode()
        self.intent_type = ttype[:tlen]
        base = off + 8 + _HEAD.size
        for i in range(min(n, MAX_ORIGINS)):
            o, e, s = _ORIGIN.unpack_from(self.buf, base + i * _ORIGIN.size)
            self.origins[o.rstrip(b"\0").decode()] = (e, s)
        self.gen = gen
        self.loaded = True

    def set_origin(self, origin: str, epoch: int, seq: int) -> None:
        self.origins[origin] = (epoch, seq)
        i = self.slot_of.get(origin)
        if i is None:
            if len(self.slot_of) >= MAX_ORIGINS:
                return  # kept in memory only: documented limit
            i = self.slot_of[origin] = len(self.slot_of)
        _ORIGIN.pack_into(self.table, i * _ORIGIN.size, origin.encode(), epoch, seq)

    def save(self) -> None:
        self.gen += 1
        off = _COPY_OFF[self.gen % 2]
        body = _HEAD.pack(
            self.last_in[0], self.last_in[1], self.intent[0], self.intent[1], self.intent_place,
            self.intent_w, self.intent_origin.encode(), self.intent_epoch, self.intent_seq,
            len(self.intent_type), self.intent_type, self.nonce, self.last_version, self.unseen,
            self.missing, self.out_epoch, self.out_seq, len(self.slot_of),
            len(self.gap_pending), self.gap_pending,
        )
        q = self.q
        q[off // 8] = 0
        n = len(body)
        self.buf[off + 8 : off + 8 + n] = body
        self.buf[off + 8 + n : off + 8 + n + len(self.table)] = self.table
        q[off // 8] = self.gen

    def close(self) -> None:
        self.q.release()
        self.buf.release()
        self.mm.close()
        os.close(self.fd)


def _was_handed(name: str, place: int, w: int, type_bytes: bytes) -> bool | None:
    """Did the dead bridge's last publish reach its inbox? True, False, or None (cannot tell)."""
    from ._publisher import Publisher

    return Publisher._landed(name, (place, w), type_bytes)


# --------------------------------------------------------------------------- the bridge


@dataclasses.dataclass
class Stats:
    """The bridge's counters (:attr:`Bridge.stats`, the status file, ``shmcast stat``)."""

    name: str
    host: str
    stream: str
    direction: str
    echo: bool = False  #: own entries are published locally too, as read back
    pid: int = 0
    connected: bool = False
    last_id: str = "0-0"  #: the last stream id delivered (or skipped as our own)
    lag_ms: int = 0  #: how far (ms of stream ids) the last id is behind the stream's newest
    events_in: int = 0  #: entries of other hosts (with echo, ours too) published locally
    events_out: int = 0  #: local events appended to the stream
    duplicates: int = 0  #: entries skipped because already delivered (retried XADDs)
    gaps: int = 0  #: gap events published on the local bus
    gap_events: int = 0  #: events those gaps counted (never delivered here)
    trims: int = 0  #: times XINFO STREAM showed entries trimmed past our last id
    in_rejected: int = 0  #: entries the local bus could not take (too large, inbox full)
    out_lost: int = 0  #: local events lost before they were sent (ring drops, downtime)
    uncertain: int = 0  #: restarts where the last publish could not be told (counted as gap)
    reconnects: int = 0
    error: str = ""
    updated: float = 0.0


class Bridge:
    """One host's end of a cross-host bus: local bus NAME <-> Redis stream *stream*.

    :param name: the local bus (it must exist; for ``in`` and ``both`` it needs
        ``max_publishers`` >= 1).
    :param redis_url: ``redis://host:port/db`` (or ``unix://path``).
    :param stream: the stream key, the same on every host (default ``shmcast:NAME``).
    :param direction: ``"out"`` (local -> stream), ``"in"`` (stream -> local) or ``"both"``.
    :param host_id: this host's id in the stream (default: the hostname), 1 to 32
        of ``[A-Za-z0-9_.-]``; every host of a stream needs its own.
    :param maxlen: the stream's approximate length bound (``MAXLEN ~``).
    :param block_ms: ``in``: how long one ``XREAD BLOCK`` waits. ``both``: the
        longest pause between two reads of the stream while it is quiet (local
        events are sent at once). See :meth:`_round`.
    :param slots: ring size of the bridge's own subscription to the local bus.
    :param start: where a bridge without state begins reading: ``"end"`` (new
        entries only) or ``"begin"`` (the whole stream).
    :param state_dir: where the state and status files live (:func:`default_state_dir`).
    :param codec: only for a bus with a custom codec (to encode gap events).
    :param echo: ``in``/``both``: also publish this host's own entries into the local
        bus as read back from the stream (``shmcast.in:<id>:<this host>:<type>``,
        besides the events as published locally), so that every host's bus holds
        the whole stream, in the stream's order, with its ids: what an SSE server
        sends to clients that may resume on another host with
        ``Hub.subscribe(since=<stream id>)``. See docs/howto-bridge.md.
    """

    def __init__(self, name: str, redis_url: str, *, stream: str | None = None,
                 direction: str = "both", host_id: str | None = None, maxlen: int = 100_000,
                 block_ms: int = 10, slots: int = 1024, start: str = "end",
                 state_dir: str | os.PathLike[str] | None = None, codec: object = None,
                 connect_timeout: float = 2.0, backoff_max: float = 2.0,
                 echo: bool = False) -> None:
        from ._names import check_name

        check_name(name)
        try:
            import redis  # noqa: F401
        except ImportError:
            raise ImportError(
                "shmcast.bridge needs redis-py: pip install 'shmcast[redis]'") from None
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        host = host_id if host_id is not None else socket.gethostname().split(".")[0]
        if not _HOST_RE.fullmatch(host):
            raise ValueError(f"host id must be 1 to 32 of [A-Za-z0-9_.-], not {host!r}")
        if start not in ("end", "begin"):
            raise ValueError("start must be 'end' or 'begin'")
        if maxlen < 1 or block_ms < 1:
            raise ValueError("maxlen and block_ms must be positive")
        self.name = name
        self.url = redis_url
        self.key = stream or f"shmcast:{name}"
        self.direction = direction
        self.host = host
        self.maxlen = maxlen
        self.block_ms = block_ms if direction == "both" else max(block_ms, 500)
        self.slots = slots
        self.start_at = start
        self.echo = bool(echo)
        self.codec = codec
        self.connect_timeout = connect_timeout
        self.backoff_max = backoff_max
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        base = f"bridge.{name}.{_slug(self.key)}"
        self.state_path = self.state_dir / f"{base}.state"
        self.status_path = self.state_dir / f"{base}.json"
        self.stats = Stats(name=name, host=host, stream=self.key, direction=direction,
                           echo=self.echo)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self.ended: str | None = None  # why run() returned
        self._ready = threading.Event()
        self._first: Event | None = None
        self._more = False  # the last XREAD returned entries: read again at once
        self._poll = _POLL_MIN  # both: how long to wait on the local bus before reading
        self._next_info = 0.0
        self._resolved = 0  # missing local versions known to be local events, to count
        self._connected_once = False
        self._trimmed = False
        self._pending_out: list[list[Any]] = []

    # --- lifecycle

    def start(self) -> Bridge:
        """Run the bridge in a daemon thread; returns self (see :meth:`wait_ready`)."""
        self._thread = threading.Thread(target=self.run, name=f"shmcast-bridge-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until the bridge is attached to its bus (and so sees every later event)."""
        return self._ready.wait(timeout)

    def request_stop(self) -> None:
        """Ask the bridge to end, without waiting (safe in a signal handler)."""
        self._stop.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the bridge to end and wait for it (at most *timeout*). Idempotent."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def __enter__(self) -> Bridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the loop

    def run(self) -> str:
        """Run until :meth:`stop` or the local bus ends; returns why it ended."""
        from ._inspect import read_geometry
        from ._publisher import Publisher
        from ._subscription import subscribe

        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.stats.pid = os.getpid()
        st = self._st = _State(self.state_path)
        self._sub: Any = None
        self._pub: Any = None
        try:
            g = read_geometry(self.name)
            self._bus_codec = g.codec
            self._bytes = _Bytes(g.codec)
            if st.nonce != g.nonce:  # another bus (or the first run): versions start anew
                st.nonce, st.last_version, st.unseen, st.missing = g.nonce, 0, 0, 0
                st.intent, st.intent_place = (0, 0), -1  # read again, published on this bus
            # Own events handed over by a previous run, not yet seen back: anonymous.
            self._own: deque[tuple[bytes | None, bytes | None, float]] = deque()
            now = time.monotonic()
            self._resolve_intent(now)
            for _ in range(st.unseen - len(self._own)):
                self._own.appendleft((None, None, now))
            st.save()
            if self.direction != "in":
                self._sub = subscribe(self.name, slots=self.slots, codec=self._bytes)
            if self.direction != "out":
                self._pub = self._attach_publisher(Publisher)
            if st.gap_pending:
                self._publish_pending_gap()
            self._ready.set()
            self._loop()
        except _Stopping:
            self.ended = "stopped"
        except StreamClosed as e:
            self.ended = f"the local bus ended ({e.reason})"
        except ShmcastError as e:
            self.ended = "stopped" if self._stop.is_set() else str(e)
        finally:
            self._ready.set()
            self._disconnect()
            if self._sub is not None:
                self._sub.unsubscribe()
            if self._pub is not None:
                self._pub.close()
            self.stats.connected = False
            self.stats.error = "" if self.ended in (None, "stopped") else str(self.ended)
            self._write_status()
            st.close()
        if self.ended is None:
            self.ended = "stopped"
        return self.ended

    def _attach_publisher(self, cls: Any) -> Any:
        from ._errors import TooManyPublishersError

        deadline = time.monotonic() + 3.0
        while True:  # the place of a killed predecessor frees within a second
            try:
                return cls(self.name, codec=self._bytes)
            except TooManyPublishersError:
                if time.monotonic() > deadline or self._stop.is_set():
                    raise
                time.sleep(0.05)

    def _resolve_intent(self, now: float) -> None:
        """After a kill inside a publish: did that event (or gap event) reach the bus?"""
        st = self._st
        if st.gap_pending:
            handed = st.intent_place >= 0 and _was_handed(
                self.name, st.intent_place, st.intent_w, _GAP_B)
            if handed:
                st.unseen += 1
                st.gap_pending = b""
            # else: run() publishes it again once attached (a duplicate only if we cannot tell)
            return
        if st.intent == (0, 0):
            return
        handed = None
        if st.intent_place >= 0:
            handed = _was_handed(self.name, st.intent_place, st.intent_w, st.intent_type)
        if handed is False:
            st.intent = (0, 0)
            return  # not handed over: read again from last_in and published
        # Handed over (or we cannot tell: then never twice, and counted).
        ident = st.intent
        st.intent = (0, 0)
        if handed:
            st.last_in = ident
            st.set_origin(st.intent_origin, st.intent_epoch, st.intent_seq)
            st.unseen += 1
            return
        self.stats.uncertain += 1
        st.last_in = ident
        st.set_origin(st.intent_origin, st.intent_epoch, st.intent_seq)
        st.gap_pending = self._encode_gap({
            "count": 1, "origins": {st.intent_origin: 1}, "after": _fmt_id(ident),
            "before": _fmt_id(ident), "reason": "bridge killed inside a publish it cannot tell"})

    def _loop(self) -> None:
        backoff = 0.05
        next_status = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_status:
                next_status = now + 0.5
                self._write_status()
            if self._conn is None:
                try:
                    self._connect()
                    backoff = 0.05
                except Exception as e:  # noqa: BLE001 (any failure to connect: retry)
                    self.stats.error = f"connect: {e}"
                    self._stop.wait(backoff * (0.5 + random.random()))  # noqa: S311
                    backoff = min(self.backoff_max, backoff * 2)
                    continue
            try:
                self._round()
            except (OSError, ConnectionError, TimeoutError) as e:
                self._lost_connection(e)
            except Exception as e:
                import redis

                if isinstance(e, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
                    self._lost_connection(e)
                else:
                    raise

    def _lost_connection(self, e: BaseException) -> None:
        self.stats.error = f"redis: {e}"
        self._disconnect()
        self._stop.wait(0.05)

    def _connect(self) -> None:
        import redis
        from redis.connection import parse_url

        kwargs = parse_url(self.url)  # type: ignore[no-untyped-call,unused-ignore]
        cls = kwargs.pop("connection_class", redis.Connection)
        conn = cls(**kwargs, socket_timeout=self.block_ms / 1000 + 2.0,
                   socket_connect_timeout=self.connect_timeout, socket_keepalive=True,
                   client_name=f"shmcast-bridge:{self.host}",
                   protocol=2)  # the replies parsed below are RESP2's, whatever the default
        conn.connect()
        self._conn = conn
        if self._connected_once:
            self.stats.reconnects += 1
        self._connected_once = True
        self.stats.connected = True
        self.stats.error = ""
        st = self._st
        if st.last_in == (0, 0) and self.direction != "out":
            info = self._xinfo()
            if self.start_at == "end" and info is not None:
                st.last_in = _parse_id(info[b"last-generated-id"])
                st.save()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self.stats.connected = False
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()

    def _xinfo(self) -> dict[bytes, Any] | None:
        import redis

        try:
            self._conn.send_command("XINFO", "STREAM", self.key)
            reply = self._conn.read_response()
        except redis.exceptions.ResponseError:
            return None  # no such key (yet, or Redis restarted empty)
        return self._info_dict(reply)

    @staticmethod
    def _info_dict(reply: Any) -> dict[bytes, Any]:
        return {reply[i]: reply[i + 1] for i in range(0, len(reply) - 1, 2)}

    def _round(self) -> None:
        """One round trip: our XADDs, XINFO STREAM (trims, lag), then XREAD.

        ``in``: ``XREAD BLOCK block_ms``: an entry wakes it at once. ``out``: wait
        on the local bus (its wake-up is immediate), then XADD. ``both``: one
        connection cannot block in XREAD and send at the same time, and Redis
        ends a ``BLOCK`` timeout only at its ``hz`` tick (100 ms by default,
        whatever the timeout asked): so the bridge waits on the local bus instead,
        for at most the poll interval, and reads the stream without blocking.
        The interval restarts at 0.5 ms after entries came and doubles, up to
        ``block_ms``, while none do.
        """
        import redis

        conn = self._conn
        cmds: list[list[Any]] = []
        reading = self._pub is not None
        sub = self._sub
        if sub is not None:
            if not self._pending_out and self._first is None and not self._more:
                with contextlib.suppress(TimeoutError):
                    self._first = sub.get(timeout=self._poll if reading else 0.2)
            self._collect_out()
            cmds.extend(self._pending_out)
            if not reading and not cmds:
                return
        n_out = len(cmds)
        if reading:
            now = time.monotonic()
            with_info = now >= self._next_info  # the lag; trims are checked on a gap
            if with_info:
                self._next_info = now + 0.5
                cmds.append(["XINFO", "STREAM", self.key])
            block = ["BLOCK", self.block_ms] if sub is None else []
            cmds.append(["XREAD", "COUNT", _COUNT, *block, "STREAMS", self.key,
                         _fmt_id(self._st.last_in)])
        conn.send_packed_command(conn.pack_commands(cmds))
        replies: list[Any] = []
        for _ in cmds:
            try:
                replies.append(conn.read_response())
            except redis.exceptions.ResponseError as e:
                replies.append(e)
        for r in replies[:n_out]:
            if isinstance(r, Exception):
                raise ShmcastError(f"XADD refused: {r}")
        self.stats.events_out += sum(1 for c in self._pending_out if c[7] != b"shmcast.gap")
        self._pending_out = []
        if not reading:
            return
        if with_info:
            info = replies[n_out]
            self._check_info(None if isinstance(info, Exception) else self._info_dict(info))
        read = replies[-1]
        if isinstance(read, Exception):
            raise ShmcastError(f"XREAD refused: {read}")
        entries = read[0][1] if read else []
        self._more = bool(entries)
        self._poll = _POLL_MIN if entries else min(self._poll * 2, self.block_ms / 1000)
        if entries:
            self._deliver(entries)

    def _trim_reason(self, after: tuple[int, int]) -> str:
        """Why entries are missing: XINFO STREAM's first entry past our last id means they
        were trimmed (MAXLEN) or lost with Redis before we read them."""
        self._trimmed = False
        with contextlib.suppress(ShmcastError):
            self._check_info(self._xinfo(), after)
        if self._trimmed:
            return "trimmed before it was read (or lost with Redis)"
        return "missing in the stream (lost at the origin or with Redis)"

    def _check_info(self, info: dict[bytes, Any] | None,
                    after: tuple[int, int] | None = None) -> None:
        st = self._st
        if info is None:
            self.stats.lag_ms = 0
            return
        newest = _parse_id(info[b"last-generated-id"])
        self.stats.lag_ms = max(0, newest[0] - st.last_in[0]) if newest > st.last_in else 0
        first = info.get(b"first-entry")
        if after is None:
            return
        if first and after != (0, 0) and _parse_id(first[0]) > after:
            # Entries after our last id are gone: trimmed (MAXLEN) or lost with Redis. The
            # next entries of each origin show how many (their seq jumps).
            self._trimmed = True
            self.stats.trims += 1

    # --- out: local bus -> stream

    def _collect_out(self) -> None:
        sub = self._sub
        st = self._st
        first, self._first = self._first, None
        batch: list[Event] = [first] if first is not None else []
        while len(batch) < 500:
            try:
                e = sub.get_nowait()
            except TimeoutError:
                break
            if e is None:
                break
            batch.append(e)
        changed = False
        for e in batch:
            v = e.version
            if st.last_version and v > st.last_version + 1:
                st.missing += v - st.last_version - 1
            st.last_version = max(st.last_version, v)
            changed = True
            if e.type.startswith(RESERVED_PREFIX):
                self._seen_own(e)
                continue
            st.out_seq += 1
            self._pending_out.append(self._xadd(e.type.encode(), e.data, v, e.timestamp))
        lost = self._attribute()
        if lost:
            changed = True
            st.out_seq += lost
            self.stats.out_lost += lost
            self._pending_out.append(self._xadd(
                GAP_TYPE.encode(), json.dumps({"count": lost, "reason": "lost at origin"}).encode(),
                st.last_version, time.time()))
        if changed:
            st.unseen = len(self._own)
            st.save()  # before the XADDs: a seq assigned and never sent is a counted gap

    def _xadd(self, type_b: bytes, data: bytes, version: int, ts: float) -> list[Any]:
        st = self._st
        return ["XADD", self.key, "MAXLEN", "~", self.maxlen, "*", "type", type_b,
                "data", data, "origin", self.host, "version", version, "ts", repr(ts),
                "epoch", st.out_epoch, "seq", st.out_seq]

    def _seen_own(self, e: Event) -> None:
        own = self._own
        tb = e.type.encode()
        for i, (t, d, _) in enumerate(own):
            if t == tb and d == e.data:
                st = self._st
                for _ in range(i):  # handed over before it, never seen: dropped by our ring
                    own.popleft()
                    st.missing -= 1
                own.popleft()
                # Every version below this one is now told apart: ours come in order.
                self._resolved += max(0, st.missing)
                st.missing = 0
                return
        if own and own[0][0] is None:
            own.popleft()  # an own event of a previous run

    def _attribute(self) -> int:
        """Missing local versions that were surely local events (not our own), to count."""
        st = self._st
        own = self._own
        resolved, self._resolved = self._resolved, 0
        if st.missing <= 0:
            st.missing = max(0, st.missing)
            return resolved
        now = time.monotonic()
        while own and st.missing > 0 and now - own[0][2] > _UNSEEN_LIMIT:
            own.popleft()  # not seen back in time while versions are missing: it was dropped
            st.missing -= 1
        if own:
            return resolved
        lost, st.missing = st.missing, 0
        return resolved + lost

    # --- in: stream -> local bus

    def _deliver(self, entries: list[Any]) -> None:
        st = self._st
        after = st.last_in
        parsed: list[tuple[tuple[int, int], dict[bytes, bytes] | None, str]] = []
        for raw_id, flat in entries:
            fields = {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}
            origin = fields.get(b"origin", b"").decode("utf-8", "replace")
            skip = (origin == self.host and not self.echo) or b"seq" not in fields \
                or b"epoch" not in fields
            parsed.append((_parse_id(raw_id), None if skip else fields, origin))
        # The jumps at each origin's first entry of the batch: entries trimmed (or lost
        # with Redis) before we read them, all told by ONE gap event.
        first: dict[str, tuple[int, int, int]] = {}
        for _, f, origin in parsed:
            if f is None or origin in first:
                continue
            epoch, seq, marker = int(f[b"epoch"]), int(f[b"seq"]), f.get(b"type") == _GAP_B
            jump = seq - self._last_seq(origin, epoch, seq, marker) - (0 if marker else 1)
            first[origin] = (epoch, seq - (0 if marker else 1), jump)
        jumps = {o: v for o, v in first.items() if v[2] > 0}
        why = "missing in the stream (lost at the origin or with Redis)"
        if jumps:
            why = self._trim_reason(after)
            self._gap(jumps, why, after=after, before=parsed[0][0])
        for ident, f, origin in parsed:
            if f is None:
                st.last_in = ident
                continue
            epoch, seq, marker = int(f[b"epoch"]), int(f[b"seq"]), f.get(b"type") == _GAP_B
            last = self._last_seq(origin, epoch, seq, marker)
            if seq < last or (seq == last and not marker):
                self.stats.duplicates += 1  # a retried XADD: delivered already
                st.last_in = ident
                continue
            jump = seq - last - (0 if marker else 1)
            if jump > 0:
                self._gap({origin: (epoch, seq - (0 if marker else 1), jump)}, why,
                          after=st.last_in, before=ident)
            if marker:
                st.set_origin(origin, epoch, seq)
                st.last_in = ident
                continue
            self._publish_in(ident, f, origin, epoch, seq)
        st.save()
        self.stats.last_id = _fmt_id(st.last_in)

    def _last_seq(self, origin: str, epoch: int, seq: int, marker: bool) -> int:
        """The last seq of *origin* accounted for here (delivered or counted)."""
        prev = self._st.origins.get(origin)
        if prev is None:  # the first entry we ever see from it: our baseline
            return seq if marker else seq - 1
        if prev[0] != epoch:
            return 0  # a new numbering (its state was lost): it starts at 1
        return prev[1]

    def _hand(self, type_: str, data: bytes) -> bool:
        """Publish into the local bus, waiting for room in a full inbox (the stream is our
        buffer; the bus owner drains within milliseconds unless it is stopped). False only
        when the bridge is asked to stop first."""
        pub = self._pub
        pause = 0.0002
        while True:
            before = pub.dropped
            pub.publish(type_, data)
            if pub.dropped == before:
                return True
            if self._stop.wait(pause):
                return False
            pause = min(0.01, pause * 2)

    def _mark_intent(self, type_b: bytes) -> None:
        """Write down where our next publish will land, so a restart can tell if it did."""
        st = self._st
        at = self._pub._position  # the inbox position makes a restart exact: see _was_handed
        st.intent_place, st.intent_w = at if at is not None else (-1, 0)
        st.intent_type = type_b if len(type_b) <= 255 else b""

    def _publish_in(self, ident: tuple[int, int], f: dict[bytes, bytes], origin: str,
                    epoch: int, seq: int) -> None:
        from ._errors import EventTooLargeError

        st = self._st
        type_s = f"{IN_PREFIX}{_fmt_id(ident)}:{origin}:{f[b'type'].decode('utf-8', 'replace')}"
        type_b = type_s.encode()
        data = f.get(b"data", b"")
        st.intent = ident
        st.intent_origin, st.intent_epoch, st.intent_seq = origin, epoch, seq
        self._mark_intent(type_b)
        st.save()
        reason = ""
        try:
            if not self._hand(type_s, data):
                st.intent = (0, 0)
                raise _Stopping
        except EventTooLargeError:
            reason = "too large for the local bus"
        except ValueError:
            reason = "type too long for the local bus"
        st.intent = (0, 0)
        if reason:  # this host cannot take it: counted, never silent
            self.stats.in_rejected += 1
            self._gap({origin: (epoch, seq, 1)}, reason, after=st.last_in, before=ident,
                      last_in=ident)
            return
        st.last_in = ident
        st.set_origin(origin, epoch, seq)
        self._own.append((type_b, data, time.monotonic()))
        st.unseen = len(self._own)
        self.stats.events_in += 1
        st.save()

    def _gap(self, jumps: dict[str, tuple[int, int, int]], reason: str, *,
             after: tuple[int, int], before: tuple[int, int],
             last_in: tuple[int, int] | None = None) -> None:
        """Count missing entries: ONE local ``shmcast.gap`` event, written ahead in the state
        (with the per-origin numbering it accounts for) so that a kill never loses or repeats it.

        *jumps* maps an origin to (epoch, the seq accounted for up to, how many are missing).
        """
        st = self._st
        payload: dict[str, Any] = {"count": sum(n for _, _, n in jumps.values()),
                   "origins": {o: n for o, (_, _, n) in jumps.items()},
                   "after": _fmt_id(after), "before": _fmt_id(before), "reason": reason}
        for o, (epoch, upto, _) in jumps.items():
            st.set_origin(o, epoch, upto)
        if last_in is not None:
            st.last_in = last_in
        st.gap_pending = self._encode_gap(payload)
        self.stats.gaps += 1
        self.stats.gap_events += int(payload["count"])
        self._publish_pending_gap()

    def _publish_pending_gap(self) -> None:
        st = self._st
        data = st.gap_pending
        self._mark_intent(_GAP_B)
        st.save()
        if not self._hand(GAP_TYPE, data):
            raise _Stopping  # still pending in the state: the next run publishes it
        self._own.append((_GAP_B, data, time.monotonic()))
        st.unseen = len(self._own)
        st.gap_pending = b""
        st.save()

    def _encode_gap(self, payload: dict[str, Any]) -> bytes:
        codec = self._bus_codec
        if codec in ("json", "raw"):
            data = json.dumps(payload, separators=(",", ":")).encode()
        elif codec == "pickle":
            data = pickle.dumps(payload)
        elif self.codec is None:
            raise ShmcastError(f"the bus uses the custom codec {codec!r}: pass codec= to Bridge")
        else:
            data = bytes(self.codec.dumps(payload))  # type: ignore[attr-defined]
        if len(data) > _GAP_MAX:
            payload["origins"] = dict(list(payload["origins"].items())[:8])
            payload["truncated"] = True
            return self._encode_gap(payload)
        return data

    # --- status

    def _write_status(self) -> None:
        self.stats.updated = time.time()
        self.stats.last_id = _fmt_id(self._st.last_in) if hasattr(self, "_st") else "0-0"
        tmp = self.status_path.with_suffix(".json.tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(dataclasses.asdict(self.stats)))
            os.replace(tmp, self.status_path)


def read_status(name: str, state_dir: str | os.PathLike[str] | None = None,
                ) -> Iterator[dict[str, Any]]:
    """The status of every bridge of bus *name* on this host (from their status files).

    Each dict has :class:`Stats`' fields and ``running`` (whether its process still
    holds its state file).
    """
    d = Path(state_dir) if state_dir is not None else default_state_dir()
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(d.glob(f"bridge.{name}.*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            running = False
            state = path.with_suffix(".state")
            with contextlib.suppress(OSError):
                fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    running = True
                finally:
                    os.close(fd)
            data["running"] = running
            yield data


def status_lines(name: str, state_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """One line per bridge of bus *name*: what ``shmcast stat`` prints under the bus."""
    lines = []
    for s in read_status(name, state_dir):
        state = ("connected" if s.get("connected") else "disconnected") if s["running"] \
            else "not running"
        lines.append(
            f"bridge {s['host']} <-> {s['stream']} ({s['direction']}"
            f"{', echo' if s.get('echo') else ''}, pid {s['pid']}, {state}): "
            f"in {s['events_in']}, out {s['events_out']}, lag {s['lag_ms']} ms, "
            f"gaps {s['gaps']} ({s['gap_events']} events), last id {s['last_id']}"
            + (f", error: {s['error']}" if s.get("error") else ""))
    return lines


__all__ = ["GAP_TYPE", "IN_PREFIX", "RESERVED_PREFIX", "Bridge", "Remote", "Stats",
           "default_state_dir", "read_status", "remote", "status_lines"]
