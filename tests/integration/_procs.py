"""Helpers for tests that start processes: ``python -c`` children killed by pid.

``wait_until`` is tests/_support.py's, re-exported for the tests that import it from here.
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator

from _support import kill_popen, wait_until


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
        """SIGKILL the child by pid (unless it already exited) and reap it."""
        kill_popen(self.proc)


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


__all__ = ["Child", "python", "wait_until"]
