"""The ``shmcast`` command, driven as a subprocess (``python -m shmcast ...``) against real buses.

Subscribers and publishers are child processes: live ones, slow ones
(SIGSTOPped) and killed ones (SIGKILL); every child is killed by pid on the
way out and every exit code is asserted. ``clean`` is only ever run with
patterns naming this test's own buses.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from _procs import Child, python, wait_until

from _support import DEV_SHM as SHM
from _support import bus_entries as entries
from _support import kill_popen, proc_state
from shmcast import Bus, Publisher, subscribe

pytestmark = pytest.mark.timeout(60)

EPOCH_OFF = 112  # registry epoch in the control header (see _layout.py)


def rings_of(name: str) -> list[str]:
    return [e for e in entries(name) if e.startswith("shmcast.") and e != f"shmcast.{name}"]


def epoch(name: str) -> bytes:
    with open(os.path.join(SHM, f"shmcast.{name}"), "rb") as f:
        f.seek(EPOCH_OFF)
        return f.read(8)


# --------------------------------------------------------------------------- running the CLI


def shmcast(*args: str, timeout: float = 20, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``python -m shmcast ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "shmcast", *args], check=False,
                          capture_output=True, text=True, timeout=timeout, **kw)


def shmcast_many(*argvs: Sequence[str], module: bool = True,
                 ) -> list[subprocess.CompletedProcess[str]]:
    """Run several ``python -m shmcast`` commands at once (they are independent).

    With ``module=False`` each argv is given to ``python`` itself.
    """
    prefix = [sys.executable, "-m", "shmcast"] if module else [sys.executable]
    procs = [subprocess.Popen([*prefix, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for argv in argvs]
    done = []
    try:
        for argv, proc in zip(argvs, procs, strict=True):
            out, err = proc.communicate(timeout=20)
            done.append(subprocess.CompletedProcess(list(argv), proc.returncode, out, err))
    finally:
        for proc in procs:
            kill_popen(proc)
    return done


def one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert a clean failure: exit 1, nothing on stdout, one line on stderr with *needles*."""
    assert result.returncode == 1, (result.args, result.returncode, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


class Cli:
    """A running ``python -m shmcast ...``; its stdout and stderr lines awaited with deadlines."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "shmcast", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err: queue.Queue[str | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._pump, args=(s, q), daemon=True)
                         for s, q in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream: Any, q: queue.Queue[str | None]) -> None:
        for line in stream:
            q.put(line.rstrip("\n"))
        q.put(None)

    @staticmethod
    def line(q: queue.Queue[str | None], timeout: float = 20) -> str:
        try:
            line = q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout} s") from None
        assert line is not None, "stream closed"
        return line

    @staticmethod
    def rest(q: queue.Queue[str | None]) -> list[str]:
        lines = []
        while (line := q.get(timeout=10)) is not None:
            lines.append(line)
        return lines

    def wait(self, timeout: float = 20) -> int:
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def kill(self) -> None:
        kill_popen(self.proc)
        for stream in (self.proc.stdout, self.proc.stderr):
            assert stream is not None
            stream.close()


@contextlib.contextmanager
def cli(*args: str) -> Iterator[Cli]:
    proc = Cli(*args)
    try:
        yield proc
    finally:
        proc.kill()


# --------------------------------------------------------------------------- children

SUBSCRIBER = """
import shmcast
sub = shmcast.subscribe({name!r}, slots={slots})
print("ready", flush=True)
n = 0
for event in sub:
    n += 1
    print("got", event.version, flush=True)
print("end", n, sub.dropped, flush=True)
"""

IDLE_SUBSCRIBER = """
import shmcast, time
sub = shmcast.subscribe({name!r}, slots={slots})
print("ready", flush=True)
time.sleep(60)
"""

PUBLISHER = """
import shmcast, time
bus = shmcast.Bus({name!r}, slots=8)
for i in range({events}):
    bus.publish("tick", i)
print("ready", flush=True)
time.sleep(60)
"""


def subscriber(name: str, slots: int = 8,
               idle: bool = False) -> contextlib.AbstractContextManager[Child]:
    """A subscriber child (reading and printing each version, or *idle*), killed on the way out."""
    return python((IDLE_SUBSCRIBER if idle else SUBSCRIBER).format(name=name, slots=slots))


def read_until(child: Child, last: str | Callable[[str], bool], timeout: float = 20,
               ) -> list[str]:
    """The child's stdout lines up to the one equal to (or satisfying) *last*."""
    done = last.__eq__ if isinstance(last, str) else last
    lines = []
    while True:
        lines.append(child.readline(timeout))
        if done(lines[-1]):
            return lines


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: proc_state(pid) in ("T", "t"), 10, f"pid {pid} stopped")


