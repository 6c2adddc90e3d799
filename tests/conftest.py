"""Fixtures for the whole suite: a unique bus name per test and a /dev/shm leak check."""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Iterator

import pytest

SHM = "/dev/shm"


def _ours(tag: str) -> set[str]:
    return {entry for entry in os.listdir(SHM) if tag in entry}


@pytest.fixture
def bus_name() -> str:
    """A bus name no other test (or xdist worker) uses."""
    return f"t{os.getpid()}-{uuid.uuid4().hex[:12]}"


_GLIBC_TEMP = re.compile(r"sem\.[A-Za-z0-9]{6}")


def _glibc_temps() -> set[str]:
    return {entry for entry in os.listdir(SHM) if _GLIBC_TEMP.fullmatch(entry)}


@pytest.fixture(autouse=True)
def _glibc_sem_temp_cleanup() -> Iterator[None]:
    """Remove the glibc temporaries our kill tests leave (see docs/design.md, "Crashes").

    sem_open creates ``sem.XXXXXX`` and links it to its name: a process SIGKILLed
    in between leaves the temporary. Only files that appeared during this test
    and are at least a second old (so no live sem_open is still using them) go.
    """
    before = _glibc_temps()
    start = time.time()
    yield
    for entry in _glibc_temps() - before:
        path = os.path.join(SHM, entry)
        with contextlib.suppress(FileNotFoundError):
            born = os.stat(path).st_mtime
            if born >= start - 1:
                time.sleep(max(0.0, born + 1 - time.time()))
                os.unlink(path)


@pytest.fixture(autouse=True)
def _shm_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves shmcast objects of its own in /dev/shm.

    Only entries that appeared during the test and carry this worker's pid tag
    (every bus_name does) count, so parallel workers never blame each other.
    """
    tag = f"shmcast.t{os.getpid()}-"
    before = _ours(tag)
    yield
    leaked = _ours(tag) - before
    for entry in leaked:  # leave /dev/shm as we found it even when failing
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM, entry))
    assert not leaked, f"test left {sorted(leaked)} in {SHM}"
