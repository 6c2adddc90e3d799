"""Reading buses from outside, without attaching: what ``shmcast ls``, ``stat`` and ``clean`` need.

Nothing here registers a subscriber, takes a lock or writes a byte of a bus
it reads: segments are opened ``O_RDONLY`` and mapped ``PROT_READ``, and
liveness is asked of the kernel with ``F_OFD_GETLK``, which reports a lock
without taking one. (The publisher holds lock byte 0 of the control segment
for the bus's life; each subscriber holds the lock byte of its registry place,
and each ``Publisher`` that of its publisher place; the kernel drops them when
their holder dies.)

Cleaning is in :mod:`shmcast._clean`; what touches the OS (read-only maps,
/dev/shm, /proc) is in :mod:`shmcast._ipc`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import stat as stat_mod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import _registry
from ._errors import BusNotFoundError, ShmcastError
from ._ipc import SHM_DIR, ReadOnlySegment, list_shm, open_readonly, process_state, shm_path
from ._layout import (
    CONTROL_HEADER_SIZE,
    ENTRY_ACTIVE,
    ENTRY_FREE,
    ENTRY_JOINING,
    ENTRY_LEFT,
    R_OFF,
    REJECTED_OFF,
    RETIRED_OFF,
    RING_HEADER_SIZE,
    SLOT_BODY_OFF,
    STATE_CLOSED,
    STATE_OFF,
    TWO_U64,
    U32,
    U64,
    VERSION_OFF,
    W_OFF,
    Geometry,
    check_ring_header,
    parse_control_header,
    read_pub_entry,
    slot_stride,
)
from ._names import check_name, control_name, drain_name, inbox_name, ring_name
from ._ring import Overflow
from ._ring import drops as ring_drops

_BUS_RE = re.compile(r"shmcast\.([A-Za-z0-9_-]{1,64})")
_RING_RE = re.compile(r"(sem\.)?shmcast\.([A-Za-z0-9_-]{1,64})\.([0-9a-f]{16})\.([0-9a-f]{16})")
_GLOB_CHARS = frozenset("*?[")

_ENTRY_STATES = {ENTRY_JOINING: "joining", ENTRY_ACTIVE: "active", ENTRY_LEFT: "left"}


def open_control(name: str) -> ReadOnlySegment:
    """Open bus *name*'s control segment read-only.

    :raises ValueError: for a bad bus name.
    :raises BusNotFoundError: if there is no such bus.
    :raises PermissionError: if we may not read it.
    :raises ShmcastError: if it is not a shmcast segment.
    """
    check_name(name)
    try:
        return open_readonly(control_name(name), CONTROL_HEADER_SIZE)
    except FileNotFoundError:
        raise BusNotFoundError(f"no bus named {name!r} on this host") from None


# --------------------------------------------------------------------------- listing /dev/shm


def bus_names(patterns: Sequence[str] = (), entries: Iterable[str] | None = None) -> list[str]:
    """Names of the buses on this host (``/dev/shm/shmcast.NAME``), sorted, matching *patterns*."""
    names = []
    for entry in list_shm() if entries is None else entries:
        m = _BUS_RE.fullmatch(entry)
        if m and matches(m.group(1), patterns):
            names.append(m.group(1))
    return sorted(names)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether bus *name* matches one of the shell-style *patterns* (all names if none)."""
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_patterns(patterns: Sequence[str]) -> None:
    """Reject a pattern without wildcards that is not a valid bus name.

    :raises ValueError: naming the bad pattern.
    """
    for pattern in patterns:
        if not _GLOB_CHARS & set(pattern):
            check_name(pattern)


@dataclass(frozen=True)
class RingFile:
    """One ring's names in /dev/shm: its segment and/or its semaphore."""

    bus: str
    nonce: int
    ring_id: int
    files: tuple[str, ...]  # /dev/shm entries (``shmcast.…`` and/or ``sem.shmcast.…``)
    uid: int
    size: int

    @property
    def label(self) -> str:
        """The ring's segment name as it appears in /dev/shm."""
        return ring_name(self.bus, self.nonce, self.ring_id).lstrip("/")