def stat_json(name: str, *extra: str) -> dict[str, Any]:
    result = shmcast("stat", name, "--json", *extra)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


# --------------------------------------------------------------------------- ls and stat


def test_ls_and_stat_show_live_slow_and_killed_subscribers_without_attaching(bus_name: str):
    with Bus(bus_name, slots=16) as bus, \
            subscriber(bus_name, 16) as live, subscriber(bus_name, 16) as slow, \
            subscriber(bus_name, 16) as victim:
        stop(slow.pid)
        for i in range(40):
            bus.publish("e", {"i": i})
        read_until(live, "got 40")
        read_until(victim, "got 40")
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL
        assert bus.subscriber_count == 2
        before = (epoch(bus_name), entries(bus_name))

        ls_json, ls_text, st_json, st_text, st_all = shmcast_many(
            ["ls", "--json", bus_name], ["ls", bus_name], ["stat", bus_name, "--json"],
            ["stat", bus_name], ["stat", bus_name, "--json", "--all"])
        for result in (ls_json, ls_text, st_json, st_text, st_all):
            assert result.returncode == 0, result.stderr
            assert "Traceback" not in result.stderr

        # Reading never registered anything nor touched the registry.
        assert (epoch(bus_name), entries(bus_name)) == before
        assert bus.subscriber_count == 2

        [row] = json.loads(ls_json.stdout)
        assert row["name"] == bus_name
        assert row["pid"] == os.getpid()
        assert row["publisher_alive"]
        assert row["state"] == "open"
        assert row["subscribers"] == 2
        assert row["version"] == 40
        assert row["shm_bytes"] == sum(os.stat(os.path.join(SHM, e)).st_size
                                       for e in entries(bus_name))
        header, *table = ls_text.stdout.splitlines()
        assert header.split()[:6] == ["NAME", "PID", "PUBLISHER", "SUBS", "VERSION", "DROPS"]
        assert table[0].split()[:5] == [bus_name, str(os.getpid()), "alive", "2", "40"]

        info = json.loads(st_json.stdout)
        places = {p["pid"]: p for p in info["places"]}
        assert set(places) == {live.pid, slow.pid, victim.pid}
        assert places[live.pid]["status"] == "alive"
        assert places[live.pid]["fill"] == 0
        assert places[live.pid]["lag"] == 0
        s = places[slow.pid]
        assert s["status"] == "stopped"
        assert s["alive"]
        assert (s["fill"], s["lag"], s["drops"], s["read"]) == (16, 40, 40 - 16, 0)
        v = places[victim.pid]
        assert v["status"] == "dead"
        assert not v["alive"]
        assert v["ring_present"]
        assert v["fill"] == 0
        assert v["lag"] == 0
        assert v["read"] == 40
        # Total drops as the publisher counts them.
        assert info["drops"] == bus.dropped == row["drops"]
        assert sum(p["drops"] for p in info["places"]) == info["drops"]
        assert len(json.loads(st_all.stdout)["places"]) == 3

        text = st_text.stdout
        assert f"bus {bus_name!r}: publisher pid {os.getpid()} (alive), version 40" in text
        rows = {line.split()[1]: line.split() for line in text.splitlines()
                if line.split() and line.split()[0].isdigit()}
        assert rows[str(slow.pid)][2:6] == ["stopped", "active", "16/16", "40"]
        assert rows[str(victim.pid)][2] == "dead"
        assert rows[str(live.pid)][2:6] == ["alive", "active", "0/16", "0"]

        # The slow one resumes and drains; every live subscriber ends cleanly at close.
        os.kill(slow.pid, signal.SIGCONT)
        bus.close()
        for child in (live, slow):
            assert child.wait() == 0
        end = read_until(slow, lambda line: line.startswith("end"))[-1].split()
        assert int(end[1]) + int(end[2]) == 40  # received + dropped, as the contract says
    assert entries(bus_name) == []


