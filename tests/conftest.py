"""Fixtures for the whole suite: a unique bus name per test and a /dev/shm leak check.

Also puts this directory on ``sys.path``, so that every test module (and the
helper modules of each tier) can ``from _support import ...``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # whatever pytest's import mode
    sys.path.insert(0, _TESTS_DIR)

from _support import DEV_SHM as SHM  # noqa: E402
from _support import shm_entries  # noqa: E402

# Every bus_name begins with this (the plugin's shmcast_bus_name, in this process).
_NAME_TAG = f"pytest-{os.getpid()}-"


@pytest.fixture
def bus_name(shmcast_bus_name: str) -> str:
    """A bus name no other test (or xdist worker) uses: the shmcast plugin's
    ``shmcast_bus_name`` (so ``shmcast_bus``, if a test also asks for it, is this bus)."""
    assert shmcast_bus_name.startswith(_NAME_TAG), shmcast_bus_name
    return shmcast_bus_name


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
def _shm_leak_check(shmcast_leak_check: None) -> Iterator[None]:
    """Fail a test that leaves shmcast objects of its own in /dev/shm.

    The plugin's ``shmcast_leak_check`` covers every bus this process created
    or subscribed to; this adds the buses named after ``bus_name`` that only
    child processes touched. Only entries that appeared during the test and
    carry this worker's pid tag (every bus_name does) count here, so parallel
    workers never blame each other; they are removed even when the test fails.
    """
    tag = f"shmcast.{_NAME_TAG}"
    before = set(shm_entries(tag))
    yield
    leaked = set(shm_entries(tag)) - before
    for entry in leaked:  # leave /dev/shm as we found it even when failing
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM, entry))
    assert not leaked, f"test left {sorted(leaked)} in {SHM}"
