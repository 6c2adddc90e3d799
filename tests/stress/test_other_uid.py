"""Other users: under the default mode 0600 another uid cannot attach; under 0666 it can,
once it says whose bus it trusts (``subscribe(name, owner=uid)``; without it, a
``BusPermissionError`` before a byte of the segment is read).

The venv's interpreter lives under /root, so an unprivileged user cannot exec
it. Instead each test forks, and the child drops to an unprivileged uid with
``os.setgid``/``os.setuid`` in the interpreter that already imported shmcast,
then tries ``shmcast.subscribe``. The child reports through its exit code,
which the test asserts; the parent (root) kills and reaps it by pid and
removes what an unprivileged child may have left (root may unlink anything).

Needs root (to change uid); skipped otherwise.
"""

from __future__ import annotations

import os
import signal
import stat
import time

import pytest
from _stress_helpers import (
    DEV_SHM,
    Children,
    bus_entries,
    remove_bus_entries,
    stop_self,
    wait_stopped,
    wait_until,
)

from shmcast import Bus, BusPermissionError, ShmcastError, subscribe

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings(r"ignore:This process \(pid=\d+\) is multi-threaded"),
    pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root"),
]

NOBODY = 65534  # the subscriber's uid
OTHER = 65533  # a second unprivileged uid, for a publisher that is not root

# Child exit codes.
REFUSED_CLEARLY = 0
ATTACHED = 2
UNCLEAR = 3
WRONG = 4


def _become(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    assert (os.getuid(), os.geteuid(), os.getgid()) == (uid, uid, uid)


def _try_to_attach(name: str) -> int:
    """Child: as another uid, subscribe to a bus of mode 0600."""
    _become(NOBODY)
    try:
        sub = subscribe(name)
    except PermissionError as exc:  # what a stdlib user would catch for EACCES
        return REFUSED_CLEARLY if name in str(exc) or "ermission" in str(exc) else UNCLEAR
    except ShmcastError as exc:
        return REFUSED_CLEARLY if "ermission" in str(exc) else UNCLEAR
    sub.unsubscribe()
    return ATTACHED


def test_other_uid_cannot_attach_under_default_mode(bus_name):
    with Children() as kids:
        try:
            with Bus(bus_name) as bus:
                control = os.stat(os.path.join(DEV_SHM, f"shmcast.{bus_name}"))
                assert stat.S_IMODE(control.st_mode) == 0o600
                pid = kids.fork(lambda: _try_to_attach(bus_name))
                assert kids.reap(pid) == REFUSED_CLEARLY
                # It left nothing (it never got as far as creating a ring) and changed nothing.
                assert bus_entries(bus_name) == [f"shmcast.{bus_name}"]
                assert bus.subscriber_count == 0
                assert bus.publish("e", 1) == 1
            assert bus_entries(bus_name) == []
        finally:
            remove_bus_entries(bus_name)


def _subscriber_as(uid: int, name: str, events: int, owner: int) -> int:
    """Child: as *uid*, subscribe to *owner*'s bus, stop (the test checks the ring), read
    *events*, leave. Without ``owner=`` the subscription must be refused first."""
    _become(uid)
    try:
        subscribe(name).unsubscribe()
    except BusPermissionError as exc:
        if f"uid {owner}" not in str(exc):
            return UNCLEAR
    else:
        return WRONG  # attached to another user's bus without saying it trusts them
    sub = subscribe(name, owner=owner)
    stop_self()
    got = [sub.get(timeout=10).payload for _ in range(events)]
    if got != list(range(1, events + 1)):
        return WRONG
    sub.unsubscribe()
    return 0


def _ring_entries(name: str) -> list[str]:
    return [e for e in bus_entries(name) if e != f"shmcast.{name}"]


def test_mode_0666_lets_another_uid_attach_to_a_root_publisher(bus_name):
    with Children() as kids:
        try:
            with Bus(bus_name, mode=0o666) as bus:
                pid = kids.fork(lambda: _subscriber_as(NOBODY, bus_name, 3, os.geteuid()))
                wait_stopped(pid)
                assert bus.subscriber_count == 1
                rings = _ring_entries(bus_name)
                assert len(rings) == 2  # its ring segment and its semaphore
                for entry in rings:
                    st = os.stat(os.path.join(DEV_SHM, entry))
                    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o666), entry
                for v in (1, 2, 3):
                    assert bus.publish("e", v) == v
                assert len(bus._core.rings) == 1  # the publisher adopted the ring
                os.kill(pid, signal.SIGCONT)
                assert kids.reap(pid) == 0
                assert bus.subscriber_count == 0
                assert bus.dropped == 0
            assert bus_entries(bus_name) == []
        finally:
            remove_bus_entries(bus_name)