def ring_files(entries: Iterable[str] | None = None) -> dict[tuple[str, int, int], RingFile]:
    """Every ring segment or semaphore in /dev/shm, keyed by ``(bus, nonce, ring id)``."""
    found: dict[tuple[str, int, int], list[tuple[str, os.stat_result]]] = {}
    for entry in list_shm() if entries is None else entries:
        m = _RING_RE.fullmatch(entry)
        if not m:
            continue
        try:
            st = os.lstat(os.path.join(SHM_DIR, entry))
        except FileNotFoundError:
            continue
        key = (m.group(2), int(m.group(3), 16), int(m.group(4), 16))
        found.setdefault(key, []).append((entry, st))
    return {
        key: RingFile(key[0], key[1], key[2], tuple(sorted(e for e, _ in items)),
                      items[0][1].st_uid, sum(st.st_size for _, st in items))
        for key, items in found.items()
    }


def _exists(posix_name: str) -> bool:
    return os.path.lexists(shm_path(posix_name))


# --------------------------------------------------------------------------- reading a bus


@dataclass(frozen=True)
class SubscriberInfo:
    """One registry place as seen from outside, with its ring's counters if the ring exists."""

    index: int
    pid: int
    state: str  # joining, active, left
    alive: bool  # the place's OFD lock is held: its subscriber process is alive
    process: str  # running, stopped, zombie, gone (from /proc, for the entry's pid)
    ring: str  # the ring segment's name in /dev/shm
    ring_present: bool
    slots: int
    joined: float
    written: int | None = None  # events the publisher wrote to the ring (w)
    read: int | None = None  # events the subscriber consumed or stepped over (r)
    fill: int | None = None  # unread events in the ring
    lag: int | None = None  # bus version minus the last version this subscriber read
    drops: int | None = None
    error: str | None = None  # why the ring could not be read

    @property
    def status(self) -> str:
        """``alive``, ``stopped`` (alive but SIGSTOPped) or ``dead``."""
        if not self.alive:
            return "dead"
        return "stopped" if self.process == "stopped" else "alive"


@dataclass(frozen=True)
class PublisherInfo:
    """One publisher place as seen from outside, with its holder's counts from the inbox.

    The inbox belongs to the place: ``sent`` and ``dropped`` are the current (or
    last) holder's, counted from where it joined; ``pending`` is every event
    in the inbox that the bus has not drained yet.
    """

    place: int
    pid: int
    state: str  # joining, active, left
    alive: bool  # the place's OFD lock is held: its publisher process is alive
    process: str  # running, stopped, zombie, gone (from /proc, for the entry's pid)
    inbox: str  # the inbox segment's name in /dev/shm
    joined: float
    sent: int | None = None  # events it handed to the inbox
    dropped: int | None = None  # events it could not hand over (the inbox was full)
    pending: int | None = None  # events waiting in the inbox for the bus's drain thread
    error: str | None = None  # why the inbox could not be read

    @property
    def status(self) -> str:
        """``alive``, ``stopped`` (alive but SIGSTOPped) or ``dead``."""
        if not self.alive:
            return "dead"
        return "stopped" if self.process == "stopped" else "alive"


@dataclass(frozen=True)
class BusInfo:
    """One bus, read without attaching to it."""

    name: str
    uid: int
    mode: int
    pid: int
    publisher_alive: bool
    closed: bool
    nonce: int
    codec: str
    slots: int
    slot_size: int
    max_subscribers: int
    overflow: str
    created: float
    version: int
    retired_drops: int  # drops of subscribers the publisher has already let go
    live_subscribers: int  # active entries whose place is held (what bus.subscriber_count says)
    shm_bytes: int  # control segment + this bus's ring segments and semaphores
    subscribers: tuple[SubscriberInfo, ...] = field(default=())
    max_publishers: int = 0
    live_publishers: int = 0  # active places whose lock is held (bus.publisher_count)
    publishers: tuple[PublisherInfo, ...] = field(default=())

    @property
    def state(self) -> str:
        """``open``, ``closing`` (closed, publisher still alive) or ``dead`` (publisher gone)."""
        if not self.publisher_alive:
            return "dead"
        return "closing" if self.closed else "open"

    @property
    def drops(self) -> int:
        """Events dropped, summed over every subscriber that ever attached (as ``bus.dropped``)."""
        return self.retired_drops + sum(s.drops or 0 for s in self.subscribers)


