"""Helpers shared by every tier of the suite (unit, integration, stress).

Importable from any test module as ``import _support`` / ``from _support import ...``:
tests/conftest.py puts this directory on ``sys.path``, and
tests/integration/_contract_helpers.py does the same for the child processes
that import it. This module must therefore not import pytest at import time,
nor shmcast (children import it before they decide what to do).

- Waiting: :func:`wait_until`.
- /dev/shm: :func:`bus_entries`, :func:`shm_entries`, :func:`follows_naming_rule`,
  :func:`remove_bus_entries`.
- Processes, always by pid: :func:`proc_state`, :func:`reap`, :func:`kill_and_reap`,
  :func:`kill_popen`.
- Prerequisites: :func:`under_ci`, :func:`skip_or_fail`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

DEV_SHM = "/dev/shm"


# --------------------------------------------------------------------------- waiting


def wait_until(pred: Callable[[], T], timeout: float, what: str | Callable[[], str] = "",
               interval: float = 0.005) -> T:
    """Poll *pred* until it returns a truthy value, and return that value.

    Fails with ``AssertionError`` after *timeout* seconds, naming *what* (a
    callable is called then, to describe the state at failure time), or the
    predicate itself, and the last value it returned. An exception raised by
    *pred* propagates at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            desc = (what() if callable(what) else what) or repr(pred)
            last = repr(value)
            if len(last) > 200:
                last = last[:200] + "..."
            raise AssertionError(
                f"timed out after {timeout:.2f}s waiting for {desc} (last value: {last})"
            )
        time.sleep(interval)


# --------------------------------------------------------------------------- /dev/shm


def follows_naming_rule(entry: str, name: str) -> bool:
    """``shmcast.NAME`` itself, or any object whose name contains ``shmcast.NAME.``.

    POSIX semaphores show up in /dev/shm as ``sem.<name>``, hence "contains".
    """
    return entry == f"shmcast.{name}" or f"shmcast.{name}." in entry


def bus_entries(name: str) -> list[str]:
    """The /dev/shm entries of bus *name*: its control segment, rings and semaphores.

    Those that follow the naming rule, plus ``sem.shmcast.NAME`` (which breaks
    it, but is still the bus's). Never those of another bus, even one whose
    name begins with *name* (``NAME-2``).
    """
    return sorted(
        e for e in os.listdir(DEV_SHM)
        if follows_naming_rule(e, name) or e == f"sem.shmcast.{name}"
    )


def shm_entries(text: str) -> list[str]:
    """Every /dev/shm entry whose name contains *text* anywhere (for bus names:
    wider than :func:`bus_entries`, so an object named against the rule is seen too)."""
    return sorted(e for e in os.listdir(DEV_SHM) if text in e)


def remove_bus_entries(name: str) -> list[str]:
    """Unlink every /dev/shm entry of our own test bus *name* (last-resort cleanup);
    returns what was removed."""
    removed = []
    for entry in bus_entries(name):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(DEV_SHM, entry))
            removed.append(entry)
    return removed


# --------------------------------------------------------------------------- processes


def proc_state(pid: int) -> str:
    """One-letter process state from /proc (``T`` stopped, ``Z`` zombie...), ``?`` if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def reap(pid: int, timeout: float = 10.0) -> int:
    """Wait for our child *pid* to exit; its exit code (``-N`` if killed by signal N).

    A child still running after *timeout* seconds is SIGKILLed and reaped, then
    ``AssertionError`` is raised. Polls (``WNOHANG``): never blocks for good.
    """
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not exit within {timeout}s (SIGKILLed)")
        time.sleep(0.001)


def kill_and_reap(pid: int, timeout: float = 10.0) -> int:
    """SIGKILL our unreaped child *pid* and reap it; its exit code (-9 unless it had
    already exited)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return reap(pid, timeout)


def kill_popen(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGKILL a ``Popen`` child by pid unless it already exited, and reap it; its returncode.

    Safe to call twice. Raises ``subprocess.TimeoutExpired`` if it is not gone
    after *timeout* seconds (which a SIGKILL makes all but impossible).
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(timeout)


# --------------------------------------------------------------------------- prerequisites


def under_ci() -> bool:
    """Whether the ``CI`` environment variable is set (to anything but empty, 0, false, no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the calling test for a missing prerequisite; under CI, fail it instead.

    CI installs every prerequisite, so there a skip would only hide a check that
    did not run.
    """
    __tracebackhide__ = True  # reported at the caller's line
    import pytest

    if under_ci():
        pytest.fail(f"{reason} (CI is set: a missing prerequisite fails instead of skipping)",
                    pytrace=False)
    pytest.skip(reason)


__all__ = [
    "DEV_SHM",
    "bus_entries",
    "follows_naming_rule",
    "kill_and_reap",
    "kill_popen",
    "proc_state",
    "reap",
    "remove_bus_entries",
    "shm_entries",
    "skip_or_fail",
    "under_ci",
    "wait_until",
]
