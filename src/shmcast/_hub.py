"""In-process fan-out: one subscription per process, read by one thread, handed to many feeds.

A :class:`Hub` owns one :class:`~shmcast.Subscription` and one daemon thread
that reads it in batches (one blocking ``get``, then whatever is ready) and
appends each batch to the bounded buffer of every open :class:`Feed`. Waiting
threads sleep on a lock of their own; waiting tasks on a future, and every
future of a batch is woken through one ``call_soon_threadsafe`` per event
loop (:func:`~shmcast._stream.wake_futures`). So a feed costs a deque and a
few counters, never a thread, a ring or a place on the bus.

Counting. Each feed keeps ``seen``: the highest bus version accounted for it
(handed to its buffer, or counted as dropped). It starts at the bus's version
when the feed opens, so it receives only what was published afterwards; an
event of version ``v > seen`` from the hub counts the versions in between,
which the hub's ring lost, as that feed's drops, then moves ``seen`` to ``v``.
Because every feed's ``seen`` is at least the last version the hub had
fanned out when it opened, those in-between versions are exactly the hub's
losses. What the hub's ring lost after its last event is counted when it ends.

Resuming by stream id. Events a bridge brought from the Redis stream
(``shmcast.bridge``; with ``echo=True`` also this host's own) carry the
entry's id in their type, and come in the stream's order on every host's bus.
``subscribe(since="<ms>-<seq>")`` resumes by that id, which means the same on
every host where a bus version does not: see :meth:`_HubCore.open_at_id`.

Locking: one reentrant lock per hub guards the hub and all its feeds (a
signal handler that closes a feed or the hub while its own thread holds the
lock gets it at once). Iterations over the feeds go over a copy: a feed that is
garbage-collected closes itself from whatever thread the collector runs in.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import operator
import os
import re
import threading
import time
import weakref
from collections import deque
from typing import Any

from . import _ipc
from ._codecs import Codec
from ._errors import DecodeError, Reason, ShmcastError, StreamClosed
from ._event import Event
from ._names import check_int
from ._ring import Overflow
from ._stream import Stream, wake_futures
from ._subscription import Subscription

# The reader thread hands on at most this many events per batch (one wake-up
# of every waiting task per batch), and holds the lock for this many feeds at
# a time, so that readers of feeds are never held up for a whole fan-out.
BATCH = 256
FEEDS_PER_LOCK = 512

# The reader thread's blocking get() returns this often when the bus is
# quiet, to end the closing feeds whose grace ran out.
READ_PERIOD = 0.25

# A closed feed still receives, for this long at most, the events the bus had
# published before close() returned but the hub had not yet handed on; those
# the hub has not received by then are counted as dropped. Below the 100 ms
# the contract gives a blocked reader to return.
CLOSE_GRACE = 0.05

# A thread waiting on a feed re-checks at least this often (it is woken at
# once in every other case).
WAIT_SLICE = 1.0

# The largest buffer or history a feed or hub may ask for: memory is the only
# limit, this only catches nonsense.
MAX_BUFFER = 1 << 24

# How long close() waits for the reader thread to end the feeds. Bounded: from
# a signal handler that interrupted a holder of the lock, the thread cannot
# finish until the handler returns.
_CLOSE_JOIN = 0.2

# Besides the events it keeps, a hub remembers the types (so the stream ids) of
# this many times as many events that left its history: a resume from a stream id
# among them counts exactly what it missed (an older one: a gap of unknown size).
KEY_SPAN = 3

# The type of an event a bridge brought from the stream (shmcast.bridge.IN_PREFIX):
# shmcast.in:<ms>-<seq>:<origin>:<type>.
IN_PREFIX = "shmcast.in:"
_STREAM_TYPE = re.compile(r"shmcast\.in:(\d+)-(\d+):")
_STREAM_ID = re.compile(r"(\d+)-(\d+)")

StreamId = tuple[int, int]
_TYPE = operator.attrgetter("type")

_monotonic = time.monotonic
_allocate_lock = threading.Lock
_get_running_loop = asyncio.get_running_loop


def _check_since(since: object) -> int | StreamId:
    if isinstance(since, str):
        m = _STREAM_ID.fullmatch(since)
        if m is not None:
            return int(m.group(1)), int(m.group(2))
    if isinstance(since, bool) or not isinstance(since, int):
        raise TypeError(f"since must be an int (an event version), a stream id "
                        f"'<ms>-<seq>' (str) or None, not {since!r}")
    if since < 0:
        raise ValueError(f"since must be a version (>= 0), got {since}")
    return since


def stream_id(type_: str) -> StreamId | None:
    """The stream id an event of this type carries (a bridge brought it), or None."""
    m = _STREAM_TYPE.match(type_)
    return None if m is None else (int(m.group(1)), int(m.group(2)))


class _FeedCore:
    """All of a feed's state (guarded by its hub's lock); apart from Feed so a finalizer
    can close it.

    States: *open* (``reason`` None); *closing* (``reason`` set, ``limit`` the bus
    version at close: it still takes the events up to it); *done* (no more input:
    its readers get what is buffered, then StreamClosed).
    """

    __slots__ = ("active", "after", "buffer", "deadline", "dq", "dropped", "futures", "hub",
                 "limit", "overwrite", "reason", "seen", "waiters")

    def __init__(self, hub: _HubCore, buffer: int, overwrite: bool, seen: int) -> None:
        self.hub = hub
        self.dq: deque[Any] = deque()
        self.buffer = buffer
        self.overwrite = overwrite
        self.seen = seen
        self.dropped = 0
        self.reason: Reason | None = None
        self.limit: int | None = None
        self.deadline = 0.0
        self.active = True  # among the hub's feeds (open or closing)
        # Opened at a stream id: stream events up to it are skipped (the client has
        # them), until the first one after it (the stream's order holds from there).
        self.after: StreamId | None = None
        self.waiters: list[Any] = []  # locks of the threads waiting on it
        self.futures: set[asyncio.Future[None]] = set()

    def put(self, item: Any) -> None:
        """Buffer *item* under the feed's overflow policy (hub lock held)."""
        dq = self.dq
        if len(dq) < self.buffer:
            dq.append(item)
        elif self.overwrite:
            old = dq.popleft()
            dq.append(item)
            if type(old) is Event or isinstance(old, DecodeError):  # an error has no version
                self.drop(1)
        elif type(item) is Event or isinstance(item, DecodeError):
            self.drop(1)

    def drop(self, n: int) -> None:
        self.dropped += n
        self.hub.dropped += n

    def take(self, items: list[Any], hi: int) -> bool:
        """Hand on the items with a version above ``seen`` (hub lock held).

        Versions skipped on the way are the hub's losses: counted as this
        feed's drops. *hi* is the highest version among *items*.
        """
        s = self.seen
        limit = self.limit
        if limit is not None and hi > limit:
            hi = limit
        if hi <= s:
            return False
        put = self.put
        after = self.after
        for item in items:
            v = item.version
            if v <= s:
                continue
            if v > hi:
                break
            if v != s + 1:
                self.drop(v - s - 1)
            s = v
            if after is not None and type(item) is Event:
                sid = stream_id(item.type)
                if sid is not None:
                    if sid <= after:
                        continue  # delivered to the client already (on another host)
                    after = self.after = None
            put(item)
        if limit is not None and hi == limit and s < limit:
            self.drop(limit - s)  # what is missing up to the limit will not come
            s = limit
        self.seen = s
        return True

    def wake(self, futures: list[asyncio.Future[None]]) -> None:
        """Release the waiting threads; add the waiting tasks' futures to *futures*."""
        if self.waiters:
            waiters, self.waiters = self.waiters, []
            for lock in waiters:
                # RuntimeError: released already (a signal handler got there first).
                with contextlib.suppress(RuntimeError):
                    lock.release()
        if self.futures:
            futures.extend(self.futures)
            self.futures.clear()

    def pending(self) -> bool:
        """Closing, and events it should still get may come (hub lock held)."""
        return self.limit is not None and self.active

    def close(self) -> None:
        """Stop the feed's input: what the bus published up to now still comes. Idempotent."""
        hub = self.hub
        with hub.lock:
            if self.reason is not None or hub.forked:
                return
            self.reason = StreamClosed.UNSUBSCRIBED
            hub.open_count -= 1
            limit = max(hub.bus_version(), hub.last)
            if limit > self.seen and self.active:
                self.limit = limit
                self.deadline = _monotonic() + CLOSE_GRACE
            else:
                hub.retire(self)
            futures: list[asyncio.Future[None]] = []
            self.wake(futures)
        wake_futures(futures)


