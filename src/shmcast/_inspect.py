"""Reading buses from outside, without attaching: what ``shmcast ls``, ``stat`` and ``clean`` need.

Nothing here registers a subscriber, takes a lock or writes a byte of a bus
it reads: segments are opened ``O_RDONLY`` and mapped ``PROT_READ``, and
liveness is asked of the kernel with ``F_OFD_GETLK``, which reports a lock
without taking one. (The publisher holds lock byte 0 of the control segment
for the bus's life; each subscriber holds the lock byte of its registry place;
the kernel drops both when their holder dies.)

:func:`plan_clean` and :func:`clean` are the only writers: they remove the
names of buses whose publisher is dead (through
:func:`shmcast._registry.reclaim_dead_bus`, the same code a new publisher of
that name runs), of rings whose subscriber is dead, and of orphan rings that
no live bus refers to and no process has open or mapped.
"""

from __future__ import annotations

import contextlib
import fnmatch
import mmap
import os
import re
import stat as stat_mod
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import _ipc, _registry
from ._errors import BusNotFoundError, ShmcastError
from ._layout import (
    CONTROL_HEADER_SIZE,
    ENTRY_ACTIVE,
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
    read_entry,
    slot_stride,
)
from ._names import PREFIX, check_name, control_name, ring_name
from ._ring import Overflow
from ._ring import drops as ring_drops

SHM_DIR = "/dev/shm"
_BUS_RE = re.compile(r"shmcast\.([A-Za-z0-9_-]{1,64})")
_RING_RE = re.compile(r"(sem\.)?shmcast\.([A-Za-z0-9_-]{1,64})\.([0-9a-f]{16})\.([0-9a-f]{16})")
_GLOB_CHARS = frozenset("*?[")

# A control segment whose header is still all zeros may be a bus being created
# (the publisher writes the header right after it takes its lock): only one
# older than this is taken for the remains of a publisher that died creating it.
CREATION_GRACE = 5.0

_ENTRY_STATES = {ENTRY_JOINING: "joining", ENTRY_ACTIVE: "active", ENTRY_LEFT: "left"}


# --------------------------------------------------------------------------- read-only segments


class ReadOnlySegment(_ipc.Segment):
    """A segment opened ``O_RDONLY`` and mapped ``PROT_READ``: it can only be looked at.

    The OFD lock queries of :mod:`shmcast._registry` work on it (``F_OFD_GETLK``
    needs no write access); taking a lock does not, by design.
    """

    __slots__ = ()

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.fd = fd
        self.size = size
        self.closed = False
        self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self.buf = memoryview(self._mmap)

    def __enter__(self) -> ReadOnlySegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shm_path(posix_name: str) -> str:
    """The /dev/shm path of a POSIX shared-memory name: ``/shmcast.x`` -> ``/dev/shm/shmcast.x``."""
    return SHM_DIR + "/" + posix_name.lstrip("/")


def open_readonly(posix_name: str, min_size: int = 1) -> ReadOnlySegment:
    """Open and map an existing segment read-only.

    :raises FileNotFoundError: if there is no such segment.
    :raises PermissionError: if we may not read it.
    :raises ShmcastError: if it is not a regular file or smaller than *min_size*.
    """
    path = shm_path(posix_name)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise ShmcastError(f"{path}: not a shared-memory segment")
        if st.st_size < min_size:
            raise ShmcastError(
                f"{path}: not a shmcast segment: {st.st_size} bytes, at least {min_size} expected"
            )
        return ReadOnlySegment(posix_name, fd, st.st_size)
    except BaseException:
        os.close(fd)
        raise


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


def _listdir() -> list[str]:
    try:
        return os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []


def bus_names(patterns: Sequence[str] = (), entries: Iterable[str] | None = None) -> list[str]:
    """Names of the buses on this host (``/dev/shm/shmcast.NAME``), sorted, matching *patterns*."""
    names = []
    for entry in _listdir() if entries is None else entries:
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
    for entry in _listdir() if entries is None else entries:
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


# --------------------------------------------------------------------------- processes


def process_state(pid: int) -> str:
    """What /proc says of *pid*: ``running``, ``stopped``, ``zombie`` or ``gone``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            letter = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    if letter in (b"T", b"t"):
        return "stopped"
    if letter in (b"Z", b"X"):
        return "zombie"
    return "running"


def shm_users(paths: Iterable[str]) -> dict[str, set[int]]:
    """Which processes have each of *paths* (under /dev/shm) open or mapped.

    Reads ``/proc/PID/maps`` and ``/proc/PID/fd`` of every process we may read
    (all of them for root, our own otherwise).
    """
    wanted = set(paths)
    users: dict[str, set[int]] = {p: set() for p in wanted}
    if not wanted:
        return users
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return users
    for pid in pids:
        if pid == me:
            continue
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps", "rb") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6:
                    path = parts[5].rstrip(b"\n").decode(errors="replace")
                    if path in wanted:
                        users[path].add(pid)
        with contextlib.suppress(OSError):
            fd_dir = f"/proc/{pid}/fd"
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"{fd_dir}/{fd}")
                    if target in wanted:
                        users[target].add(pid)
    return users


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


def read_bus(name: str, *, every_place: bool = False,
             rings: dict[tuple[str, int, int], RingFile] | None = None) -> BusInfo:
    """Read bus *name* without attaching to it.

    Subscribers listed: every place whose subscriber is alive, plus dead ones
    whose ring is still in /dev/shm (``every_place``: every place ever used).

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
        for index in range(g.max_subscribers):
            entry = read_entry(ctrl.buf, index)
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
            shm_bytes=_bus_bytes(name, g.nonce, ctrl.size, rings),
            subscribers=tuple(subs),
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
    entries = _listdir()
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