@dataclass(frozen=True)
class BadBus:
    """A ``/dev/shm/shmcast.NAME`` entry that could not be read as a bus."""

    name: str
    error: str


def _slot_version(buf: memoryview, slots: int, stride: int, i: int) -> int | None:
    """Version of ring event *i* if its slot still holds it, complete; else None."""
    off = RING_HEADER_SIZE + (i % slots) * stride
    seq = U64.unpack_from(buf, off)[0]
    if seq != 2 * i + 2:
        return None
    version: int = U64.unpack_from(buf, off + SLOT_BODY_OFF)[0]
    if U64.unpack_from(buf, off)[0] != seq:
        return None
    return version


def _last_read_version(buf: memoryview, slots: int, stride: int, w: int, r: int) -> int | None:
    """The version of the last event the reader consumed, from whatever slot still tells it.

    Under ``overwrite`` every publish goes to every ring, so ring index and
    version differ by a constant and any intact slot gives it; under
    ``drop_new`` the slot of event ``r-1`` or ``r`` is intact whenever it matters.
    """
    if r > 0:
        v = _slot_version(buf, slots, stride, r - 1)
        if v is not None:
            return v
    if r < w:
        v = _slot_version(buf, slots, stride, r)
        if v is not None:
            return v - 1
    if w > 0:
        v = _slot_version(buf, slots, stride, w - 1)
        if v is not None:
            return v - (w - r)
    return None


class RingCounters(NamedTuple):
    """What one ring's header says, plus the lag worked out from its slots."""

    written: int
    read: int
    fill: int
    lag: int | None
    drops: int


def _read_ring(ctrl: ReadOnlySegment, g: Geometry, ring: str, ring_id: int, slots: int,
               ) -> RingCounters | str:
    """Counters of one ring, mapped read-only, or why it cannot be read."""
    try:
        seg = open_readonly(ring, RING_HEADER_SIZE)
    except FileNotFoundError:
        return "ring gone"
    except (OSError, ShmcastError) as e:
        return describe_error(e)
    with seg:
        try:
            check_ring_header(seg.buf, seg.size, slots=slots, slot_size=g.slot_size,
                              nonce=g.nonce, ring_id=ring_id)
        except ShmcastError as e:
            return str(e)
        buf = seg.buf
        stride = slot_stride(g.slot_size)
        last: int | None = None
        for _ in range(5):  # the publisher may lap the slots we look at: try again
            w = U64.unpack_from(buf, W_OFF)[0]
            rejected = U64.unpack_from(buf, REJECTED_OFF)[0]
            r, delivered = TWO_U64.unpack_from(buf, R_OFF)
            r = min(r, w)
            if w == 0:
                break
            last = _last_read_version(buf, slots, stride, w, r)
            if last is not None:
                break
        version = U64.unpack_from(ctrl.buf, VERSION_OFF)[0]
        lag = 0 if w == 0 else None if last is None else max(0, version - last)
        return RingCounters(
            written=w,
            read=r,
            fill=max(0, min(w - r, slots)),
            lag=lag,
            drops=ring_drops(w=w, rejected=rejected, r=r, delivered=delivered, slots=slots,
                             overwrite=Overflow.from_code(g.overflow) is Overflow.OVERWRITE),
        )


def _overflow_name(code: int) -> str:
    policy = Overflow.from_code(code)
    return policy.value if policy is not None else f"unknown ({code})"


def _bus_bytes(name: str, nonce: int, ctrl_size: int, rings: dict[tuple[str, int, int], RingFile],
               ) -> int:
    return ctrl_size + sum(rf.size for key, rf in rings.items()
                           if key[0] == name and key[1] == nonce)


