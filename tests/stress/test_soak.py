"""Soak: a publisher at full speed for minutes while subscribers join, leave and crash.

Run it with::

    python -m pytest -m soak tests/stress/test_soak.py -p no:xdist -s

``SHMCAST_SOAK_SECONDS`` sets the churn phase (default 600), ``SHMCAST_SOAK_EVERY``
the sampling period (default 5 s) and ``SHMCAST_SOAK_OUT`` a JSON file for the
samples (``tests/stress/soak_plot.py`` turns it into docs/reliability-soak.png).

The publisher runs in its own forked process so that what is sampled (RSS,
open fds, /proc/PID/maps lines) is the publisher's alone; /dev/shm usage is
the bytes and entries of this bus. Subscribers are forked processes that each
live a random while and then leave one of five ways: unsubscribe and drain,
exit without unsubscribing, SIGKILL mid-read, SIGKILL while SIGSTOPped and
never reading, or a slow reader SIGKILLed. Every subscriber checks each event
it reads (versions strictly increasing, payload carrying its own version); a
violation shows as its exit code.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import signal
import struct
import time
from pathlib import Path

import pytest
from _stress_helpers import Children, bus_entries, remove_bus_entries, stop_self, wait_until

from shmcast import Bus, StreamClosed, subscribe

SECONDS = float(os.environ.get("SHMCAST_SOAK_SECONDS", "600"))
EVERY = float(os.environ.get("SHMCAST_SOAK_EVERY", "5"))
OUT = os.environ.get("SHMCAST_SOAK_OUT", "")
CONCURRENT = 8  # subscribers alive at once (the bus has 16 places)
MAX_SUBSCRIBERS = 16
SLOTS = 128
SLOT_SIZE = 1024

pytestmark = [
    pytest.mark.soak,
    pytest.mark.timeout(int(SECONDS) + 300),
    pytest.mark.filterwarnings(r"ignore:This process \(pid=\d+\) is multi-threaded"),
]

# Shared page between the test and the publisher child, nine int64s: stop (test:
# 1 = close and exit); then, written by the publisher as of the last request:
# version, dropped, subscriber_count, and since the previous request the worst
# publish() in wall-clock ns, the worst in CPU ns of the publishing thread (wall
# minus CPU is time the scheduler gave to other processes on this 2-core box),
# the number of publishes over 1 ms wall; then request (test), answered.
_STATS = struct.Struct("<qqqqqqqqq")
_ANSWER = struct.Struct("<qqqqqqqq")
_REQUEST_OFF = 56
BAD_EVENT = 3


def _publisher(name: str, page: mmap.mmap) -> int:
    bus = Bus(name, slots=SLOTS, slot_size=SLOT_SIZE, max_subscribers=MAX_SUBSCRIBERS)
    pad = "p" * 300
    worst = worst_cpu = slow = 0
    next_poll = 0.0
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    try:
        while True:
            for _ in range(200):
                t0, c0 = wall(), cpu()
                v = bus.publish("tick", {"v": bus.version + 1, "pad": pad})
                dt, dc = wall() - t0, cpu() - c0
                worst = max(worst, dt)
                worst_cpu = max(worst_cpu, dc)
                if dt > 1_000_000:
                    slow += 1
                if v != bus.version:
                    return 5
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + 0.02
                stop, *_, request, answered = _STATS.unpack_from(page, 0)
                if stop:
                    break
                if request != answered:
                    _ANSWER.pack_into(page, 8, bus.version, bus.dropped, bus.subscriber_count,
                                      worst, worst_cpu, slow, request, request)
                    worst = worst_cpu = slow = 0
    finally:
        bus.close()
    return 0


def _subscriber(name: str, kind: str, lifetime: float) -> int:
    sub = subscribe(name)
    if kind == "stopped":
        stop_self()  # never reads; the test SIGKILLs it
        return 9
    deadline = time.monotonic() + lifetime
    last = 0
    while time.monotonic() < deadline:
        try:
            ev = sub.get(timeout=1.0)
        except TimeoutError:
            continue
        except StreamClosed:
            return 4  # the bus is never closed while subscribers churn
        if ev.version <= last or ev.payload.get("v") != ev.version:
            return BAD_EVENT
        last = ev.version
        if kind == "slow":
            time.sleep(0.01)
    if kind == "leave":
        sub.unsubscribe()
        for ev in sub:  # drain what was buffered, then the stream ends
            if ev.version <= last or ev.payload.get("v") != ev.version:
                return BAD_EVENT
            last = ev.version
        return 0
    return 0  # "exit": leave the process without unsubscribing


def _sample(pid: int, name: str) -> dict:
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    rss = int(status["VmRSS"].split()[0])
    # Cumulative context switches of the publisher (all its threads: it has one).
    # Voluntary ones are blocking (a syscall that slept); involuntary ones are
    # preemption by the scheduler. A slow publish with no new voluntary switch
    # was descheduled, not blocked.
    vcs = int(status["voluntary_ctxt_switches"])
    ivcs = int(status["nonvoluntary_ctxt_switches"])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    entries = bus_entries(name)
    shm_bytes = 0
    for e in entries:
        with contextlib.suppress(FileNotFoundError):
            shm_bytes += os.stat(f"/dev/shm/{e}").st_size
    return {"rss_kb": rss, "fds": fds, "maps": maps, "shm_entries": len(entries),
            "shm_bytes": shm_bytes, "voluntary_cs": vcs, "involuntary_cs": ivcs}


def _slope_per_min(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return 0.0 if var == 0 else 60 * cov / var


def test_soak(bus_name):
    rng = random.Random(int(os.environ.get("SHMCAST_SOAK_SEED", "1")))
    page = mmap.mmap(-1, 4096)
    samples: list[dict] = []
    lifetimes = {"leave": 0, "exit": 0, "killed": 0, "stopped": 0, "slow": 0}
    with Children() as kids:
        try:
            pub = kids.fork(lambda: _publisher(bus_name, page))

            def stats() -> tuple[int, ...]:
                """Version, dropped, subscriber_count, worst wall ns, worst CPU ns, slow."""
                request = _STATS.unpack_from(page, 0)[7] + 1
                struct.pack_into("<q", page, _REQUEST_OFF, request)
                wait_until(lambda: _STATS.unpack_from(page, 0)[8] == request, 5,
                           "publisher answering")
                return _STATS.unpack_from(page, 0)[1:7]

            # Baseline with no subscriber at all.
            wait_until(lambda: stats()[0] > 1000, 15, "publisher running")
            stats()
            base = _sample(pub, bus_name)
            load_start = os.getloadavg()
            live: dict[int, tuple[str, float]] = {}  # pid -> (kind, kill at)
            exits: list[tuple[str, int]] = []
            t_start = time.monotonic()
            next_sample = t_start
            last_version, last_t = 0, t_start
            last_cs = (base["voluntary_cs"], base["involuntary_cs"])
            while time.monotonic() - t_start < SECONDS:
                now = time.monotonic()
                # Reap who finished on their own, kill who is due.
                for pid, (kind, kill_at) in list(live.items()):
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        kids.pids.discard(pid)
                        exits.append((kind, os.waitstatus_to_exitcode(status)))
                        del live[pid]
                    elif kill_at <= now:
                        exits.append((kind, kids.kill(pid)))
                        del live[pid]
                while len(live) < CONCURRENT:
                    kind = rng.choice(["leave", "exit", "killed", "stopped", "slow"])
                    lifetime = rng.uniform(0.05, 3.0)
                    lifetimes[kind] += 1
                    if kind in ("killed", "stopped", "slow"):
                        kill_at, run_for = now + lifetime, 1e9
                    else:
                        kill_at, run_for = now + 60, lifetime
                    pid = kids.fork(lambda k=kind, r=run_for: _subscriber(bus_name, k, r))
                    live[pid] = (kind, kill_at)
                if now >= next_sample:
                    version, dropped, count, worst, worst_cpu, slow = stats()
                    t = time.monotonic()
                    s = _sample(pub, bus_name)
                    s.update(t=round(t - t_start, 2), version=version, dropped=dropped,
                             worst_publish_us=round(worst / 1000, 1),
                             worst_publish_cpu_us=round(worst_cpu / 1000, 1),
                             publishes_over_1ms=slow, subscribers=count,
                             rate=round((version - last_version) / max(t - last_t, 1e-9)),
                             voluntary_cs_delta=s["voluntary_cs"] - last_cs[0],
                             involuntary_cs_delta=s["involuntary_cs"] - last_cs[1],
                             loadavg_1m=os.getloadavg()[0])
                    last_version, last_t = version, t
                    last_cs = (s["voluntary_cs"], s["involuntary_cs"])
                    samples.append(s)
                    next_sample += EVERY
                time.sleep(0.01)

            # Wind down: every subscriber goes, the publisher retires their rings.
            for pid in list(live):
                exits.append((live.pop(pid)[0], kids.kill(pid)))
            wait_until(lambda: stats()[2] == 0, 5, "subscriber_count back to 0")
            wait_until(lambda: len(bus_entries(bus_name)) == 1, 5, "dead rings retired")
            stats()
            final = _sample(pub, bus_name)
            end_version, end_dropped = stats()[:2]
            struct.pack_into("<q", page, 0, 1)
            assert kids.reap(pub, 30) == 0
            after_close = bus_entries(bus_name)
        finally:
            remove_bus_entries(bus_name)

    allowed = {"leave": (0, -signal.SIGKILL), "exit": (0, -signal.SIGKILL)}
    bad = [(k, c) for k, c in exits if c not in allowed.get(k, (-signal.SIGKILL,))]
    report = {"seconds": SECONDS, "every": EVERY, "baseline": base, "final": final,
              "samples": samples, "subscribers_started": lifetimes, "exits": len(exits),
              "bad_exits": bad[:20], "events": end_version, "dropped": end_dropped,
              "after_close": after_close, "loadavg_start": load_start,
              "loadavg_end": os.getloadavg(),
              "cpus": os.cpu_count()}
    if OUT:
        Path(OUT).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))

    assert not bad, f"subscribers exited badly (kind, code): {bad[:20]}"
    assert after_close == []
    # Back to baseline once the subscribers are gone: no fd, mapping or segment kept.
    assert final["fds"] == base["fds"], (base, final)
    assert final["maps"] == base["maps"], (base, final)
    assert final["shm_entries"] == base["shm_entries"] == 1
    # Bounded all along: at most one ring (segment + semaphore) per place.
    for s in samples:
        assert s["shm_entries"] <= 1 + 2 * MAX_SUBSCRIBERS, s
        assert s["fds"] <= base["fds"] + MAX_SUBSCRIBERS, s
        assert s["maps"] <= base["maps"] + 2 * MAX_SUBSCRIBERS, s
    # RSS flat: the second half of the run does not grow (less than 1 MiB a minute),
    # and the end is within 8 MiB of the baseline.
    half = samples[len(samples) // 2:]
    if len(half) >= 3:
        slope = _slope_per_min([s["t"] for s in half], [s["rss_kb"] for s in half])
        assert slope < 1024, f"publisher RSS grows {slope:.0f} kB/min"
    assert final["rss_kb"] - base["rss_kb"] < 8 * 1024, (base, final)
    # Publish never blocks: the publisher (which never sleeps in its loop) hardly ever
    # gives up the CPU on its own; slow publishes are preemption (involuntary switches).
    # One voluntary switch a second on average leaves room for a page fault that waits.
    blocked = sum(s["voluntary_cs_delta"] for s in samples)
    assert blocked <= SECONDS, f"the publisher blocked {blocked} times"
    assert end_version > 0