def test_stat_watch_refreshes_until_ctrl_c(bus_name: str):
    with Bus(bus_name) as bus:
        with cli("stat", bus_name, "--watch", "--json", "--interval", "0.1") as watch:
            first = json.loads(Cli.line(watch.out))
            bus.publish("e", 1)
            bus.publish("e", 2)
            wait_until(lambda: json.loads(Cli.line(watch.out))["version"] == 2, 20,
                       "a frame showing version 2")
            assert first["version"] == 0
            assert first["name"] == bus_name
            watch.proc.send_signal(signal.SIGINT)
            assert watch.wait() == 0
            assert "Traceback" not in "\n".join(Cli.rest(watch.err))

        # On a terminal it redraws in place.
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "shmcast", "stat", bus_name, "-w",
                                 "-n", "0.1"], stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        try:
            seen = b""
            deadline = time.monotonic() + 20
            while seen.count(b"\x1b[H") < 2 and time.monotonic() < deadline:
                if select.select([master], [], [], 0.5)[0]:
                    seen += os.read(master, 65536)
            assert seen.count(b"\x1b[H") >= 2, seen[-500:]
            assert f"bus {bus_name!r}".encode() in seen
            proc.send_signal(signal.SIGINT)
            assert proc.wait(20) == 0
        finally:
            kill_popen(proc)
            os.close(master)
            assert proc.stderr is not None
            proc.stderr.close()
        assert bus.subscriber_count == 0


# --------------------------------------------------------------------------- tail


def test_tail_formats_and_count(bus_name: str):
    with Bus(bus_name) as bus:
        with cli("tail", bus_name, "--count", "3") as pretty, \
                cli("tail", bus_name, "--format", "json", "--count", "3") as as_json, \
                cli("tail", bus_name, "-f", "sse", "-c", "3") as sse:
            for proc in (pretty, as_json, sse):
                assert "subscribed" in Cli.line(proc.err)
            assert bus.subscriber_count == 3
            bus.publish("members", {"nodes": ["a", "b"], "note": "héllo\nworld"})
            bus.publish("heartbeat")
            bus.publish("members", [1, 2])
            for proc in (pretty, as_json, sse):
                assert proc.wait() == 0
            outs = {name: Cli.rest(p.out) for name, p in
                    (("pretty", pretty), ("json", as_json), ("sse", sse))}
            for proc in (pretty, as_json, sse):
                assert Cli.rest(proc.err) == ["shmcast tail: 3 events, 0 dropped (count reached)"]
        assert bus.subscriber_count == 0
        assert entries(bus_name) == [f"shmcast.{bus_name}"]

    records = [json.loads(line) for line in outs["json"]]
    assert [(r["version"], r["type"], r["payload"]) for r in records] == [
        (1, "members", {"nodes": ["a", "b"], "note": "héllo\nworld"}),
        (2, "heartbeat", None),
        (3, "members", [1, 2]),
    ]
    assert all(isinstance(r["timestamp"], float) for r in records)
    assert outs["sse"] == [
        "id: 1", "event: members", 'data: {"nodes":["a","b"],"note":"héllo\\nworld"}', "",
        "id: 2", "event: heartbeat", "data: null", "",
        "id: 3", "event: members", "data: [1,2]", "",
    ]
    assert [line.split()[0] for line in outs["pretty"]] == ["1", "2", "3"]
    assert outs["pretty"][0].split(None, 3)[2:] == [
        "members", '{"nodes":["a","b"],"note":"héllo\\nworld"}']