def _publisher_bytes(name: str, nonce: int, max_publishers: int) -> int:
    total = 0
    for place in range(max_publishers):
        with contextlib.suppress(OSError):
            total += os.lstat(shm_path(inbox_name(name, nonce, place))).st_size
    if max_publishers:
        with contextlib.suppress(OSError):
            total += os.lstat(shm_path("sem." + drain_name(name, nonce).lstrip("/"))).st_size
    return total


def _read_inbox(g: Geometry, name: str, place: int) -> tuple[int, int, int] | str:
    """(w, rejected, r) of a publisher place's inbox, read-only, or why it cannot be read."""
    try:
        seg = open_readonly(inbox_name(name, g.nonce, place), RING_HEADER_SIZE)
    except FileNotFoundError:
        return "inbox gone"
    except (OSError, ShmcastError) as e:
        return describe_error(e)
    with seg:
        try:
            check_ring_header(seg.buf, seg.size, slots=g.slots, slot_size=g.slot_size,
                              nonce=g.nonce, ring_id=place)
        except ShmcastError as e:
            return str(e)
        w = U64.unpack_from(seg.buf, W_OFF)[0]
        rejected = U64.unpack_from(seg.buf, REJECTED_OFF)[0]
        r = U64.unpack_from(seg.buf, R_OFF)[0]
        return w, rejected, r


def _read_publishers(ctrl: ReadOnlySegment, g: Geometry, name: str, every_place: bool,
                     ) -> tuple[int, list[PublisherInfo]]:
    """Live publishers and the places to list: held ones and dead ones not yet reused
    (``every_place``: also those whose publisher closed)."""
    live = 0
    out = []
    for place in range(g.max_publishers):
        entry = read_pub_entry(ctrl.buf, g.max_subscribers, place)
        held = _registry.publisher_place_held(ctrl, place)
        if held and entry.state == ENTRY_ACTIVE:
            live += 1
        if entry.state == ENTRY_FREE or not (held or every_place or entry.state != ENTRY_LEFT):
            continue
        counts = _read_inbox(g, name, place)
        extra: dict[str, Any] = {}
        if isinstance(counts, str):
            extra["error"] = counts
        else:
            w, rejected, r = counts
            extra["pending"] = max(0, w - r)
            if entry.state in (ENTRY_ACTIVE, ENTRY_LEFT):  # its baseline is written
                extra["sent"] = max(0, w - entry.w0)
                extra["dropped"] = max(0, rejected - entry.rejected0)
        out.append(PublisherInfo(
            place=place,
            pid=entry.pid,
            state=_ENTRY_STATES.get(entry.state, f"state {entry.state}"),
            alive=held,
            process=process_state(entry.pid) if held else "gone",
            inbox=inbox_name(name, g.nonce, place).lstrip("/"),
            joined=entry.joined,
            **extra,
        ))
    return live, out