@dataclass(frozen=True)
class CleanAction:
    """One thing ``clean`` removes (or, for ``kind == "keep"``, deliberately leaves)."""

    kind: str  # "bus", "ring", "orphan" or "keep"
    bus: str
    files: tuple[str, ...]  # /dev/shm entries concerned
    reason: str
    nonce: int = 0
    ring_id: int = 0
    rings: tuple[RingFile, ...] = ()  # for "bus": dead subscribers' rings removed with it


def ring_name_of(action: CleanAction) -> str:
    """The /dev/shm name of the ring a ``ring``, ``orphan`` or ``keep`` action is about."""
    return ring_name(action.bus, action.nonce, action.ring_id).lstrip("/")


def _owned(uid: int) -> bool:
    return os.geteuid() in (0, uid)


def _control_files(name: str) -> tuple[str, ...]:
    return (PREFIX + name,)


def plan_clean(patterns: Sequence[str] = ()) -> list[CleanAction]:
    """What ``clean`` would do now for the buses matching *patterns*; changes nothing.

    * a bus whose publisher is dead: its control segment and its dead
      subscribers' rings (rings of live subscribers are theirs to remove);
    * on a live bus, the ring of a place whose subscriber is dead;
    * an orphan ring (no control segment of its bus with its nonce refers to
      it) that no process has open or mapped.

    Only objects owned by the calling user are considered (every one for root).
    """
    entries = _listdir()  # rings listed before registries are read: see below
    rings = {k: v for k, v in ring_files(entries).items() if matches(k[0], patterns)}
    # Rings some registry entry refers to: they are decided by that entry's lock,
    # not by the orphan rule. (A subscriber writes its entry before it creates
    # its ring, so a ring listed above has its entry written by the time we read.)
    referenced: set[tuple[str, int, int]] = set()
    actions: list[CleanAction] = []
    live_nonce: dict[str, int] = {}  # buses that stay
    dead: set[str] = set()  # buses removed by this plan
    hands_off: set[str] = set()  # names whose control segment we cannot judge

    for name in bus_names(patterns, entries):
        path = shm_path(control_name(name))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not _owned(st.st_uid):
            hands_off.add(name)
            continue
        try:
            ctrl = open_readonly(control_name(name))
        except FileNotFoundError:
            continue
        except (OSError, ShmcastError) as e:
            hands_off.add(name)
            actions.append(CleanAction("keep", name, _control_files(name),
                                       describe_error(e, path)))
            continue
        with ctrl:
            alive = _registry.publisher_alive(ctrl)
            try:
                g: Geometry | None = parse_control_header(ctrl.buf, ctrl.size)
            except ShmcastError:
                g = None
            if g is None:
                hands_off.add(name)
                empty = bytes(ctrl.buf[:8]) == b"\x00" * 8
                age = time.time() - max(st.st_mtime, st.st_ctime)
                if not alive and empty and age > CREATION_GRACE:
                    actions.append(CleanAction(
                        "bus", name, _control_files(name),
                        "its publisher died while creating it (empty header)"))
                else:
                    actions.append(CleanAction(
                        "keep", name, _control_files(name),
                        "being created" if empty else
                        "not a shmcast bus this version of shmcast understands"))
                continue
            dead_rings = []
            for index in range(g.max_subscribers):
                # The entry before its lock: if the lock is free after we read a
                # ring id there, that ring's owner is gone (a newcomer writes a new id).
                entry = read_entry(ctrl.buf, index)
                if not entry.ring_id:
                    continue
                key = (name, g.nonce, entry.ring_id)
                held = _registry.place_held(ctrl, index)
                if key not in rings:
                    continue
                if alive:
                    referenced.add(key)
                    if not held:
                        actions.append(CleanAction(
                            "ring", name, rings[key].files,
                            f"its subscriber (pid {entry.pid}) is dead", nonce=g.nonce,
                            ring_id=entry.ring_id))
                elif not held:
                    dead_rings.append(rings[key])
            if alive:
                live_nonce[name] = g.nonce
            else:
                dead.add(name)
                # Removed with the bus. Its live subscribers' rings stay theirs:
                # below they are orphans in use, which are left alone.
                actions.append(CleanAction(
                    "bus", name, _control_files(name),
                    f"its publisher (pid {g.pid}) is dead", nonce=g.nonce,
                    rings=tuple(dead_rings)))

    with_buses = {rf for a in actions if a.kind == "bus" for rf in a.rings}
    candidates = [rf for key, rf in sorted(rings.items())
                  if key not in referenced and key[0] not in hands_off and _owned(rf.uid)
                  and rf not in with_buses]
    users = shm_users(os.path.join(SHM_DIR, f) for rf in candidates for f in rf.files)
    for rf in candidates:
        pids = sorted({pid for f in rf.files for pid in users[os.path.join(SHM_DIR, f)]})
        if live_nonce.get(rf.bus) == rf.nonce:
            why = "no registry entry refers to it"
        elif rf.bus in live_nonce:
            why = "it belongs to an older bus of that name"
        elif rf.bus in dead:
            why = "its bus is dead"
        else:
            why = "its bus is gone"
        if pids:
            actions.append(CleanAction(
                "keep", rf.bus, rf.files,
                f"orphan ({why}) but in use by pid {', '.join(map(str, pids))}",
                nonce=rf.nonce, ring_id=rf.ring_id))
        else:
            actions.append(CleanAction("orphan", rf.bus, rf.files, f"{why}; nobody uses it",
                                       nonce=rf.nonce, ring_id=rf.ring_id))
    return actions


