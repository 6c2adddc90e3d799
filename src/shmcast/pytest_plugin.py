"""pytest plugin (registered as ``pytest11``): a bus per test and a /dev/shm leak check.

``shmcast_bus`` gives each test a :class:`~shmcast.Bus` with a unique name (safe
under pytest-xdist), closed after the test and checked for leaks.
``shmcast_leak_check`` fails a test that leaves in /dev/shm anything of a bus
this process created or subscribed to during the test (including rings left
by the worker processes it started). Buses of other processes, such as other
xdist workers, are never blamed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from . import _names
from ._bus import Bus

_SHM = "/dev/shm"


def _shmcast_entries() -> set[str]:
    try:
        return {e for e in os.listdir(_SHM) if "shmcast." in e}
    except FileNotFoundError:
        return set()


def _bus_of(entry: str) -> str:
    return entry.split("shmcast.", 1)[1].split(".", 1)[0]


@pytest.fixture
def shmcast_bus_name() -> str:
    """A bus name unique to this test, worker and process."""
    return f"pytest-{os.getpid()}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def shmcast_bus(shmcast_bus_name: str, shmcast_leak_check: None) -> Iterator[Bus]:
    """A fresh bus for this test, closed when it ends (its name is ``bus.name``)."""
    bus = Bus(shmcast_bus_name)
    try:
        yield bus
    finally:
        bus.close()


@pytest.fixture
def shmcast_leak_check() -> Iterator[None]:
    """Fail the test if it leaves new shmcast objects in /dev/shm."""
    before = _shmcast_entries()
    outer = _names.touched
    ours: set[str] = set()
    _names.touched = ours
    try:
        yield
    finally:
        _names.touched = outer
        if outer is not None:
            outer |= ours
    leaked = sorted(e for e in _shmcast_entries() - before if _bus_of(e) in ours)
    if leaked:
        pytest.fail(f"test left shmcast objects in {_SHM}: {leaked}", pytrace=False)


__all__ = ["shmcast_bus", "shmcast_bus_name", "shmcast_leak_check"]
