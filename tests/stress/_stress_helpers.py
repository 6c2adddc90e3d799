"""Helpers for the stress, fuzz and soak tests: forked children, bounded waits, /dev/shm.

The waits and the /dev/shm helpers are tests/_support.py's, re-exported here.

Children are plain ``os.fork()`` children that run one function and leave with
``os._exit`` (no pytest teardown, no finalizers run in them). The parent always
kills them by pid and reaps them in ``finally``, and tests assert their exit
status. Nothing here ever touches a /dev/shm entry that does not carry the
test's own bus name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from _support import (
    DEV_SHM,
    bus_entries,
    kill_and_reap,
    reap,
    remove_bus_entries,
    wait_until,
)


def fork_child(body: Callable[[], int | None]) -> int:
    """Run *body* in a forked child; its exit code is body's return (0 for None), 70 on error."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 70
        try:
            code = body() or 0
        except BaseException:  # noqa: BLE001 - reported through the exit code
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    return pid


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Wait until child *pid* stopped itself with SIGSTOP (fails if it exited or took too long)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
        if done:
            if os.WIFSTOPPED(status):
                return
            raise AssertionError(
                f"child {pid} exited ({os.waitstatus_to_exitcode(status)}) instead of stopping")
        if time.monotonic() >= deadline:
            raise AssertionError(f"child {pid} did not stop within {timeout}s")
        time.sleep(0.001)


class Children:
    """Forked children of one test, killed by pid and reaped on exit (a context manager).

    A pid is forgotten as soon as it is reaped, so it is never signalled again
    once the kernel may have given it to another process.
    """

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def fork(self, body: Callable[[], int | None]) -> int:
        pid = fork_child(body)
        self.pids.add(pid)
        return pid

    def reap(self, pid: int, timeout: float = 10.0) -> int:
        """Wait for *pid* to exit; its exit code (-signal if killed). Fails after *timeout*
        (the child SIGKILLed and reaped)."""
        try:
            return reap(pid, timeout)
        finally:
            self.pids.discard(pid)

    def kill(self, pid: int, timeout: float = 10.0) -> int:
        """SIGKILL *pid* and reap it; its exit code (-9 unless it had already exited)."""
        assert pid in self.pids, f"{pid} is not an unreaped child of this test"
        try:
            return kill_and_reap(pid, timeout)
        finally:
            self.pids.discard(pid)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.pids.discard(pid)


# Limits of a confined child (see run_confined): address space beyond what it
# inherited, and the largest file it may create or grow (a /dev/shm segment).
CONFINED_AS_HEADROOM = 512 << 20
CONFINED_FSIZE = 64 << 20


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024


def confine(as_headroom: int = CONFINED_AS_HEADROOM, fsize: int = CONFINED_FSIZE) -> None:
    """Limit the calling (child) process: address space and file size.

    ``RLIMIT_AS`` turns a huge ``mmap`` or allocation into ``MemoryError`` or
    ``ENOMEM`` instead of a host-wide memory grab; ``RLIMIT_FSIZE`` (with
    SIGXFSZ ignored, so the call fails with EFBIG instead of killing us) does the
    same for ``ftruncate``/``posix_fallocate`` of a segment in /dev/shm.
    """
    limit = _vm_size() + as_headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))


def run_confined(body: Callable[[], int | None], timeout: float = 20.0) -> int:
    """Run *body* in a forked, confined child and return its exit code.

    A segfault or SIGBUS shows as a negative code, an uncaught exception as 70
    (its traceback goes to stderr, which pytest captures), a hang as an
    AssertionError after *timeout* seconds (the child is SIGKILLed by pid).
    """

    def confined() -> int | None:
        confine()
        return body()

    with Children() as kids:
        pid = kids.fork(confined)
        return kids.reap(pid, timeout)


def stop_self() -> None:
    """SIGSTOP the calling process (a child parks itself exactly where the test wants it)."""
    os.kill(os.getpid(), signal.SIGSTOP)


def _load_publisher_roles() -> ModuleType:
    """tests/integration/_publisher_roles.py, loaded by path: its checksummed events
    are the stress tier's too, and that directory is not on this tier's sys.path."""
    path = Path(__file__).resolve().parents[1] / "integration" / "_publisher_roles.py"
    spec = importlib.util.spec_from_file_location("_stress_publisher_roles", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# make_event(src, i, rnd, body_max) and parse_event(data) -> (src, i, intact).
publisher_roles = _load_publisher_roles()


__all__ = [
    "CONFINED_AS_HEADROOM",
    "CONFINED_FSIZE",
    "DEV_SHM",
    "bus_entries",
    "Children",
    "confine",
    "fork_child",
    "publisher_roles",
    "remove_bus_entries",
    "run_confined",
    "stop_self",
    "wait_stopped",
    "wait_until",
]