def test_tail_slow_reader_shows_the_gap_and_its_drops(bus_name: str):
    with Bus(bus_name) as bus, cli("tail", bus_name, "--slots", "4", "--count", "2") as tail:
        assert "subscribed" in Cli.line(tail.err)
        stop(tail.pid)
        for i in range(10):
            bus.publish("e", i)
        os.kill(tail.pid, signal.SIGCONT)
        assert tail.wait() == 0
        out = Cli.rest(tail.out)
        assert out[0].split() == ["...", "6", "events", "dropped"]
        assert [line.split()[0] for line in out[1:]] == ["7", "8"]
        assert Cli.rest(tail.err) == ["shmcast tail: 2 events, 6 dropped (count reached)"]
        assert entries(bus_name) == [f"shmcast.{bus_name}"]


def test_tail_unsubscribes_cleanly_on_ctrl_c_and_sigterm(bus_name: str):
    with Bus(bus_name) as bus, cli("tail", bus_name, "--format", "json") as by_int, \
            cli("tail", bus_name, "-f", "json") as by_term:
        for tail in (by_int, by_term):
            assert "subscribed" in Cli.line(tail.err)
        bus.publish("e", "x")
        for tail in (by_int, by_term):
            assert json.loads(Cli.line(tail.out))["payload"] == "x"
        assert len(rings_of(bus_name)) == 2
        by_int.proc.send_signal(signal.SIGINT)
        by_term.proc.send_signal(signal.SIGTERM)
        for tail in (by_int, by_term):
            assert tail.wait() == 0
            assert Cli.rest(tail.err) == ["shmcast tail: 1 event, 0 dropped (stopped by signal)"]
        assert bus.subscriber_count == 0
        assert entries(bus_name) == [f"shmcast.{bus_name}"]  # their rings and semaphores are gone


def test_tail_ends_when_the_bus_closes_or_its_publisher_dies(bus_name: str):
    with Bus(bus_name) as bus, cli("tail", bus_name) as tail:
        assert "subscribed" in Cli.line(tail.err)
        bus.publish("e", 1)
        Cli.line(tail.out)
        bus.close()
        assert tail.wait() == 0
        assert Cli.rest(tail.err) == ["shmcast tail: 1 event, 0 dropped (bus closed)"]

    other = bus_name + "-p"
    with python(PUBLISHER.format(name=other, events=0)) as publisher, \
            cli("tail", other) as tail:
        assert "subscribed" in Cli.line(tail.err)
        os.kill(publisher.pid, signal.SIGKILL)
        assert publisher.wait() == -signal.SIGKILL
        assert tail.wait() == 1
        assert Cli.rest(tail.err) == ["shmcast tail: 0 events, 0 dropped (publisher died)"]
    assert entries(other) == []  # the last one out reclaimed the dead bus


# --------------------------------------------------------------------------- clean


def test_clean_removes_a_dead_subscribers_ring_and_nothing_live(bus_name: str):
    bystander = bus_name + "-bystander"
    with Bus(bus_name, slots=8) as bus, \
            subscriber(bus_name) as live, subscriber(bus_name) as slow, \
            subscriber(bus_name) as victim, \
            python(PUBLISHER.format(name=bystander, events=3)) as bystander_pub:
        stop(slow.pid)
        bus.publish("e", 1)  # the publisher adopts every ring
        read_until(victim, "got 1")
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL
        os.kill(bystander_pub.pid, signal.SIGKILL)  # a dead bus that is not ours to clean here
        assert bystander_pub.wait() == -signal.SIGKILL
        victim_ring = next(p["ring"] for p in stat_json(bus_name)["places"]
                           if p["pid"] == victim.pid)
        before = entries(bus_name)
        bystander_before = entries(bystander)
        assert victim_ring in before
        assert len(rings_of(bus_name)) == 3

        dry = shmcast("clean", "--dry-run", bus_name)
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines() == [
            f"would remove ring {victim_ring} of bus {bus_name!r} "
            f"(its subscriber (pid {victim.pid}) is dead)"]
        assert entries(bus_name) == before

        done = shmcast("clean", bus_name)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            f"removed ring {victim_ring} of bus {bus_name!r} "
            f"(its subscriber (pid {victim.pid}) is dead)"]
        assert entries(bus_name) == sorted(set(before) - {victim_ring, "sem." + victim_ring})
        assert entries(bystander) == bystander_before  # another bus: untouched

        again = shmcast("clean", bus_name)
        assert again.returncode == 0
        assert again.stdout == ""
        assert "nothing to clean" in again.stderr

        # The live bus still works for everyone left.
        bus.publish("e", 2)
        read_until(live, "got 2")
        assert bus.subscriber_count == 2
        os.kill(slow.pid, signal.SIGCONT)
        bus.close()
        assert live.wait() == 0
        assert slow.wait() == 0

        # Now the bystander, by its own name: its dead bus goes.
        gone = shmcast("clean", bystander)
        assert gone.returncode == 0, gone.stderr
        assert gone.stdout.splitlines() == [
            f"removed bus {bystander!r} (its publisher (pid {bystander_pub.pid}) is dead)"]
        assert entries(bystander) == []


