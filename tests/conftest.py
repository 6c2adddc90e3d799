"""Fixtures for the whole suite: a unique bus name per test and a /dev/shm leak check."""

from __future__ import annotations

import contextlib
import os
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