class _HubCore:
    """Everything a Hub owns and all its state; apart from Hub so a finalizer can end it."""

    def __init__(self, name: str, slots: int | None, codec: object, owner: int | None,
                 buffer: int, overflow: Overflow, history: int) -> None:
        self.name = name
        self.pid = os.getpid()
        self.forked = False
        self.lock = threading.RLock()
        self.buffer = buffer
        self.overwrite = overflow is Overflow.OVERWRITE
        self.history: deque[Event] | None = deque(maxlen=history) if history else None
        # The types of the events that left the history (stream ids): see open_at_id.
        self.forgotten: deque[str] = deque(maxlen=history * KEY_SPAN)
        self.latest: dict[str, Event] = {}
        self.feeds: dict[_FeedCore, None] = {}  # open and closing feeds, in opening order
        self.open_count = 0
        self.dropped = 0  # over every feed ever opened
        self.version = 0  # the last version received
        self.reason: Reason | None = None  # set when the hub ended
        self.closing = False
        self.unserved = False
        self.sub = Subscription(name, slots=slots, codec=codec, owner=owner)  # type: ignore[arg-type]
        # Versions up to here were published before the hub existed; past it,
        # every version is received or counted in sub.dropped.
        self.last = self.sub._bus_version()
        self.accounted = 0  # versions of sub.dropped the hub has seen as gaps or DecodeErrors
        _ipc.track_fork(self)
        self.thread = threading.Thread(target=self.run, name=f"shmcast-hub-{name}", daemon=True)
        self.thread.start()

    def after_fork_in_child(self) -> None:
        self.forked = True
        self.lock = threading.RLock()  # the parent's reader thread may hold the old one

    def bus_version(self) -> int:
        return self.sub._bus_version()

    def check_usable(self) -> None:
        if self.forked:
            raise ShmcastError(
                f"this hub of bus {self.name!r} belongs to process {self.pid}; a forked child "
                "must make its own"
            )

    # Opening feeds (lock held).
    def open(self, buffer: int, since: int | StreamId | None) -> _FeedCore:
        self.check_usable()
        if self.reason is not None or self.closing:
            raise StreamClosed(self.reason or StreamClosed.UNSUBSCRIBED, self.name)
        if isinstance(since, tuple):
            feed = self.open_at_id(buffer, since)
            self.feeds[feed] = None
            self.open_count += 1
            return feed
        now = max(self.bus_version(), self.last)
        if since is None or since >= now:
            # Nothing missed: live from now (also an id from an earlier bus of this name).
            feed = _FeedCore(self, buffer, self.overwrite, now)
        else:
            # Resume: the kept events after `since`, then live ones from the last one
            # the hub received (those after it are on their way).
            feed = _FeedCore(self, buffer, self.overwrite, since)
            kept = [e for e in self.history if e.version > since] if self.history else []
            if kept:
                feed.take(kept, kept[-1].version)
            if self.last > feed.seen:  # no longer kept, or never received
                feed.drop(self.last - feed.seen)
                feed.seen = self.last
        self.feeds[feed] = None
        self.open_count += 1
        return feed

    def open_at_id(self, buffer: int, after: StreamId) -> _FeedCore:
        """A feed resuming after stream id *after* (lock held).

        The kept events from the first stream event after *after* on, then the live
        ones; stream events up to *after* that come later (this host's bridge is
        behind the host the client came from) are skipped. The stream events after
        *after* that are no longer kept are its drops at once: exactly as many as
        there were when the hub remembers an id at or before *after*; otherwise
        (older than all it remembers, or from before the hub began) an unknown
        number, counted as those it remembers, and at least one.

        Stream events come in the stream's order (one bridge, one Publisher), so
        both scans go from the newest back and stop at the first id at or before
        *after*: the cost is what the client missed, not the history's length.
        """
        history = self.history
        assert history is not None  # Hub.subscribe checks it
        first = len(history)  # index of the oldest kept stream event after `after`
        known = False  # an id at or before `after` is known: all that came since is too
        i = first
        for e in reversed(history):
            i -= 1
            sid = stream_id(e.type)
            if sid is None:
                continue
            if sid <= after:
                known = True
                break
            first = i
        missed = 0
        if not known:
            for t in reversed(self.forgotten):
                sid = stream_id(t)
                if sid is None:
                    continue
                if sid <= after:
                    known = True
                    break
                missed += 1
        if not known:
            missed = max(1, missed)
        feed = _FeedCore(self, buffer, self.overwrite, self.last)
        feed.after = after
        if first < len(history):
            kept = list(itertools.islice(history, first, None))
            feed.seen = kept[0].version - 1
            feed.take(kept, kept[-1].version)
            if self.last > feed.seen:  # lost by the hub's ring after its last kept event
                feed.drop(self.last - feed.seen)
                feed.seen = self.last
        # else: live from the last event the hub received (those after it are on their way)
        if missed:
            feed.drop(missed)
        return feed

    def retire(self, feed: _FeedCore) -> None:
        """Take a feed out of the fan-out: no more input (lock held)."""
        if feed.active:
            feed.active = False
            self.feeds.pop(feed, None)
        feed.limit = None

    def finish_closing(self, feed: _FeedCore) -> None:
        """A closing feed whose grace ran out: what has not come is dropped (lock held)."""
        if feed.limit is not None and feed.limit > feed.seen:
            feed.drop(feed.limit - feed.seen)
            feed.seen = feed.limit
        self.retire(feed)

    # The reader thread.
    def run(self) -> None:
        sub = self.sub
        reason: Reason = StreamClosed.UNSUBSCRIBED
        try:
            while True:
                batch: list[Any] = []
                ended: Reason | None = None
                try:
                    batch.append(sub.get(timeout=READ_PERIOD))
                except TimeoutError:
                    self.sweep()
                    continue
                except StreamClosed as e:
                    reason = e.reason
                    return
                except DecodeError as e:
                    batch.append(e)
                except ShmcastError as e:  # the publisher cannot serve our ring (yet)
                    self.unserved_error(e)
                    continue
                try:  # what else is ready, in one call to the ring
                    batch += sub._ready(BATCH - 1)
                except StreamClosed as e:
                    ended = e.reason
                except ShmcastError:
                    pass
                self.fan_out(batch)
                if ended is not None:
                    reason = ended
                    return
        finally:
            self.end(reason)

    def fan_out(self, batch: list[Any]) -> None:
        lock = self.lock
        with lock:
            if self.forked:
                return
            self.unserved = False
            last = self.last
            history = self.history
            latest = self.latest
            kept: list[Event] = []
            keep = kept.append
            self.version = max(self.version, batch[-1].version)
            for item in batch:
                v = item.version
                if v > last + 1:
                    self.accounted += v - last - 1  # the hub's ring lost these
                last = max(last, v)
                if type(item) is Event:
                    latest[item.type] = item
                    keep(item)
                else:
                    self.accounted += 1  # a DecodeError: counted in sub.dropped too
            self.last = last
            if history is not None and kept:
                self.keep(history, kept)
            feeds = list(self.feeds)
        futures: list[asyncio.Future[None]] = []
        for i in range(0, len(feeds), FEEDS_PER_LOCK):
            with lock:
                if self.forked:
                    return
                for feed in feeds[i:i + FEEDS_PER_LOCK]:
                    if feed.active and feed.take(batch, last):
                        if feed.limit is not None and feed.seen >= feed.limit:
                            self.retire(feed)
                        feed.wake(futures)
        wake_futures(futures)

    def keep(self, history: deque[Event], events: list[Event]) -> None:
        """Append *events* to the history; remember the types of those it pushes out
        (lock held). One C-level pass per batch: this runs for every event."""
        assert history.maxlen is not None
        spill = len(history) + len(events) - history.maxlen
        if spill > 0:
            forgotten = self.forgotten
            forgotten.extend(map(_TYPE, itertools.islice(history, spill)))
            if spill > len(history):  # a batch longer than the history
                forgotten.extend(map(_TYPE, events[:spill - len(history)]))
        history.extend(events)

    def unserved_error(self, error: ShmcastError) -> None:
        """Tell every open feed once per episode that the hub's ring is not served."""
        futures: list[asyncio.Future[None]] = []
        with self.lock:
            if self.unserved or self.forked:
                return
            self.unserved = True
            for feed in list(self.feeds):
                if feed.reason is None:
                    feed.put(ShmcastError(str(error)))
                    feed.wake(futures)
        wake_futures(futures)

    def sweep(self) -> None:
        """End the closing feeds whose grace ran out (the bus is quiet)."""
        futures: list[asyncio.Future[None]] = []
        with self.lock:
            if self.forked:
                return
            now = _monotonic()
            for feed in list(self.feeds):
                if feed.limit is not None and now >= feed.deadline:
                    self.finish_closing(feed)
                    feed.wake(futures)
        wake_futures(futures)

    def end(self, reason: Reason) -> None:
        """The subscription ended: count what its ring lost at the end, end every feed."""
        futures: list[asyncio.Future[None]] = []
        with self.lock:
            if self.forked:
                return
            trailing = max(0, self.sub.dropped - self.accounted)
            tail = self.last + trailing  # the versions lost after the last one received
            self.reason = reason
            for feed in list(self.feeds):
                top = tail if feed.limit is None else min(tail, feed.limit)
                if top > feed.seen:
                    feed.drop(top - feed.seen)
                    feed.seen = top
                if feed.reason is None:
                    feed.reason = reason
                    self.open_count -= 1
                self.finish_closing(feed)
                feed.wake(futures)
        wake_futures(futures)

    def close(self) -> None:
        """Leave the bus; the reader thread ends the feeds after what the ring holds."""
        if self.forked:
            return
        self.closing = True
        self.sub.unsubscribe()
        thread = self.thread
        # Not from the reader thread, nor while this thread holds the lock (a signal
        # handler that interrupted it): the reader needs the lock to end the feeds.
        if thread is not threading.current_thread() and thread.is_alive() \
                and not self.lock._is_owned():  # type: ignore[attr-defined]
            thread.join(_CLOSE_JOIN)