def test_clean_dead_bus_keeps_live_subscriber_rings_then_removes_orphans(bus_name: str):
    with python(PUBLISHER.format(name=bus_name, events=0)) as publisher, \
            subscriber(bus_name, idle=True) as stopped, \
            subscriber(bus_name, idle=True) as victim:
        stop(stopped.pid)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL
        os.kill(publisher.pid, signal.SIGKILL)
        assert publisher.wait() == -signal.SIGKILL
        places = {p["pid"]: p["ring"] for p in stat_json(bus_name)["places"]}
        kept, dead = places[stopped.pid], places[victim.pid]

        ls = json.loads(shmcast("ls", "--json", bus_name).stdout)
        assert [(b["state"], b["publisher_alive"], b["subscribers"]) for b in ls] == [
            ("dead", False, 1)]

        in_use = (f"left alone: {kept}: orphan (its bus is dead) but in use by pid "
                  f"{stopped.pid}")
        removal = (f"bus {bus_name!r} (its publisher (pid {publisher.pid}) is dead, "
                   "with 1 dead subscriber ring)")
        dry = shmcast("clean", "-n", bus_name)
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines() == [in_use, f"would remove {removal}"]
        assert len(rings_of(bus_name)) == 2

        done = shmcast("clean", bus_name)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [in_use, f"removed {removal}"]
        assert rings_of(bus_name) == [kept]  # the stopped subscriber's ring is still its own
        assert f"sem.{kept}" in entries(bus_name)
        assert dead not in entries(bus_name)

        # Its bus is gone, but a live (stopped) process still maps it: left alone.
        keep = shmcast("clean", bus_name)
        assert keep.returncode == 0, keep.stderr
        assert keep.stdout.splitlines() == [
            f"left alone: {kept}: orphan (its bus is gone) but in use by pid {stopped.pid}"]
        assert rings_of(bus_name) == [kept]

        os.kill(stopped.pid, signal.SIGKILL)
        assert stopped.wait() == -signal.SIGKILL

    # A new bus of the same name: the old ring is an orphan of an older bus.
    with Bus(bus_name) as bus:
        dry = shmcast("clean", "--dry-run", bus_name)
        assert dry.stdout.splitlines() == [
            f"would remove orphan ring {kept} of bus {bus_name!r} "
            "(it belongs to an older bus of that name; nobody uses it)"]
        done = shmcast("clean", bus_name)
        assert done.returncode == 0, done.stderr
        assert entries(bus_name) == [f"shmcast.{bus_name}"]
        bus.publish("still", "works")
    assert entries(bus_name) == []


OWNER_WITH_INBOXES = """
import shmcast, time
bus = shmcast.Bus({name!r}, slots=8, max_publishers={places})
print("ready", flush=True)
time.sleep(60)
"""

PUBLISHING = """
import shmcast
pub = shmcast.Publisher({name!r})
print("ready", flush=True)
i = 0
while True:  # a tight loop: a SIGKILL lands in the middle of some publish
    pub.publish("tick", i)
    i += 1
"""


def inboxes_of(name: str) -> list[str]:
    """The bus's publisher inboxes and drain semaphore in /dev/shm."""
    return [e for e in entries(name) if e.endswith(".drain") or ".inbox" in e]