def _still_dead_ring(action: CleanAction) -> bool:
    """Re-check, just before removing it, that a live bus's ring belongs to a dead subscriber."""
    try:
        ctrl = open_readonly(control_name(action.bus), CONTROL_HEADER_SIZE)
    except (OSError, ShmcastError):
        return False
    with ctrl:
        try:
            g = parse_control_header(ctrl.buf, ctrl.size)
        except ShmcastError:
            return False
        if g.nonce != action.nonce:
            return False
        for index in range(g.max_subscribers):
            # The entry before its lock: if the lock is free after we read our
            # ring id there, that ring's owner is gone (a newcomer writes a new id).
            if read_entry(ctrl.buf, index).ring_id == action.ring_id:
                return not _registry.place_held(ctrl, index)
    return False


def _still_orphan(action: CleanAction) -> bool:
    """Re-check an orphan: no registry of its bus refers to it, nobody has it open or mapped."""
    try:
        ctrl = open_readonly(control_name(action.bus), CONTROL_HEADER_SIZE)
    except FileNotFoundError:
        pass
    except (OSError, ShmcastError):
        return False
    else:
        with ctrl:
            try:
                g = parse_control_header(ctrl.buf, ctrl.size)
            except ShmcastError:
                return False
            if g.nonce == action.nonce and any(
                    read_entry(ctrl.buf, index).ring_id == action.ring_id
                    for index in range(g.max_subscribers)):
                return False
    paths = [os.path.join(SHM_DIR, f) for f in action.files]
    return not any(shm_users(paths).values())


def clean(actions: Iterable[CleanAction]) -> list[tuple[CleanAction, str, str]]:
    """Carry out *actions* from :func:`plan_clean`, re-checking each one just before.

    :returns: each action (but ``keep``) with its outcome, ``"removed"``,
        ``"skipped"`` (it no longer qualifies) or ``"failed"``, and a note.
    """
    results: list[tuple[CleanAction, str, str]] = []
    for action in actions:
        if action.kind == "keep":
            continue
        try:
            if action.kind == "bus":
                try:
                    ctrl = _ipc.Segment.open(control_name(action.bus))
                except FileNotFoundError:
                    results.append((action, "skipped", "already gone"))
                    continue
                try:
                    done = _registry.reclaim_dead_bus(ctrl, action.bus)
                finally:
                    ctrl.close()
                results.append((action, "removed", "") if done else
                               (action, "skipped", "its publisher is alive"))
            elif action.kind == "ring":
                if _still_dead_ring(action):
                    _registry.unlink_ring(action.bus, action.nonce, action.ring_id)
                    results.append((action, "removed", ""))
                else:
                    results.append((action, "skipped", "no longer a dead subscriber's ring"))
            elif _still_orphan(action):
                _registry.unlink_ring(action.bus, action.nonce, action.ring_id)
                results.append((action, "removed", ""))
            else:
                results.append((action, "skipped", "no longer an unused orphan"))
        except (OSError, ShmcastError) as e:
            results.append((action, "failed", describe_error(e)))
    return results


__all__ = [
    "BadBus",
    "BusInfo",
    "CleanAction",
    "ReadOnlySegment",
    "RingCounters",
    "RingFile",
    "SubscriberInfo",
    "bus_names",
    "check_patterns",
    "clean",
    "describe_error",
    "matches",
    "open_control",
    "open_readonly",
    "plan_clean",
    "process_state",
    "read_bus",
    "read_geometry",
    "ring_name_of",
    "ring_files",
    "scan",
    "shm_users",
]
