"""The pattern users want: a test starts worker processes that subscribe to its bus.

Run it with ``python -m pytest examples/pytest_workers`` (the shmcast plugin is
installed with the package and provides ``shmcast_bus`` and ``shmcast_leak_check``).
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest

import shmcast


def worker(bus: str, results: Any) -> None:
    """A worker process: subscribes, reports readiness, sums payloads until the bus closes."""
    with shmcast.subscribe(bus) as sub:
        results.put("ready")
        total = sum(event.payload["n"] for event in sub)
        results.put(total)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_workers_receive_every_event(shmcast_bus: shmcast.Bus, shmcast_leak_check: None,
                                     start: str) -> None:
    ctx = mp.get_context(start)
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(shmcast_bus.name, results)) for _ in range(3)]
    try:
        for proc in procs:
            proc.start()
        for _ in procs:
            assert results.get(timeout=30) == "ready"
        for n in range(50):  # the default 64-slot rings hold all of them
            shmcast_bus.publish("work", {"n": n})
        shmcast_bus.close()  # each worker drains its ring, then its iteration ends
        assert [results.get(timeout=30) for _ in procs] == [sum(range(50))] * 3
        for proc in procs:
            proc.join(10)
            assert proc.exitcode == 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