def test_clean_removes_orphan_publisher_inboxes_and_never_a_live_buss(bus_name: str):
    # A bus whose owner and publishers died: clean removes all of it, inboxes too.
    with python(OWNER_WITH_INBOXES.format(name=bus_name, places=2)) as owner, \
            python(PUBLISHING.format(name=bus_name)) as killed:
        os.kill(killed.pid, signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL
        os.kill(owner.pid, signal.SIGKILL)
        assert owner.wait() == -signal.SIGKILL
        assert len(inboxes_of(bus_name)) == 3  # two inboxes, the drain semaphore
        done = shmcast("clean", bus_name)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            f"removed bus {bus_name!r} (its publisher (pid {owner.pid}) is dead)"]
        assert entries(bus_name) == []

    # The same, but something that knows nothing of inboxes removed the control
    # segment first (rm, or a reclaimer that could not read the header): the
    # inboxes are orphans, left alone while a stopped publisher still maps its own.
    with python(OWNER_WITH_INBOXES.format(name=bus_name, places=2)) as owner, \
            python(PUBLISHING.format(name=bus_name)) as killed, \
            python(PUBLISHING.format(name=bus_name)) as stopped:
        stop(stopped.pid)
        os.kill(killed.pid, signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL
        os.kill(owner.pid, signal.SIGKILL)
        assert owner.wait() == -signal.SIGKILL
        os.unlink(os.path.join(SHM, f"shmcast.{bus_name}"))
        orphans = inboxes_of(bus_name)
        assert entries(bus_name) == orphans
        assert len(orphans) == 3
        listed = ", ".join(orphans)
        keep = shmcast("clean", bus_name)
        assert keep.returncode == 0, keep.stderr
        assert keep.stdout.splitlines() == [
            f"left alone: {listed}: orphan publisher inboxes (its bus is gone) but in use "
            f"by pid {stopped.pid}"]
        assert entries(bus_name) == orphans
        os.kill(stopped.pid, signal.SIGKILL)
        assert stopped.wait() == -signal.SIGKILL

    # A live bus of the same name with a publisher SIGKILLed mid-publish: its own
    # inboxes stay, the older bus's go.
    with Bus(bus_name, slots=8, max_publishers=1) as bus:
        with python(PUBLISHING.format(name=bus_name)) as victim:
            wait_until(lambda: bus.publisher_count == 1, 10, "the publisher attached")
            os.kill(victim.pid, signal.SIGKILL)
            assert victim.wait() == -signal.SIGKILL
        live = sorted(set(inboxes_of(bus_name)) - set(orphans))
        assert len(live) == 2  # one inbox, the drain semaphore
        removal = (f"orphan publisher inboxes {listed} of bus {bus_name!r} (it belongs to an "
                   "older bus of that name; nobody uses them)")
        dry = shmcast("clean", "--dry-run", bus_name)
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines() == [f"would remove {removal}"]
        assert set(orphans) <= set(entries(bus_name))
        done = shmcast("clean", bus_name)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [f"removed {removal}"]
        assert entries(bus_name) == sorted([f"shmcast.{bus_name}", *live])
        # The live bus still takes a publisher in the place the dead one left.
        with subscribe(bus_name) as sub, Publisher(bus_name) as pub:
            pub.publish("after", 1)
            assert sub.get(timeout=5).payload == 1
    assert entries(bus_name) == []


# --------------------------------------------------------------------------- errors


# Root ignores file permissions; this runs the command without the capabilities that
# let it (dropped from the bounding set, then exec: the new program never gets them).
AS_PLAIN_USER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        sys.exit(99)
os.execv(sys.executable, [sys.executable, "-m", "shmcast", *sys.argv[1:]])
"""


def test_errors_are_one_line_without_traceback(bus_name: str):
    missing, garbage, tiny = bus_name + "-none", bus_name + "-junk", bus_name + "-tiny"
    junk_path, tiny_path = (os.path.join(SHM, f"shmcast.{n}") for n in (garbage, tiny))
    try:
        with open(junk_path, "wb") as f:
            f.write(b"definitely not a shmcast bus " * 10)
        with open(tiny_path, "wb") as f:
            f.write(b"abc")
        results = shmcast_many(
            ["stat", missing], ["tail", missing], ["stat", "bad.name"], ["clean", "-n", "a/b"],
            ["stat", garbage], ["stat", tiny], ["ls", "--json", garbage, tiny],
            ["clean", garbage, tiny], ["ls", missing], ["tail", garbage, "--count", "0"])
        (stat_missing, tail_missing, bad1, bad2, stat_junk, stat_tiny, ls_bad, clean_bad,
         ls_missing, usage) = results
        one_error_line(stat_missing, "shmcast stat:", f"no bus named {missing!r}")
        one_error_line(tail_missing, "shmcast tail:", f"no bus named {missing!r}")
        one_error_line(bad1, "shmcast stat:", "invalid bus name 'bad.name'")
        one_error_line(bad2, "shmcast clean:", "invalid bus name 'a/b'")
        one_error_line(stat_junk, junk_path, "not a shmcast bus", "magic")
        one_error_line(stat_tiny, tiny_path, "not a shmcast segment", "3 bytes")
        assert ls_bad.returncode == 0
        assert [sorted(b) for b in json.loads(ls_bad.stdout)] == [["error", "name"]] * 2
        assert clean_bad.returncode == 0, clean_bad.stderr
        assert [line.split(":")[0] for line in clean_bad.stdout.splitlines()] == ["left alone"] * 2
        assert os.path.exists(junk_path)
        assert os.path.exists(tiny_path)
        assert ls_missing.returncode == 0
        assert ls_missing.stdout == ""
        assert usage.returncode == 2
        assert "--count" in usage.stderr
        assert "Traceback" not in usage.stderr
    finally:
        for path in (junk_path, tiny_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def test_permission_denied_is_one_line(bus_name: str):
    with Bus(bus_name) as bus:
        path = os.path.join(SHM, f"shmcast.{bus_name}")
        os.chmod(path, 0)
        try:
            argvs = (["stat", bus_name], ["tail", bus_name], ["ls", "--json", bus_name],
                     ["clean", "-n", bus_name])
            if os.geteuid() == 0:
                argvs = tuple(["-c", AS_PLAIN_USER, *argv] for argv in argvs)
            stat_, tail, ls, clean = shmcast_many(*argvs, module=os.geteuid() != 0)
            if stat_.returncode == 99:
                pytest.skip("cannot drop root's file capabilities here")
            one_error_line(stat_, "permission denied", path)
            one_error_line(tail, "permission denied", path)
            assert json.loads(ls.stdout) == [{"name": bus_name, "error": "permission denied"}]
            assert clean.returncode == 0
            assert clean.stdout.splitlines() == [
                f"left alone: shmcast.{bus_name}: permission denied"]
        finally:
            os.chmod(path, 0o600)
        assert bus.subscriber_count == 0


# --------------------------------------------------------------------------- misc


def test_demo_prints_progress_and_a_final_table():
    proc = subprocess.Popen([sys.executable, "-m", "shmcast", "demo", "--events", "3000",
                             "--subscribers", "2", "--slow-ms", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=50)
    finally:
        kill_popen(proc)
    assert proc.returncode == 0, out + err
    lines = out.splitlines()  # text mode turned the progress line's \r into line breaks
    assert any(line.startswith("published    3000/3000 ") for line in lines)
    table = lines[lines.index(next(x for x in lines if x.startswith("subscriber"))):]
    assert table[0].split() == ["subscriber", "received", "dropped", "sum", "ordered", "torn", "ok"]
    assert [row.split()[0] for row in table[1:3]] == ["fast-1", "slow"]
    assert "invariants held" in out
    assert not [e for e in os.listdir(SHM) if f"shmcast.demo-{proc.pid}" in e]


def test_help_and_the_core_import_stays_light():
    result = shmcast("--help")
    assert result.returncode == 0
    for command in ("ls", "stat", "tail", "clean", "demo"):
        assert command in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, shmcast; "
         "print(sorted(m for m in ('argparse', 'shmcast.cli', 'shmcast._inspect') "
         "if m in sys.modules))"], check=False, capture_output=True, text=True, timeout=20)
    assert probe.stdout.strip() == "[]", probe.stderr
