"""Helpers for the black-box contract tests (tests/integration/test_contract_*.py).

Everything here uses only the public API of shmcast (``import shmcast``) and the
host (``/dev/shm``, ``/proc``, signals). Child processes run a *role* (a function
below) in one of three ways, the :data:`METHODS`:

- ``fork``: ``multiprocessing`` with the fork start method (the child inherits
  the parent's objects, as in gunicorn's fork tree);
- ``spawn``: ``multiprocessing`` with the spawn start method (a fresh
  interpreter that shares the parent's resource tracker);
- ``python-c``: an independent ``sys.executable -c ...`` process with its own
  everything, talking JSON lines over stdin/stdout.

A role talks to the parent through a channel with ``send(dict)`` and
``recv(timeout) -> dict``. The parent side is :class:`Child`, a context manager
that kills its process by pid and reaps it on exit; tests assert exit codes
with :meth:`Child.wait`.

This module is imported by the children too, so it must not import pytest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HELPERS_DIR = str(Path(__file__).resolve().parent)
# tests/, for tests/_support.py: on sys.path in pytest (tests/conftest.py), and put
# there for the children too, which get here through HELPERS_DIR (python-c) or
# their parent's sys.path (spawn).
TESTS_DIR = str(Path(__file__).resolve().parent.parent)
if TESTS_DIR not in sys.path:
    sys.path.append(TESTS_DIR)

from _support import (  # noqa: E402
    DEV_SHM,
    follows_naming_rule,
    kill_popen,
    proc_state,
    reap,
    remove_bus_entries,
    shm_entries,
    wait_until,
)

METHODS = ("fork", "spawn", "python-c")

# Scheduling slack added to the contract's deadlines (1 s for reaping a dead
# subscriber, 2 s for noticing a dead publisher): the contract numbers are
# kept, this only absorbs polling granularity and a loaded 2-core machine.
SLACK = 0.25


# --------------------------------------------------------------------------- /dev/shm

# Entries of /dev/shm that mention the bus name at all (names from bus_name are
# unique): wider than the naming rule, so that test_dev_shm_naming sees an object
# named against it.
bus_entries = shm_entries
# Unlink every /dev/shm entry of *our own* test bus *name*; returns what was removed.
remove_own_entries = remove_bus_entries


def control_path(name: str) -> str:
    return os.path.join(DEV_SHM, f"shmcast.{name}")


def reclaim(name: str) -> None:
    """Best-effort cleanup through the public API: a new Bus reclaims a stale one, then closes."""
    if not bus_entries(name):
        return
    import shmcast

    with contextlib.suppress(Exception):
        shmcast.Bus(name).close()


# --------------------------------------------------------------------------- payloads


def to_ranges(values: Iterable[int]) -> list[list[int]]:
    """Compress a sorted list of ints into inclusive ``[first, last]`` runs."""
    out: list[list[int]] = []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return out


def from_ranges(ranges: Iterable[Iterable[int]]) -> list[int]:
    out: list[int] = []
    for a, b in ranges:
        out.extend(range(a, b + 1))
    return out


def torn_payload(seq: int, length: int, rng: Any) -> bytes:
    """A self-checking payload: 8-byte seq, random filler, 16-byte blake2b of both."""
    body = struct.pack("<Q", seq) + rng.randbytes(max(0, length - 24))
    return body + hashlib.blake2b(body, digest_size=16).digest()


def torn_type(seq: int) -> str:
    return f"t{seq % 7}"


def check_torn(version: int, type_: str, payload: Any, data: bytes) -> str | None:
    """None if the event is intact, else a short description of the damage."""
    if not isinstance(payload, bytes) or len(payload) < 24:
        return f"v{version}: bad payload {type(payload).__name__} len {len(payload or b'')}"
    body, digest = payload[:-16], payload[-16:]
    if hashlib.blake2b(body, digest_size=16).digest() != digest:
        return f"v{version}: checksum mismatch (len {len(payload)})"
    (seq,) = struct.unpack("<Q", body[:8])
    if seq != version:
        return f"v{version}: payload carries seq {seq}"
    if type_ != torn_type(seq):
        return f"v{version}: type {type_!r} != {torn_type(seq)!r}"
    if data != payload:
        return f"v{version}: event.data differs from the raw payload"
    return None


class RevJsonCodec:
    """A custom codec: compact JSON, bytes reversed (so it is not mistaken for json)."""

    def __init__(self, name: str = "rev-json") -> None:
        self.name = name

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()[::-1]

    def loads(self, data: bytes) -> Any:
        return json.loads(bytes(data)[::-1])


def make_codec(spec: str | None) -> Any:
    """Codec argument from a JSON-able spec: None, a builtin name, or ``custom:NAME``."""
    if spec is None or not spec.startswith("custom:"):
        return spec
    return RevJsonCodec(spec.split(":", 1)[1])


def jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"hex": bytes(value).hex()}
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return {"repr": repr(value)}
    return value


# --------------------------------------------------------------------------- channels


class _PipeChan:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def send(self, msg: dict) -> None:
        self.conn.send(msg)

    def recv(self, timeout: float) -> dict:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"no command from the parent within {timeout}s")
        return self.conn.recv()


class _StdioChan:
    def __init__(self) -> None:
        self._buf = b""
        self._out = sys.stdout
        # Anything else written to stdout (by accident) goes to stderr instead.
        sys.stdout = sys.stderr

    def send(self, msg: dict) -> None:
        self._out.write("@@" + json.dumps(msg) + "\n")
        self._out.flush()

    def recv(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no command from the parent within {timeout}s")
            ready, _, _ = select.select([0], [], [], remaining)
            if ready:
                chunk = os.read(0, 65536)
                if not chunk:
                    raise EOFError("parent closed stdin")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)


def _run_role(chan: Any, role: str, kwargs: dict) -> None:
    pid = os.getpid()
    try:
        ROLES[role](chan, **kwargs)
    except BaseException as exc:
        if os.getpid() == pid:  # not in a process the role forked (its exit is its own)
            with contextlib.suppress(BaseException):
                chan.send({"kind": "crash", "error": repr(exc), "tb": traceback.format_exc()})
        raise


def _mp_entry(role: str, kwargs: dict, conn: Any) -> None:
    _run_role(_PipeChan(conn), role, kwargs)


def _stdio_entry() -> None:
    role, kwargs = sys.argv[1], json.loads(sys.argv[2])
    _run_role(_StdioChan(), role, kwargs)


_EOF = object()


class Child:
    """Parent-side handle of a child process running *role* (see module docstring)."""

    def __init__(self, method: str, role: str, **kwargs: Any) -> None:
        assert method in METHODS, method
        self.method, self.role, self.kwargs = method, role, kwargs
        self._proc: Any = None
        self._popen: subprocess.Popen | None = None
        self._conn: Any = None
        self._lines: queue.Queue = queue.Queue()
        self._stderr: list[bytes] = []
        self._noise: list[bytes] = []
        self._threads: list[threading.Thread] = []
        self.pid = -1

    def __repr__(self) -> str:
        return f"<Child {self.method} {self.role} pid={self.pid}>"

    # lifecycle
    def start(self) -> Child:
        if self.method == "python-c":
            code = (
                f"import sys; sys.path.insert(0, {HELPERS_DIR!r}); "
                "import _contract_helpers as h; h._stdio_entry()"
            )
            self._popen = subprocess.Popen(
                [sys.executable, "-c", code, self.role, json.dumps(self.kwargs)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            self.pid = self._popen.pid
            for target in (self._pump_stdout, self._pump_stderr):
                t = threading.Thread(target=target, daemon=True)
                t.start()
                self._threads.append(t)
        else:
            ctx = multiprocessing.get_context(self.method)
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            self._proc = ctx.Process(
                target=_mp_entry, args=(self.role, self.kwargs, child_conn), daemon=True
            )
            self._proc.start()
            child_conn.close()
            self._conn = parent_conn
            self.pid = self._proc.pid
        return self

    def __enter__(self) -> Child:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _pump_stdout(self) -> None:
        assert self._popen is not None
        assert self._popen.stdout is not None
        for line in self._popen.stdout:
            if line.startswith(b"@@"):
                self._lines.put(json.loads(line[2:]))
            else:
                self._noise.append(line)
        self._lines.put(_EOF)

    def _pump_stderr(self) -> None:
        assert self._popen is not None
        assert self._popen.stderr is not None
        for chunk in iter(lambda: self._popen.stderr.read1(65536), b""):  # type: ignore[union-attr]
            self._stderr.append(chunk)

    def alive(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return self._proc is not None and self._proc.is_alive()

    def send(self, msg: dict) -> None:
        if self._popen is not None:
            assert self._popen.stdin is not None
            self._popen.stdin.write((json.dumps(msg) + "\n").encode())
            self._popen.stdin.flush()
        else:
            self._conn.send(msg)

    def recv(self, timeout: float = 15.0) -> dict:
        if self._popen is not None:
            try:
                msg = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"{self!r} sent nothing within {timeout}s; stderr: {self.stderr_so_far()}"
                ) from None
            if msg is _EOF:
                self._lines.put(_EOF)
                rc = self._popen.poll()
                raise AssertionError(
                    f"{self!r} closed its stdout (rc={rc}); stderr: {self.stderr_so_far()}"
                )
        else:
            if not self._conn.poll(timeout):
                raise AssertionError(f"{self!r} sent nothing within {timeout}s")
            try:
                msg = self._conn.recv()
            except EOFError:
                raise AssertionError(
                    f"{self!r} closed its pipe (exitcode={self._proc.exitcode})"
                ) from None
        if msg.get("kind") == "crash":
            raise AssertionError(f"{self!r} crashed: {msg['error']}\n{msg['tb']}")
        return msg

    def expect(self, kind: str, timeout: float = 15.0) -> dict:
        msg = self.recv(timeout)
        assert msg.get("kind") == kind, f"{self!r}: expected {kind!r}, got {msg!r}"
        return msg

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 10.0) -> int:
        """Reap the child and return its exit code (negative signal number if killed)."""
        if self._popen is not None:
            try:
                return self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{self!r} did not exit within {timeout}s") from None
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise AssertionError(f"{self!r} did not exit within {timeout}s")
        return self._proc.exitcode

    def stderr_so_far(self) -> str:
        return b"".join(self._stderr).decode(errors="replace")[-3000:]

    def stderr_final(self, timeout: float = 10.0) -> str:
        """All of stderr, after EOF: every writer closed it, including a resource tracker
        the child may have started (so its cleanup at the child's death is complete)."""
        assert self._popen is not None, "stderr is only captured for python-c children"
        for t in self._threads:
            t.join(timeout)
            assert not t.is_alive(), f"{self!r}: stderr/stdout not closed within {timeout}s"
        return b"".join(self._stderr).decode(errors="replace")

    def cleanup(self) -> None:
        """Kill (by pid) if still running, reap, close pipes. Safe to call twice."""
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                kill_popen(self._popen)
            for t in self._threads:
                t.join(5)
            for f in (self._popen.stdin, self._popen.stdout, self._popen.stderr):
                with contextlib.suppress(Exception):
                    f.close()  # type: ignore[union-attr]
        elif self._proc is not None:
            if self.pid > 0 and self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            self._proc.join(10)
            with contextlib.suppress(Exception):
                self._conn.close()
            with contextlib.suppress(Exception):
                self._proc.close()


def assert_clean_stderr(text: str) -> None:
    """No traceback and no resource_tracker complaint (leaked or double-unlinked segments)."""
    for bad in ("Traceback", "resource_tracker", "leaked shared_memory", "UserWarning"):
        assert bad not in text, f"child stderr contains {bad!r}:\n{text[-3000:]}"


# --------------------------------------------------------------------------- roles


def _exc_info(exc: BaseException) -> dict:
    return {
        "exc": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "msg": str(exc)[:500],
    }


class _Reader:
    """State of one subscription in a child: every version received, checks, counters."""

    def __init__(self, sub: Any, check: str | None, full: bool) -> None:
        self.sub, self.check, self.full = sub, check, full
        self.last = 0
        self.received = 0
        self.bad: list[str] = []
        self.nbad = 0

    def handle(self, ev: Any, versions: list[int], events: list[Any]) -> None:
        self.received += 1
        if ev.version <= self.last:
            self._bad(f"version {ev.version} after {self.last}")
        self.last = ev.version
        versions.append(ev.version)
        if self.check == "v":
            if not (isinstance(ev.payload, dict) and ev.payload.get("v") == ev.version):
                self._bad(f"v{ev.version}: payload {ev.payload!r}")
        elif self.check == "torn":
            err = check_torn(ev.version, ev.type, ev.payload, ev.data)
            if err:
                self._bad(err)
        if self.full:
            events.append([ev.version, ev.type, jsonable(ev.payload), ev.timestamp,
                           bytes(ev.data).hex()])

    def _bad(self, what: str) -> None:
        self.nbad += 1
        if len(self.bad) < 10:
            self.bad.append(what)

    def dropped(self) -> Any:
        try:
            return self.sub.dropped
        except Exception as exc:  # noqa: BLE001
            return {"error": repr(exc)}

    def report(self, kind: str, versions: list[int], events: list[Any], **extra: Any) -> dict:
        return {
            "kind": kind,
            "ranges": to_ranges(versions),
            "n": len(versions),
            "received_total": self.received,
            "dropped": self.dropped(),
            "bad": self.bad,
            "nbad": self.nbad,
            "events": events if self.full else None,
            **extra,
        }


def role_sub(chan: Any, name: str, slots: int | None = None, codec: str | None = None,
             check: str | None = None, full: bool = False) -> None:
    """Subscribe, say ``ready``, then obey commands from the parent.

    Commands (``op``): ``dropped`` (report sub.dropped without reading), ``drain``
    (read until received + dropped reaches ``published``), ``until_closed`` (read
    until the stream ends, ``how`` = get | iter), ``unsubscribe``, ``exit``.
    """
    import shmcast

    kw: dict[str, Any] = {}
    if slots is not None:
        kw["slots"] = slots
    if codec is not None:
        kw["codec"] = make_codec(codec)
    try:
        sub = shmcast.subscribe(name, **kw)
    except Exception as exc:  # noqa: BLE001
        chan.send({"kind": "subscribe_failed", **_exc_info(exc)})
        return
    reader = _Reader(sub, check, full)
    chan.send({"kind": "ready", "pid": os.getpid(), "t": time.time()})
    while True:
        cmd = chan.recv(timeout=120)
        op = cmd["op"]
        if op == "dropped":
            chan.send({"kind": "dropped", "dropped": reader.dropped()})
        elif op == "drain":
            versions: list[int] = []
            events: list[Any] = []
            deadline = time.monotonic() + cmd.get("timeout", 10)
            outcome = "ok"
            while reader.received + sub.dropped < cmd["published"]:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    outcome = "timeout"
                    break
                try:
                    ev = sub.get(timeout=remaining)
                except TimeoutError:
                    outcome = "timeout"
                    break
                except shmcast.StreamClosed:
                    outcome = "StreamClosed"
                    break
                reader.handle(ev, versions, events)
            chan.send(reader.report("drained", versions, events, outcome=outcome))
        elif op == "until_closed":
            versions, events = [], []
            how = cmd.get("how", "get")
            end, reason = "?", None
            if how == "iter":
                for ev in sub:
                    reader.handle(ev, versions, events)
                end = "iter_end"
            else:
                while True:
                    try:
                        ev = sub.get()
                    except shmcast.StreamClosed as exc:
                        end = "StreamClosed"
                        reason = getattr(exc, "reason", None)
                        break
                    reader.handle(ev, versions, events)
            end_time = time.time()
            again = "?"
            try:
                sub.get(timeout=0.5)
                again = "event"
            except shmcast.StreamClosed:
                again = "StreamClosed"
            except TimeoutError:
                again = "TimeoutError"
            chan.send(reader.report("closed", versions, events, end=end, end_time=end_time,
                                    again=again, reason=reason))
        elif op == "unsubscribe":
            sub.unsubscribe()
            chan.send({"kind": "unsubscribed"})
        elif op == "exit":
            if cmd.get("unsubscribe"):
                sub.unsubscribe()
            chan.send({"kind": "bye"})
            return
        else:
            raise ValueError(f"unknown op {op!r}")


def role_pub(chan: Any, name: str, bus_kwargs: dict | None = None) -> None:
    """Create a Bus, say ``ready``, then publish / report / close on command."""
    import shmcast

    kw = dict(bus_kwargs or {})
    if "codec" in kw:
        kw["codec"] = make_codec(kw["codec"])
    bus = shmcast.Bus(name, **kw)
    chan.send({"kind": "ready", "pid": os.getpid()})
    while True:
        try:
            cmd = chan.recv(timeout=120)
        except EOFError:
            return
        op = cmd["op"]
        if op == "publish":
            t0 = time.time()
            versions = [bus.publish(cmd.get("type", "e"), {"v": bus.version + 1})
                        for _ in range(cmd["n"])]
            chan.send({"kind": "published", "versions": versions, "t0": t0, "t1": time.time()})
        elif op == "state":
            chan.send({"kind": "state", "count": bus.subscriber_count, "version": bus.version,
                       "dropped": bus.dropped})
        elif op == "close":
            bus.close()
            chan.send({"kind": "closed"})
            return
        elif op == "exit_noclose":  # a normal interpreter exit with the Bus left open
            chan.send({"kind": "bye"})
            return
        elif op == "flood":  # self-checking raw payloads as fast as possible, until killed
            import random

            rng = random.Random(cmd.get("seed", 1))
            chan.send({"kind": "flooding"})
            while True:
                seq = bus.version + 1
                bus.publish(torn_type(seq), torn_payload(seq, rng.randrange(24, cmd["max_len"]),
                                                         rng))
        else:
            raise ValueError(f"unknown op {op!r}")


def role_close_race(chan: Any, name: str, threads: int = 3) -> None:
    """Publisher threads publish in a loop while the main thread closes the bus.

    Reports, per thread, how many publishes succeeded and the exception that
    stopped it. A crash (SIGSEGV on an unmapped segment) shows as the exit code.
    """
    import shmcast

    bus = shmcast.Bus(name, slots=4, slot_size=256)
    sub = shmcast.subscribe(name)
    results: list[Any] = [None] * threads
    started = threading.Barrier(threads + 1)

    def work(i: int) -> None:
        n = 0
        started.wait()
        try:
            while n < 10_000_000:
                bus.publish("e", {"i": i, "n": n})
                n += 1
            results[i] = {"n": n, "exc": None}
        except Exception as exc:  # noqa: BLE001
            results[i] = {"n": n, **_exc_info(exc)}

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    started.wait()
    time.sleep(0.05)  # let them publish for a while before closing under them
    t0 = time.monotonic()
    bus.close()
    close_s = time.monotonic() - t0
    for t in ts:
        t.join(10)
    alive = [t.is_alive() for t in ts]
    drained = 0
    end = "?"
    try:
        while True:
            sub.get(timeout=5)
            drained += 1
    except shmcast.StreamClosed:
        end = "StreamClosed"
    except Exception as exc:  # noqa: BLE001
        end = repr(exc)
    sub.unsubscribe()
    chan.send({"kind": "raced", "results": results, "alive": alive, "close_s": close_s,
               "drained": drained, "end": end, "entries": bus_entries(name)})


def _attach_once(name: str) -> dict:
    import shmcast

    result: dict[str, Any] = {}
    try:
        sub = shmcast.subscribe(name)
    except Exception as exc:  # noqa: BLE001
        result["subscribe"] = _exc_info(exc)
    else:
        result["subscribe"] = {"exc": None}
        try:
            sub.get(timeout=0.2)
            result["get"] = "event"
        except Exception as exc:  # noqa: BLE001
            result["get"] = type(exc).__name__
        try:
            sub.unsubscribe()
            result["unsubscribe"] = "ok"
        except Exception as exc:  # noqa: BLE001
            result["unsubscribe"] = _exc_info(exc)
    return result


def role_attach_garbage(chan: Any, name: str, many: bool = False) -> None:
    """Attach to /dev/shm/shmcast.NAME and report what happened.

    Without *blobs* the parent prepared the file: after the attach, also try to
    create a Bus of that name over it. With *many*, receive a list of ``blobs``
    (hex) from the parent, write each in turn as the control segment, attach,
    and clean up our own entries after each.
    """
    import shmcast

    if many:
        blobs = chan.recv(timeout=30)["blobs"]
        results = []
        for blob in blobs:
            with open(control_path(name), "wb") as f:
                f.write(bytes.fromhex(blob))
            results.append(_attach_once(name))
            remove_own_entries(name)
        chan.send({"kind": "attached_many", "results": results})
        return
    result: dict[str, Any] = {"kind": "attached", **_attach_once(name)}
    try:
        bus = shmcast.Bus(name)
    except Exception as exc:  # noqa: BLE001
        result["bus"] = _exc_info(exc)
    else:
        result["bus"] = {"exc": None}
        try:
            result["bus_publish"] = bus.publish("x", 1)
            bus.close()
        except Exception as exc:  # noqa: BLE001
            result["bus_publish"] = _exc_info(exc)
    chan.send(result)


def role_fork_harness(chan: Any, name: str) -> None:
    """In an independent interpreter: the fork-tree rules of the contract.

    The harness creates a Bus, then forks children that (1) try to publish with
    the inherited Bus and let it be garbage-collected, exiting normally; (2)
    subscribe, read one event and exit normally without unsubscribing; (3)
    subscribe, unsubscribe, exit normally. After each, the bus must still be
    intact. Exit statuses and observations are reported.
    """
    import gc

    import shmcast

    out: dict[str, Any] = {"kind": "harness"}
    bus = shmcast.Bus(name)
    ctl = control_path(name)

    def fork_child(body: Callable[[int], int]) -> int:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: normal interpreter exit (atexit, finalizers, trackers)
            os.close(r)
            code = 99
            try:
                code = body(w)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 98
            sys.stdout.flush()
            sys.exit(code)
        os.close(w)
        readers[pid] = r
        return pid

    readers: dict[int, int] = {}

    def wait_line(pid: int, timeout: float = 10.0) -> str:
        r = readers[pid]
        ready, _, _ = select.select([r], [], [], timeout)
        return os.read(r, 100).decode() if ready else "<timeout>"

    def reap_child(pid: int, timeout: float = 10.0) -> int:
        try:
            return reap(pid, timeout)
        except AssertionError:  # it hung: SIGKILLed and reaped
            return -999
        finally:
            os.close(readers.pop(pid))

    # (1) publish from the forked child, then drop the inherited Bus.
    holder = [bus]

    def publisher_child(w: int) -> int:
        b = holder.pop()
        try:
            b.publish("from-child", {"x": 1})
        except shmcast.ShmcastError:
            outcome = 0
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            outcome = 4
        else:
            outcome = 3
        del b
        gc.collect()
        return outcome

    pid = fork_child(publisher_child)
    out["publish_child_exit"] = reap_child(pid)
    out["after1_control_exists"] = os.path.exists(ctl)
    out["after1_version"] = bus.version

    # (2) a forked subscriber that reads one event and exits without unsubscribing.
    def reader_child(w: int) -> int:
        sub = shmcast.subscribe(name)
        os.write(w, b"ready")
        ev = sub.get(timeout=10)
        return 0 if ev.payload == {"n": 1} else 5

    pid = fork_child(reader_child)
    out["reader_ready"] = wait_line(pid)
    out["v1"] = bus.publish("n", {"n": 1})
    out["reader_child_exit"] = reap_child(pid)
    out["after2_control_exists"] = os.path.exists(ctl)

    # (3) a forked subscriber that unsubscribes, then exits normally.
    def unsub_child(w: int) -> int:
        with shmcast.subscribe(name):
            pass
        return 0

    pid = fork_child(unsub_child)
    out["unsub_child_exit"] = reap_child(pid)
    out["after3_control_exists"] = os.path.exists(ctl)

    # The bus must still work in the harness.
    with shmcast.subscribe(name) as sub:
        v = bus.publish("after", {"ok": True})
        ev = sub.get(timeout=5)
        out["final_event"] = [ev.version, ev.payload, v]
    deadline = time.monotonic() + 1.0 + SLACK
    while bus.subscriber_count and time.monotonic() < deadline:
        time.sleep(0.01)
    out["final_count"] = bus.subscriber_count
    bus.close()
    out["after_close_entries"] = bus_entries(name)
    chan.send(out)


def role_create_race(chan: Any, name: str) -> None:
    """Say ``ready``; on ``go``, try to create the bus; report; close it on ``close``."""
    import shmcast

    chan.send({"kind": "ready", "pid": os.getpid()})
    chan.recv(timeout=60)
    try:
        bus = shmcast.Bus(name)
    except Exception as exc:  # noqa: BLE001
        chan.send({"kind": "created", "ok": False, **_exc_info(exc)})
        return
    chan.send({"kind": "created", "ok": True})
    chan.recv(timeout=60)
    bus.close()
    chan.send({"kind": "closed"})


def role_churn(chan: Any, name: str) -> None:
    """Subscribe and unsubscribe in a tight loop until killed (kill it mid-join/leave)."""
    import shmcast

    chan.send({"kind": "ready", "pid": os.getpid()})
    while True:
        try:
            sub = shmcast.subscribe(name, slots=2)
        except shmcast.TooManySubscribersError:
            continue
        sub.unsubscribe()


ROLES: dict[str, Callable[..., None]] = {
    "create_race": role_create_race,
    "churn": role_churn,
    "sub": role_sub,
    "pub": role_pub,
    "attach_garbage": role_attach_garbage,
    "close_race": role_close_race,
    "fork_harness": role_fork_harness,
}

__all__ = [
    "DEV_SHM",
    "METHODS",
    "SLACK",
    "Child",
    "RevJsonCodec",
    "assert_clean_stderr",
    "bus_entries",
    "check_torn",
    "control_path",
    "follows_naming_rule",
    "from_ranges",
    "make_codec",
    "proc_state",
    "reclaim",
    "remove_own_entries",
    "to_ranges",
    "torn_payload",
    "torn_type",
    "wait_until",
]
