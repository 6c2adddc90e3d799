"""Both gunicorn examples survive every stop and reload signal with streams open (issue 9).

For each example and each of SIGINT, SIGQUIT, SIGTERM and SIGHUP, a real
gunicorn master (2 workers) is started on 127.0.0.1 with SSE clients
streaming, then signalled: a stop signal must end the master within the
bound with no worker SIGKILLed and nothing of the bus left in /dev/shm; SIGHUP
must replace the workers while the master keeps publishing, then stop cleanly.

The default suite runs each case once; ``-m stress`` runs each
``SHMCAST_SIGNAL_RUNS`` times (20 by default), the scripted run of the issue::

    python -m pytest -m stress tests/stress/test_example_signals.py -q
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from _support import bus_entries, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
import _web_helpers as web

EXAMPLES = ["gunicorn_sse", "asgi_sse"]
SIGNALS = [signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP]
RUNS = int(os.environ.get("SHMCAST_SIGNAL_RUNS", "20"))


def _deps(example: str) -> None:
    if example == "gunicorn_sse":
        web.require("gunicorn", "flask", "httpx")
    else:
        web.require("gunicorn", "starlette", "uvicorn", "uvicorn_worker", "httpx")


def _assert_stops(server: web.Gunicorn, sig: signal.Signals) -> None:
    before = len(server.log())
    took = server.stop(sig=sig, timeout=30)
    assert took < 15, f"{signal.Signals(sig).name} took {took:.1f} s"
    assert "was sent SIGKILL" not in server.log()[before:], (
        f"a worker had to be SIGKILLed after {signal.Signals(sig).name}")


def _one_run(example: str, sig: signal.Signals, bus: str, tmp_path: Path) -> None:
    # A hung worker is SIGKILLed by the master after the graceful timeout, and the
    # master logs it: the test fails on that line, not on a loaded machine's pace.
    server = web.Gunicorn(example, bus, tmp_path, args=["--graceful-timeout", "10"])
    server.start()
    clients = [web.SSEClient(server.url, reconnect=False) for _ in range(3)]
    try:
        for client in clients:
            client.start()
        for client in clients:
            client.wait_events(2, timeout=10)
        if sig == signal.SIGHUP:
            old = server.worker_pids()
            before = len(server.log())
            server.send_signal(sig)
            server.wait_workers(2, timeout=20, exclude=old)
            fresh = web.SSEClient(server.url, reconnect=False)
            fresh.start()
            try:
                fresh.wait_events(2, timeout=10)  # the master still publishes
            finally:
                fresh.stop()
            assert "was sent SIGKILL" not in server.log()[before:], server.log()[before:]
            _assert_stops(server, signal.SIGTERM)
        else:
            _assert_stops(server, sig)
    finally:
        for client in clients:
            client.stop()
        server.stop()
    wait_until(lambda: not bus_entries(bus), 5, lambda: f"{bus} entries: {bus_entries(bus)}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("example", EXAMPLES)
def test_example_survives_signal_once(example: str, sig: signal.Signals, bus_name: str,
                                      tmp_path: Path) -> None:
    _deps(example)
    _one_run(example, sig, bus_name, tmp_path)


@pytest.mark.stress
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("example", EXAMPLES)
def test_example_survives_signal_repeatedly(example: str, sig: signal.Signals, bus_name: str,
                                            tmp_path: Path) -> None:
    _deps(example)
    for run in range(RUNS):
        run_dir = tmp_path / f"run{run}"
        run_dir.mkdir()
        _one_run(example, sig, f"{bus_name}-{run}", run_dir)
