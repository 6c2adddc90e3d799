"""``shmcast clean``: remove what dead publishers and subscribers left in /dev/shm.

:func:`plan_clean` decides and changes nothing; :func:`clean` carries a plan
out, re-checking each action just before. They remove the names of buses
whose publisher is dead (through :func:`shmcast._registry.reclaim_dead_bus`,
the same code a new publisher of that name runs), of rings whose subscriber
is dead, and of orphans that no live bus refers to and no process has open
or mapped: rings, and the publisher inboxes and drain semaphore of a bus
whose control segment is gone or belongs to a newer bus of that name.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import _ipc, _registry
from ._errors import ShmcastError
from ._inspect import RingFile, bus_names, describe_error, matches, ring_files
from ._ipc import SHM_DIR, list_shm, open_readonly, shm_path, shm_users
from ._layout import CONTROL_HEADER_SIZE, Geometry, parse_control_header
from ._names import PREFIX, control_name, drain_name, inbox_name, ring_name

# A control segment whose header is still all zeros may be a bus being created
# (the publisher writes the header right after it takes its lock): only one
# older than this is taken for the remains of a publisher that died creating it.
CREATION_GRACE = 5.0

# The objects a bus with max_publishers > 0 creates besides its control segment
# (see _names.inbox_name and drain_name): one inbox per place, one drain semaphore.
_INBOX_RE = re.compile(r"shmcast\.([A-Za-z0-9_-]{1,64})\.([0-9a-f]{16})\.inbox([0-9]{1,5})")
_DRAIN_RE = re.compile(r"sem\.shmcast\.([A-Za-z0-9_-]{1,64})\.([0-9a-f]{16})\.drain")


@dataclass(frozen=True)
class CleanAction:
    """One thing ``clean`` removes (or, for ``kind == "keep"``, deliberately leaves)."""

    kind: str  # "bus", "ring", "orphan", "inboxes" or "keep"
    bus: str
    files: tuple[str, ...]  # /dev/shm entries concerned
    reason: str
    nonce: int = 0
    ring_id: int = 0
    rings: tuple[RingFile, ...] = ()  # for "bus": dead subscribers' rings removed with it
    inboxes: bool = False  # about a bus's publisher inboxes and drain semaphore


def ring_name_of(action: CleanAction) -> str:
    """The /dev/shm name of the ring a ``ring``, ``orphan`` or ``keep`` action is about."""
    return ring_name(action.bus, action.nonce, action.ring_id).lstrip("/")


def subject_of(action: CleanAction) -> str:
    """What an action other than ``bus`` is about, as /dev/shm names."""
    if action.inboxes:
        return ", ".join(action.files)
    return ring_name_of(action) if action.ring_id else action.files[0]


@dataclass(frozen=True)
class _PublisherFiles:
    """The inboxes and drain semaphore in /dev/shm of one bus (name and nonce)."""

    files: tuple[str, ...]
    owned: bool  # every one belongs to us (or we are root)


def _publisher_files(entries: Iterable[str], patterns: Sequence[str],
                     ) -> dict[tuple[str, int], _PublisherFiles]:
    """Every publisher inbox or drain semaphore in *entries*, by ``(bus, nonce)``."""
    found: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for entry in entries:
        m = _INBOX_RE.fullmatch(entry) or _DRAIN_RE.fullmatch(entry)
        if not m or not matches(m.group(1), patterns):
            continue
        try:
            uid = os.lstat(os.path.join(SHM_DIR, entry)).st_uid
        except FileNotFoundError:
            continue
        found.setdefault((m.group(1), int(m.group(2), 16)), []).append((entry, uid))
    return {key: _PublisherFiles(tuple(sorted(e for e, _ in items)),
                                 all(_owned(uid) for _, uid in items))
            for key, items in found.items()}


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
    * orphan publisher inboxes and drain semaphore (no control segment of their
      nonce) that no process has open or mapped.

    Only objects owned by the calling user are considered (every one for root).
    """
    entries = list_shm()  # rings listed before registries are read: see below
    rings = {k: v for k, v in ring_files(entries).items() if matches(k[0], patterns)}
    # Likewise inboxes: a bus creates them after its header, so one listed here
    # belongs to a header that is written by the time we read it.
    inboxes = _publisher_files(entries, patterns)
    # Rings some registry entry refers to: they are decided by that entry's lock,
    # not by the orphan rule. (A subscriber writes its entry before it creates
    # its ring, so a ring listed above has its entry written by the time we read.)
    referenced: set[tuple[str, int, int]] = set()
    actions: list[CleanAction] = []
    live_nonce: dict[str, int] = {}  # buses that stay
    dead: set[str] = set()  # buses removed by this plan
    dead_nonce: dict[str, int] = {}  # their nonces: reclaiming them removes their inboxes
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
            for index, entry in _registry.entries(ctrl, g.max_subscribers):
                # The entry before its lock: if the lock is free after we read a
                # ring id there, that ring's owner is gone (a newcomer writes a new id).
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
                dead_nonce[name] = g.nonce
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
        else:
            why = _orphan_why(rf.bus, live_nonce, dead)
        if pids:
            actions.append(CleanAction(
                "keep", rf.bus, rf.files,
                f"orphan ({why}) but in use by pid {', '.join(map(str, pids))}",
                nonce=rf.nonce, ring_id=rf.ring_id))
        else:
            actions.append(CleanAction("orphan", rf.bus, rf.files, f"{why}; nobody uses it",
                                       nonce=rf.nonce, ring_id=rf.ring_id))
    actions.extend(_plan_inboxes(inboxes, live_nonce, dead_nonce, hands_off))
    return actions


