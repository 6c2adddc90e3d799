"""Helpers for tests that start processes: bounded waits and kill-by-pid cleanup."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator


def wait_until(predicate: Callable[[], object], timeout: float = 5.0,
               what: str = "condition") -> None:
    """Poll *predicate* until true; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class Child:
    """A ``python -c`` child whose stdout lines can be awaited with a deadline."""

    def __init__(self, code: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def readline(self, timeout: float = 10) -> str:
        """The child's next stdout line, within *timeout* seconds."""
        try:
            return self._lines.get(timeout=timeout).rstrip("\n")
        except queue.Empty:
            raise AssertionError(f"child {self.pid} said nothing within {timeout} s") from None

    def wait(self, timeout: float = 10) -> int:
        """Wait for the child to exit; its exit code."""
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the child by pid and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)


@contextlib.contextmanager
def python(code: str, *, ready: str | None = "ready") -> Iterator[Child]:
    """Run ``python -c code``; wait for its *ready* line; SIGKILL it by pid on the way out."""
    child = Child(code)
    try:
        if ready is not None:
            line = child.readline(20)
            if line != ready:
                child.kill()
                raise AssertionError(f"child said {line!r}; stderr: {child.proc.stderr.read()}")  # type: ignore[union-attr]
        yield child
    finally:
        child.kill()
        child._reader.join(5)
        child.proc.stdout.close()  # type: ignore[union-attr]
        child.proc.stderr.close()  # type: ignore[union-attr]