def read_bus(name: str, *, every_place: bool = False,
             rings: dict[tuple[str, int, int], RingFile] | None = None) -> BusInfo:
    """Read bus *name* without attaching to it.

    Subscribers listed: every place whose subscriber is alive, plus dead ones
    whose ring is still in /dev/shm (``every_place``: every place ever used).
    Publishers listed: every place held, plus dead ones not yet taken again
    (``every_place``: also those whose publisher closed).

    :raises ValueError: for a bad bus name.
    :raises BusNotFoundError: if there is no such bus.
    :raises PermissionError: if we may not read it.
    :raises ShmcastError: if it is not a shmcast bus of this layout version.
    """
    with open_control(name) as ctrl:
        g = _parse(ctrl)
        st = os.fstat(ctrl.fd)
        alive = _registry.publisher_alive(ctrl)
        closed = U32.unpack_from(ctrl.buf, STATE_OFF)[0] == STATE_CLOSED
        # Before the rings: the publisher adds a ring's drops here, then unlinks it.
        retired = U64.unpack_from(ctrl.buf, RETIRED_OFF)[0]
        if rings is None:
            rings = ring_files()
        subs = []
        live = 0
        for index, entry in _registry.entries(ctrl, g.max_subscribers):
            if not entry.ring_id:
                continue  # never used
            held = _registry.place_held(ctrl, index)
            if held and entry.state == ENTRY_ACTIVE:
                live += 1
            rname = ring_name(name, g.nonce, entry.ring_id)
            present = _exists(rname)
            if not (held or present or every_place):
                continue
            counters: RingCounters | str | None = None
            if present:
                counters = _read_ring(ctrl, g, rname, entry.ring_id, entry.slots)
            extra: dict[str, Any]
            if isinstance(counters, RingCounters):
                extra = counters._asdict()
            else:
                extra = {"error": counters or "ring gone"}
            subs.append(SubscriberInfo(
                index=index,
                pid=entry.pid,
                state=_ENTRY_STATES.get(entry.state, f"state {entry.state}"),
                alive=held,
                process=process_state(entry.pid) if held else "gone",
                ring=rname.lstrip("/"),
                ring_present=present,
                slots=entry.slots,
                joined=entry.joined,
                **extra,
            ))
        live_pubs, pubs = _read_publishers(ctrl, g, name, every_place)
        return BusInfo(
            name=name,
            uid=st.st_uid,
            mode=stat_mod.S_IMODE(st.st_mode),
            pid=g.pid,
            publisher_alive=alive,
            closed=closed,
            nonce=g.nonce,
            codec=g.codec,
            slots=g.slots,
            slot_size=g.slot_size,
            max_subscribers=g.max_subscribers,
            overflow=_overflow_name(g.overflow),
            created=g.created,
            version=U64.unpack_from(ctrl.buf, VERSION_OFF)[0],
            retired_drops=retired,
            live_subscribers=live,
            shm_bytes=_bus_bytes(name, g.nonce, ctrl.size, rings)
            + _publisher_bytes(name, g.nonce, g.max_publishers),
            subscribers=tuple(subs),
            max_publishers=g.max_publishers,
            live_publishers=live_pubs,
            publishers=tuple(pubs),
        )


def read_geometry(name: str) -> Geometry:
    """The header of bus *name* (codec, slots...), read without attaching.

    :raises: as :func:`read_bus`.
    """
    with open_control(name) as ctrl:
        return _parse(ctrl)


def _parse(ctrl: ReadOnlySegment) -> Geometry:
    try:
        return parse_control_header(ctrl.buf, ctrl.size)
    except ShmcastError as e:
        raise ShmcastError(f"{shm_path(ctrl.name)}: {e}") from None


def describe_error(e: BaseException, path: str | None = None) -> str:
    """One line for an error met while reading a bus; *path* is left out if it is the subject."""
    if isinstance(e, OSError) and not isinstance(e, ShmcastError):
        what = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))
        where = e.filename if isinstance(e.filename, str) else None
        return what if where is None or where == path else f"{what}: {where}"
    text = str(e)
    if path is not None and text.startswith(path + ": "):
        text = text[len(path) + 2:]
    return text


def scan(patterns: Sequence[str] = ()) -> list[BusInfo | BadBus]:
    """Every bus on the host matching *patterns*, sorted by name; unreadable ones as BadBus."""
    entries = list_shm()
    rings = ring_files(entries)
    out: list[BusInfo | BadBus] = []
    for name in bus_names(patterns, entries):
        try:
            out.append(read_bus(name, rings=rings))
        except BusNotFoundError:
            continue  # gone since the listing
        except (OSError, ShmcastError, ValueError) as e:
            out.append(BadBus(name, describe_error(e, shm_path(control_name(name)))))
    return out


# --------------------------------------------------------------------------- cleaning


__all__ = [
    "BadBus",
    "BusInfo",
    "PublisherInfo",
    "RingCounters",
    "RingFile",
    "SubscriberInfo",
    "bus_names",
    "check_patterns",
    "describe_error",
    "matches",
    "open_control",
    "read_bus",
    "read_geometry",
    "ring_files",
    "scan",
]