def _orphan_why(bus: str, live_nonce: dict[str, int], dead: Iterable[str]) -> str:
    """Why an object of bus *bus* with no live bus of its nonce is an orphan."""
    if bus in live_nonce:
        return "it belongs to an older bus of that name"
    return "its bus is dead" if bus in dead else "its bus is gone"


def _plan_inboxes(inboxes: dict[tuple[str, int], _PublisherFiles], live_nonce: dict[str, int],
                  dead_nonce: dict[str, int], hands_off: set[str]) -> list[CleanAction]:
    """Orphan publisher inboxes and drain semaphores: no bus of their nonce is there.

    A live bus's are its own, whatever holds its places; a dead bus's go with it
    (``reclaim_dead_bus``); the rest were left by a bus whose control segment
    was removed without them. Any of them still open or mapped is left alone.
    """
    candidates = {key: pf for key, pf in sorted(inboxes.items())
                  if pf.owned and key[0] not in hands_off
                  and key[1] not in (live_nonce.get(key[0]), dead_nonce.get(key[0]))}
    users = shm_users(os.path.join(SHM_DIR, f) for pf in candidates.values() for f in pf.files)
    actions = []
    for (bus, nonce), pf in candidates.items():
        why = _orphan_why(bus, live_nonce, dead_nonce)
        pids = sorted({pid for f in pf.files for pid in users[os.path.join(SHM_DIR, f)]})
        if pids:
            actions.append(CleanAction(
                "keep", bus, pf.files,
                f"orphan publisher inboxes ({why}) but in use by pid {', '.join(map(str, pids))}",
                nonce=nonce, inboxes=True))
        else:
            actions.append(CleanAction("inboxes", bus, pf.files, f"{why}; nobody uses them",
                                       nonce=nonce, inboxes=True))
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
        for index, entry in _registry.entries(ctrl, g.max_subscribers):
            # The entry before its lock: if the lock is free after we read our
            # ring id there, that ring's owner is gone (a newcomer writes a new id).
            if entry.ring_id == action.ring_id:
                return not _registry.place_held(ctrl, index)
    return False


def _still_orphan(action: CleanAction) -> bool:
    """Re-check an orphan: no registry of its bus refers to it (for inboxes: no bus of
    their nonce is there, and their nonce never comes back), nobody has it open or mapped."""
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
            if g.nonce == action.nonce and (action.inboxes or any(
                    entry.ring_id == action.ring_id
                    for _, entry in _registry.entries(ctrl, g.max_subscribers))):
                return False
    paths = [os.path.join(SHM_DIR, f) for f in action.files]
    return not any(shm_users(paths).values())


def _unlink_inboxes(action: CleanAction) -> None:
    """Remove exactly the inboxes and drain semaphore the action names."""
    for entry in action.files:
        m = _INBOX_RE.fullmatch(entry)
        if m:
            _ipc.unlink_segment(inbox_name(action.bus, action.nonce, int(m.group(3))))
        elif _DRAIN_RE.fullmatch(entry):
            _ipc.unlink_semaphore(drain_name(action.bus, action.nonce))


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
                if action.inboxes:
                    _unlink_inboxes(action)
                else:
                    _registry.unlink_ring(action.bus, action.nonce, action.ring_id)
                results.append((action, "removed", ""))
            else:
                results.append((action, "skipped", "no longer an unused orphan"))
        except (OSError, ShmcastError) as e:
            results.append((action, "failed", describe_error(e)))
    return results


__all__ = ["CREATION_GRACE", "CleanAction", "clean", "plan_clean", "ring_name_of", "subject_of"]