class Feed(Stream):
    """One local stream of a :class:`Hub`'s events; open it with :meth:`Hub.subscribe`.

    It reads like a :class:`~shmcast.Subscription`: :meth:`get`,
    :meth:`get_nowait`, ``for``, ``async for``, ``with``. Read it from any
    threads and from any running event loops; a waiting feed costs no thread.
    """

    __slots__ = ("__weakref__", "_c", "_finalizer", "_hub", "name")

    def __init__(self, hub: Hub, core: _FeedCore) -> None:
        self.name = hub.name
        self._hub = hub  # the hub lives as long as its feeds
        self._c = core
        self._finalizer = weakref.finalize(self, core.close)

    # What Stream builds on.
    def _take(self, loop: asyncio.AbstractEventLoop | None) -> Any:
        """The next event if one is ready; else, given *loop*, a future registered to be
        woken when one may be (else None). StreamClosed at the end; DecodeError for an
        undecodable event (counted as dropped), ShmcastError for an unserved hub."""
        c = self._c
        hub = c.hub
        with hub.lock:
            if hub.forked:
                hub.check_usable()
            dq = c.dq
            if dq:
                item = dq.popleft()
                if type(item) is Event:
                    return item
                if isinstance(item, DecodeError):
                    c.drop(1)
                    error = DecodeError(str(item), item.version, item.type, item.data)
                    raise error from item.__cause__
                raise ShmcastError(str(item))
            reason = c.reason
            if reason is not None:
                if c.limit is None or not c.active:
                    raise StreamClosed(reason, self.name)
                if _monotonic() >= c.deadline:  # closing, and the grace ran out
                    hub.finish_closing(c)
                    raise StreamClosed(reason, self.name)
            if loop is None:
                return None
            fut = loop.create_future()
            c.futures.add(fut)
            return fut

    def _poll(self) -> Event | None:
        return self._take(None)  # type: ignore[no-any-return]

    async def __anext__(self) -> Event:
        """The next event without blocking the event loop; StopAsyncIteration at the end."""
        # Stream.__anext__ with the poll and the wait's registration under one lock:
        # this runs once per event per waiting task.
        c = self._c
        loop = _get_running_loop()
        take = self._take
        while True:
            try:
                got = take(loop)
            except StreamClosed:
                raise StopAsyncIteration from None
            if type(got) is Event:
                return got
            # Every change wakes the future, except a closing feed's grace running out.
            timer = None if c.limit is None else \
                loop.call_later(max(0.0, c.deadline - _monotonic()), _settle, got)
            try:
                await got
            finally:
                if timer is not None:
                    timer.cancel()
                c.futures.discard(got)

    def _wait_for(self, timeout: float | None) -> float | None:
        """How long a reader may wait now; None if it must not (hub lock held)."""
        c = self._c
        if c.hub.forked or c.dq or (c.reason is not None and not c.pending()):
            return None
        wait = WAIT_SLICE if timeout is None else min(timeout, WAIT_SLICE)
        if c.pending():
            wait = min(wait, max(0.0, c.deadline - _monotonic()))
        return wait

    def _sleep(self, timeout: float | None) -> None:
        c = self._c
        lock = c.hub.lock
        with lock:
            wait = self._wait_for(timeout)
            if wait is None:
                return
            waiter = _allocate_lock()
            waiter.acquire()
            c.waiters.append(waiter)
        try:
            waiter.acquire(timeout=wait)
        finally:
            with c.hub.lock:
                if waiter in c.waiters:
                    c.waiters.remove(waiter)

    async def _asleep(self) -> None:
        # _wait_for inlined: this runs once per event per waiting task.
        c = self._c
        hub = c.hub
        loop = _get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with hub.lock:
            pending = c.limit is not None and c.active
            if hub.forked or c.dq or (c.reason is not None and not pending):
                return
            c.futures.add(fut)
            # Every change wakes the future, except a closing feed's grace running out.
            timer = loop.call_later(c.deadline - _monotonic(), _settle, fut) if pending else None
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            c.futures.discard(fut)

    # Ending.
    def unsubscribe(self) -> None:
        """Close the feed; it ends after the events already buffered. Idempotent.

        Events the bus published before it returned that the hub had not yet
        handed on still come if the hub has them within 50 ms, else they are
        counted as dropped; none published after it returned ever comes.
        Threads and tasks waiting on the feed return promptly. Safe from any
        thread and from a signal handler.
        """
        self._c.close()

    @property
    def dropped(self) -> int:
        """Events this feed lost: overflowed its buffer, lost by the hub's ring, or undecodable."""
        return self._c.dropped

    @property
    def closed(self) -> bool:
        """Whether the feed has ended or is ending (closed, hub closed, bus closed or gone)."""
        return self._c.reason is not None

    def __reduce__(self) -> Any:
        raise TypeError("a Feed cannot be pickled: make a Hub in the other process")

    def __repr__(self) -> str:
        reason = self._c.reason
        state = f"ended ({reason})" if reason else "open"
        return f"<shmcast.Feed {self.name!r} {state}, {len(self._c.dq)} buffered>"


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Hub:
    """One subscription to a bus, fanned out inside this process to any number of feeds.

    The Go ``eventbus`` inside each worker: a reader thread reads the bus once
    and hands every event to each open :class:`Feed`, whose bounded buffer
    drops under *overflow* without ever slowing the hub or the other feeds.
    Thread-safe; ``with Hub(...) as hub:`` closes it on exit.

    :param name: the bus name.
    :param slots: ring size of the hub's subscription (default: the bus's).
    :param codec: as for :func:`~shmcast.subscribe`.
    :param owner: as for :func:`~shmcast.subscribe`.
    :param buffer: events each feed holds by default before it drops.
    :param overflow: ``"overwrite"`` (drop a full feed's oldest unread event) or
        ``"drop_new"`` (drop the new one); one drop is counted either way.
    :param history: how many of the last events received to keep for
        ``subscribe(since=...)``.
    :raises BusNotFoundError: if no live bus has that name.
    :raises BusPermissionError: if the bus belongs to another user than *owner*.
    :raises TooManySubscribersError: if the bus has no free place.
    :raises ShmcastError: if the segment is not a shmcast bus of this layout, or the
        codec does not match.
    :raises ValueError: for a bad *buffer*, *overflow* or *history*.
    """

    __slots__ = ("__weakref__", "_c", "_finalizer", "name")

    def __init__(self, name: str, *, slots: int | None = None,
                 codec: str | Codec | None = None, owner: int | None = None,
                 buffer: int = 64, overflow: str | Overflow = "overwrite",
                 history: int = 0) -> None:
        check_int("buffer", buffer, 1, MAX_BUFFER)
        check_int("history", history, 0, MAX_BUFFER)
        policy = Overflow.parse(overflow)
        self.name = name
        self._c = _HubCore(name, slots, codec, owner, buffer, policy, history)
        self._finalizer = weakref.finalize(self, self._c.close)

    def subscribe(self, *, buffer: int | None = None, since: int | str | None = None) -> Feed:
        """Open a feed: cheap, local, limited only by memory.

        Without *since* the feed gets the events published from now on. With
        ``since=v`` (an SSE ``Last-Event-ID``) it first gets the kept events
        of a version above *v*, then the live ones, with no duplicate and no
        hole; versions after *v* that are no longer kept count as its drops
        at once. A *v* at or above the bus's current version (nothing was
        missed, or an id from an earlier bus of this name) is the same as no
        *since*: the feed starts live and counts nothing.

        With ``since="<ms>-<seq>"``, a Redis stream id (``remote(event).stream_id``
        of an event a :mod:`shmcast.bridge` brought), it resumes in the stream's
        order, which is the same on every host: the kept events from the first
        stream event after that id on (and every event after it), then the live
        ones, skipping stream events up to the id that arrive late. Stream events
        after the id that are no longer kept count as its drops at once (exactly,
        if the hub still knows an id at or before it; else at least one). Needs
        ``history``; see docs/howto-bridge.md, "Resume on another host".

        :param buffer: events this feed holds before it drops (default: the hub's).
        :raises StreamClosed: if the hub has ended (closed, bus closed, publisher died).
        :raises ShmcastError: in a child process that inherited the hub by fork().
        :raises ValueError: for a bad *buffer* or *since*, or a stream id on a hub
            without ``history``.
        :raises TypeError: for a *since* that is no int, stream id or None.
        """
        core = self._c
        if buffer is None:
            buffer = core.buffer
        else:
            check_int("buffer", buffer, 1, MAX_BUFFER)
        at = None if since is None else _check_since(since)
        if isinstance(at, tuple) and core.history is None:
            raise ValueError("resuming by stream id (since=\"<ms>-<seq>\") needs Hub(history=N)")
        with core.lock:
            feed = core.open(buffer, at)
        return Feed(self, feed)

    def latest(self, type: str) -> Event | None:
        """The last event of *type* the hub received (whatever ``history`` is), or None."""
        if not isinstance(type, str):
            raise TypeError(f"event type must be a str, not {type.__class__.__name__}")
        return self._c.latest.get(type)

    @property
    def version(self) -> int:
        """The last version the hub received (0 before any)."""
        return self._c.version

    @property
    def dropped(self) -> int:
        """Events dropped so far, summed over every feed ever opened."""
        return self._c.dropped

    @property
    def subscriber_count(self) -> int:
        """Feeds open now."""
        return self._c.open_count

    @property
    def closed(self) -> bool:
        """Whether the hub has ended or is ending (closed, bus closed, publisher died)."""
        return self._c.closing or self._c.reason is not None

    def close(self) -> None:
        """Leave the bus; every feed ends after its buffered events. Idempotent.

        Safe from any thread and from a signal handler.
        """
        self._c.close()

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise TypeError("a Hub cannot be pickled: make one in the other process")

    def __repr__(self) -> str:
        c = self._c
        state = f"ended ({c.reason})" if c.reason else "closing" if c.closing else "open"
        return f"<shmcast.Hub {self.name!r} {state}, {c.open_count} feeds>"


__all__ = ["Feed", "Hub"]