def _publisher_as(uid: int, name: str, ready: int, go: int, events: int) -> int:
    """Child: as *uid*, create a 0666 bus, wait for the word, publish *events*, close."""
    _become(uid)
    with Bus(name, mode=0o666) as bus:
        os.write(ready, b"r")
        os.read(go, 1)
        for v in range(1, events + 1):
            bus.publish("e", v)
        os.write(ready, b"p")
        os.read(go, 1)  # the subscriber read everything and left
        if bus.subscriber_count != 0 or bus.dropped != 0:
            return WRONG
    return 0


def _read_byte(fd: int, timeout: float = 10.0) -> bytes:
    import select

    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, f"no word from the child within {timeout}s"
    return os.read(fd, 1)


def test_mode_0666_between_two_unprivileged_uids(bus_name):
    """Neither side is root: the publisher (uid OTHER) can open the ring nobody created."""
    r_ready, w_ready = os.pipe()
    r_go, w_go = os.pipe()
    with Children() as kids:
        try:
            pub = kids.fork(lambda: _publisher_as(OTHER, bus_name, w_ready, r_go, 3))
            assert _read_byte(r_ready) == b"r"
            sub = kids.fork(lambda: _subscriber_as(NOBODY, bus_name, 3, OTHER))
            wait_stopped(sub)
            os.write(w_go, b"g")
            assert _read_byte(r_ready) == b"p"
            os.kill(sub, signal.SIGCONT)
            assert kids.reap(sub) == 0
            os.write(w_go, b"g")
            assert kids.reap(pub) == 0
            assert bus_entries(bus_name) == []
        finally:
            for fd in (r_ready, w_ready, r_go, w_go):
                os.close(fd)
            remove_bus_entries(bus_name)


def _publisher_outliving_a_foreign_subscriber(name: str, ready: int, go: int) -> int:
    """Child: as uid OTHER, a 0666 bus whose subscriber (uid nobody) is SIGKILLed."""
    _become(OTHER)
    bus = Bus(name, mode=0o666)
    os.write(ready, b"r")
    os.read(go, 1)  # the subscriber is dead
    deadline = time.monotonic() + 1.0  # four liveness scans
    while time.monotonic() < deadline:
        bus.publish("e", 1)  # must not raise
        time.sleep(0.01)
    if bus.subscriber_count != 0:
        return WRONG
    bus.close()  # must not raise either
    return 0


def test_publisher_survives_the_death_of_another_uids_subscriber(bus_name):
    r_ready, w_ready = os.pipe()
    r_go, w_go = os.pipe()
    with Children() as kids:
        try:
            pub = kids.fork(lambda: _publisher_outliving_a_foreign_subscriber(
                bus_name, w_ready, r_go))
            assert _read_byte(r_ready) == b"r"
            sub = kids.fork(lambda: _subscriber_as(NOBODY, bus_name, 1, OTHER))
            wait_stopped(sub)
            wait_until(lambda: len(_ring_entries(bus_name)) == 2, 5, "the ring created")
            assert kids.kill(sub) == -signal.SIGKILL
            os.write(w_go, b"g")
            assert kids.reap(pub) == 0
            # The dead subscriber's ring may stay (only its owner or root may unlink it
            # from sticky /dev/shm); the control segment must not.
            assert f"shmcast.{bus_name}" not in bus_entries(bus_name)
        finally:
            for fd in (r_ready, w_ready, r_go, w_go):
                os.close(fd)
            remove_bus_entries(bus_name)
