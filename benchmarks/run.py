"""The benchmark harness of issue 3: shmcast against its peers, in one run.

Usage (from the repository root)::

    python -m benchmarks            # full run: prints the tables, rewrites docs/benchmarks.md
    python -m benchmarks --quick    # under a minute, writes to benchmarks/results/tmp/

Every peer runs the same publish loop in this process and the same subscriber
loop (``benchmarks/_worker.py``) in N processes started through a forkserver;
each publish is one JSON encode of ``{"t": monotonic_ns, "i": seq, "d": pad}``
and each delivery one decode, and latency is the subscriber's
``time.monotonic_ns()`` minus ``t``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python benchmarks/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _codec, _worker, cfloor, floor
from benchmarks.adapters import BY_NAME, PEERS, Options, Peer
from benchmarks.adapters.shmcomm_peer import SEGMENT_PREFIX as SHMCOMM_SEGMENT_PREFIX

ROOT = Path(__file__).resolve().parent.parent
W = _worker


# --------------------------------------------------------------------------- settings


class Plan:
    """What one run measures; ``--quick`` shrinks every dimension."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.tp_ns = [1, 4] if quick else [1, 4, 16]
        self.tp_sizes = [100] if quick else [100, 2048]
        self.tp_seconds = 0.3 if quick else 3.0
        self.drain_cap = 2.0 if quick else 20.0
        self.settle = 0.2 if quick else 0.5
        self.lat_ns = [1, 4] if quick else [1, 4, 16]
        self.lat_rate = 2000
        self.lat_seconds = 0.3 if quick else 3.0
        self.lat_warmup = 50
        self.stall_events = 2000 if quick else 20_000
        self.stall_cap = 1.0 if quick else 30.0
        self.floor_ns = [1, 4, 16]
        self.floor_k = 500 if quick else 4000
        self.floor_rounds = 1 if quick else 5
        self.scale_ns = [1, 4] if quick else [1, 2, 4, 8, 16, 32, 64]
        self.scale_sizes = [4096] if quick else [64, 256, 1024, 4096, 16384, 65536]
        self.scale_size_n = 4
        self.scale_k = 300 if quick else 2000
        self.depth = 1024


# --------------------------------------------------------------------------- processes


_ctx: Any = None


def context() -> Any:
    """The forkserver context: subscribers start clean (no inherited sockets or threads), fast."""
    global _ctx  # noqa: PLW0603 - one context per process, made on first use
    if _ctx is None:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        )
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(["benchmarks._worker", "benchmarks._codec", "json"])
    return _ctx


class Fleet:
    """N subscriber processes of one peer; every one is killed by pid and reaped in ``stop``."""

    def __init__(
        self, peer: Peer, channel: Any, n: int, *, warmup: int = 0, keep_latency: bool = False
    ) -> None:
        ctx = context()
        self.n = n
        self.channel = channel
        self.raw = ctx.RawArray("q", W.BASE + W.STRIDE * n)
        self.ctrl = W.counters(self.raw)
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.stopped: set[int] = set()
        self.latencies = array("q")
        self.errors: list[str] = []
        try:
            for i in range(n):
                rd, wr = ctx.Pipe(duplex=False)
                p = ctx.Process(
                    target=W.main,
                    name=f"bench-sub-{peer.name}-{i}",
                    daemon=True,
                    args=(
                        peer.module,
                        channel.spec(i),
                        i,
                        self.raw,
                        wr,
                        warmup,
                        keep_latency,
                        peer.opts.json,
                    ),
                )
                p.start()
                wr.close()
                self.procs.append(p)
                self.conns.append(rd)
        except BaseException:
            self.stop()
            raise

    def _slot(self, i: int, field: int) -> int:
        return int(self.ctrl[W.BASE + i * W.STRIDE + field])

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for i, p in enumerate(self.procs):
            while self._slot(i, W.READY) != 1:
                if self._slot(i, W.READY) == -1 or not p.is_alive():
                    raise RuntimeError(f"subscriber {i} failed: {self._error(i)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"subscriber {i} not ready after {timeout} s")
                time.sleep(0.005)
        self.channel.wait_ready(self.n, deadline)

    def _error(self, i: int) -> str:
        conn = self.conns[i]
        with contextlib.suppress(Exception):
            if conn.poll(2):
                status, detail = conn.recv()
                if status == "error":
                    return str(detail).strip().splitlines()[-1]
        return f"exit code {self.procs[i].exitcode}"

    def counts(self) -> list[int]:
        return [self._slot(i, W.COUNT) for i in range(self.n)]

    def lasts(self) -> list[int]:
        return [self._slot(i, W.LAST) for i in range(self.n)]

    def sigstop(self, i: int) -> None:
        os.kill(self.procs[i].pid, signal.SIGSTOP)
        self.stopped.add(i)

    def drain(self, expected: int, t_end: int, cap: float, settle: float) -> bool:
        """Wait until every subscriber has *expected* events or the counts stop moving.

        :returns: whether *cap* seconds after *t_end* passed first
        """
        prev = -1
        moved = time.monotonic()
        cap_at = t_end / 1e9 + cap
        live = [i for i in range(self.n) if i not in self.stopped]
        while True:
            c = self.counts()
            if all(c[i] >= expected for i in live):
                return False
            s = sum(c)
            now = time.monotonic()
            if s != prev:
                prev, moved = s, now
            elif now - moved > settle:
                return False
            if now > cap_at:
                return True
            time.sleep(0.005)

    def stop(self) -> None:
        """Raise the stop flag, reap every process (by pid, SIGKILL if need be)."""
        self.ctrl[W.STOP] = 1
        for i in list(self.stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.procs[i].pid, signal.SIGCONT)
        deadline = time.monotonic() + 5
        for i, conn in enumerate(self.conns):
            with contextlib.suppress(Exception):
                if conn.poll(max(0.0, deadline - time.monotonic())):
                    status, detail = conn.recv()
                    if status == "ok":
                        self.latencies.frombytes(detail)
                    else:
                        self.errors.append(f"subscriber {i}: {detail}")
            conn.close()
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.join(5)
        self.procs = [p for p in self.procs if p.exitcode is None]
        if self.procs:
            raise RuntimeError(f"could not reap subscribers {[p.pid for p in self.procs]}")


@contextlib.contextmanager
def trial(peer: Peer, n: int, max_bytes: int, depth: int, **kw: Any) -> Any:
    """A ready channel with *n* live subscribers; everything is torn down on exit."""
    channel = peer.channel(n, max_bytes, depth)
    fleet = None
    try:
        fleet = Fleet(peer, channel, n, **kw)
        fleet.wait_ready()
        yield channel, fleet
    finally:
        try:
            if fleet is not None:
                fleet.stop()
        finally:
            channel.close()
    if fleet.errors:
        raise RuntimeError("; ".join(fleet.errors))


# --------------------------------------------------------------------------- helpers


def pad_for(size: int) -> str:
    """The ``d`` string that makes an encoded payload about *size* bytes."""
    probe = json.dumps({"t": time.monotonic_ns(), "i": 100000, "d": ""}, separators=(",", ":"))
    return "x" * max(0, size - len(probe))


def pct(sorted_vals: Any, q: float) -> float:
    if not len(sorted_vals):
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, round(q / 100 * (len(sorted_vals) - 1))))
    return float(sorted_vals[k])


def rss_kib(field: str) -> int:
    """A ``/proc/self/status`` memory line in KiB (``RssAnon`` excludes shared ring pages)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def burst(publish: Callable[[Any], None], pad: str, seconds: float) -> tuple[int, int, int]:
    """Publish as fast as possible for *seconds*; return (count, start ns, end ns)."""
    mono = time.monotonic_ns
    i = 0
    t0 = mono()
    end = t0 + int(seconds * 1e9)
    while True:
        for _ in range(32):
            publish({"t": mono(), "i": i, "d": pad})
            i += 1
        if mono() >= end:
            return i, t0, mono()


# --------------------------------------------------------------------------- scenarios


def sc_throughput(peer: Peer, plan: Plan, n: int, size: int) -> dict[str, Any]:
    with trial(peer, n, size, plan.depth) as (ch, fleet):
        pad = pad_for(size)
        published, t0, t1 = burst(ch.publish, pad, plan.tp_seconds)
        capped = fleet.drain(published, t1, plan.drain_cap, plan.settle)
        counts = fleet.counts()
        last = max(fleet.lasts())
    delivered = sum(counts)
    span = (max(last, t1) - t0) / 1e9
    return {
        "published": published,
        "publish_rate": published / ((t1 - t0) / 1e9),
        "delivered": delivered,
        "delivered_rate": delivered / span,
        "lost": published * n - delivered,
        "loss_pct": 100.0 * (published * n - delivered) / (published * n),
        "drain_s": max(0, last - t1) / 1e9,
        "drain_capped": capped,
        **torn_of(ch),
    }


def torn_of(channel: Any) -> dict[str, int]:
    """``{"torn": k}`` for a peer whose subscribers check a payload checksum (shm-comm):
    copies rejected as torn, which are counted lost, not delivered."""
    torn = getattr(channel, "torn", None)
    return {} if torn is None else {"torn": int(torn)}


def sc_latency(peer: Peer, plan: Plan, n: int) -> dict[str, Any]:
    count = int(plan.lat_rate * plan.lat_seconds) + plan.lat_warmup
    with trial(peer, n, 100, plan.depth, warmup=plan.lat_warmup, keep_latency=True) as (ch, fleet):
        pad = pad_for(100)
        publish = ch.publish
        mono = time.monotonic_ns
        sleep = time.sleep
        step = 1e9 / plan.lat_rate
        t0 = mono()
        for i in range(count):
            wait = t0 + i * step - mono()
            if wait > 0:
                sleep(wait / 1e9)
            publish({"t": mono(), "i": i, "d": pad})
        t1 = mono()
        fleet.drain(count, t1, 5.0, plan.settle)
        delivered = sum(fleet.counts())
    lat = sorted(fleet.latencies)
    return {
        "p50_us": pct(lat, 50) / 1e3,
        "p99_us": pct(lat, 99) / 1e3,
        "max_us": (lat[-1] / 1e3) if lat else float("nan"),
        "samples": len(lat),
        "rate": count / ((t1 - t0) / 1e9),
        "lost": count * n - delivered,
        **torn_of(ch),
    }


def sc_stalled(peer: Peer, plan: Plan) -> dict[str, Any]:
    n = 4
    with trial(peer, n, 100, plan.depth) as (ch, fleet):
        fleet.sigstop(0)
        time.sleep(0.05)
        pad = pad_for(100)
        publish = ch.publish
        pc = time.perf_counter_ns
        mono = time.monotonic_ns
        times = array("q")
        gc.collect()
        anon0, rss0 = rss_kib("RssAnon"), rss_kib("VmRSS")
        cap_at = time.monotonic() + plan.stall_cap
        done = 0
        t_start = time.monotonic()
        for i in range(plan.stall_events):
            a = pc()
            publish({"t": mono(), "i": i, "d": pad})
            times.append(pc() - a)
            done = i + 1
            if time.monotonic() > cap_at:
                break
        elapsed = time.monotonic() - t_start
        anon1, rss1 = rss_kib("RssAnon"), rss_kib("VmRSS")
        fleet.drain(done, time.monotonic_ns(), 3.0, plan.settle)
        counts = fleet.counts()
    t = sorted(times)
    return {
        "completed": done,
        "of": plan.stall_events,
        "seconds": elapsed,
        "p50_us": pct(t, 50) / 1e3,
        "p99_us": pct(t, 99) / 1e3,
        "max_us": t[-1] / 1e3,
        "anon_growth_mb": (anon1 - anon0) / 1024,
        "rss_growth_mb": (rss1 - rss0) / 1024,
        "live_delivered": sum(counts[1:]),
        "live_expected": done * (n - 1),
    }


def stalled_in_child(peer: Peer, plan: Plan, json_impl: str) -> dict[str, Any]:
    """Run ``sc_stalled`` in a new interpreter, so its heap growth is not hidden by free
    memory left over from earlier scenarios."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--stalled-child",
        peer.name,
        "--json",
        json_impl,
        *(["--quick"] if plan.quick else []),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        ),
    )
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=plan.stall_cap + 90)
    finally:
        if proc.poll() is None:  # timed out or interrupted: let it clean up, then force
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"stalled run exited with {proc.returncode}")
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if "error" in res:
        raise RuntimeError(res["error"])
    return res


def stalled_child(name: str, plan: Plan, json_impl: str) -> int:
    """The child side of ``stalled_in_child``: one peer session, one scenario, JSON on stdout."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with tempfile.TemporaryDirectory(prefix="shmcast-bench-") as tmp:
        cls = BY_NAME[name]
        peer = cls(Options(json=json_impl, tmpdir=tmp))
        try:
            res: dict[str, Any] = sc_stalled(peer, plan)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            res = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            peer.close()
    print(json.dumps(res), flush=True)
    return 0


def sc_publish_cost(peer: Peer, plan: Plan, n: int, size: int) -> dict[str, Any]:
    k = plan.scale_k if size <= 4096 else max(200, plan.scale_k * 4096 // size)
    with trial(peer, n, size, 64 if size > 4096 else plan.depth) as (ch, fleet):
        objs = floor.payloads(k, pad_for(size))
        publish = ch.publish
        pc = time.perf_counter_ns
        times = array("q")
        for obj in objs:
            a = pc()
            publish(obj)
            times.append(pc() - a)
        fleet.drain(k, time.monotonic_ns(), 2.0, 0.2)
    t = sorted(times)
    return {"mean_us": sum(t) / len(t) / 1e3, "p50_us": pct(t, 50) / 1e3, "k": k}


def shmcast_idle_cost(n: int, objs: list[dict[str, Any]], slot_size: int) -> float:
    """Seconds per ``Bus.publish`` with *n* attached subscribers none of which is waiting."""
    import shmcast

    name = f"bench-{os.getpid()}-idle"
    with shmcast.Bus(name, slots=len(objs), slot_size=slot_size, max_subscribers=max(64, n)) as bus:
        subs = [shmcast.subscribe(name) for _ in range(n)]
        try:
            publish = bus.publish
            publish("bench", objs[0])  # first-touch costs out of the timing
            for s in subs:
                s.get(timeout=1)
            t0 = time.perf_counter()
            for obj in objs[1:]:
                publish("bench", obj)
            return (time.perf_counter() - t0) / (len(objs) - 1)
        finally:
            for s in subs:
                s.unsubscribe()


def shmcast_get_cost(objs: list[dict[str, Any]], slot_size: int) -> float:
    """Seconds per ``Subscription.get`` + ``.payload`` when the event is already in the ring."""
    import shmcast

    name = f"bench-{os.getpid()}-get"
    with shmcast.Bus(name, slots=len(objs), slot_size=slot_size) as bus:
        sub = shmcast.subscribe(name)
        try:
            for obj in objs:
                bus.publish("bench", obj)
            get = sub.get
            t0 = time.perf_counter()
            for _ in objs:
                get(timeout=0).payload  # noqa: B018 - the decode is the point
            return (time.perf_counter() - t0) / len(objs)
        finally:
            sub.unsubscribe()


def sc_floor(
    plan: Plan,
    json_impl: str,
    shm_ok: bool,
    ns: list[int],
    size: int = 100,
) -> list[dict[str, Any]]:
    rows = []
    # Rings are as long as the run so nothing wraps; keep them under ~64 MB for big payloads.
    objs = floor.payloads(min(plan.floor_k, max(200, (64 << 20) // (size + 512))), pad_for(size))
    slot_size = 512 if size <= 256 else size + 512
    for n in ns:
        f = min(
            floor.publish_floor(n, objs, slot_size, json_impl) for _ in range(plan.floor_rounds)
        )
        row: dict[str, Any] = {"n": n, "size": size, "floor_us": f * 1e6}
        if shm_ok:
            c = None
            try:
                # Issue 12's floor: the per-ring work in C (the one above is a Python loop).
                c = min(
                    cfloor.publish_floor(n, objs, slot_size, json_impl)
                    for _ in range(plan.floor_rounds)
                )
                row["cfloor_us"] = c * 1e6
            except RuntimeError as exc:
                row["cfloor_error"] = str(exc)
            try:
                s = min(shmcast_idle_cost(n, objs, slot_size) for _ in range(plan.floor_rounds))
                row["shmcast_us"] = s * 1e6
                row["ratio"] = s / f
                if c is not None:
                    row["c_ratio"] = s / c
            except Exception as exc:  # noqa: BLE001 - reported in the table
                row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    g = min(floor.get_floor(objs, slot_size, json_impl) for _ in range(plan.floor_rounds))
    grow: dict[str, Any] = {"n": "get", "size": size, "floor_us": g * 1e6}
    if shm_ok:
        try:
            s = min(shmcast_get_cost(objs, slot_size) for _ in range(plan.floor_rounds))
            grow["shmcast_us"] = s * 1e6
            grow["ratio"] = s / g
        except Exception as exc:  # noqa: BLE001
            grow["error"] = f"{type(exc).__name__}: {exc}"
    rows.append(grow)
    return rows


# --------------------------------------------------------------------------- driver


# The figures whose range across repetitions the tables show next to the median.
SPREAD_KEYS = ("delivered_rate", "loss_pct", "p50_us", "p99_us")


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    if len(runs) == 1:
        return runs[0]
    out: dict[str, Any] = {}
    for key, val in runs[0].items():
        vals = [r[key] for r in runs if key in r]
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            out[key] = val if not isinstance(val, bool) else any(vals)
        else:
            out[key] = statistics.median(vals)
    out["reps"] = len(runs)
    out["spread"] = {
        k: [min(r[k] for r in runs), max(r[k] for r in runs)]
        for k in SPREAD_KEYS
        if all(k in r for r in runs)
    }
    return out


def attempt(
    label: str,
    fn: Callable[[], dict[str, Any]],
    repeat: int,
    log: Callable[[str], None],
    rep: tuple[int, int] | None = None,
) -> dict[str, Any]:
    runs = []
    for r in range(repeat):
        t = time.monotonic()
        load = os.getloadavg()[0]
        try:
            runs.append(fn())
            runs[-1]["load1"] = load
        except Exception as exc:  # noqa: BLE001 - one failing cell must not sink the run
            log(f"  {label}: FAILED {type(exc).__name__}: {exc}")
            if os.environ.get("SHMCAST_BENCH_DEBUG"):
                traceback.print_exc()
            return {"error": f"{type(exc).__name__}: {exc}"}
        k, of = rep or (r, repeat)
        log(
            f"  {label}{f' (rep {k + 1})' if of > 1 else ''}: {summary(runs[-1])} "
            f"[{time.monotonic() - t:.1f} s]"
        )
    return median_of(runs)


def attempt_peers(
    label: str,
    peers: list[Peer],
    fn: Callable[[Peer], dict[str, Any]],
    repeat: int,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """One cell for every peer, repetitions interleaved (peer A, B, …, then A, B, … again)
    so a change in the machine's load falls on every peer alike; medians per peer."""
    runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in peers}
    failed: dict[str, dict[str, Any]] = {}
    for r in range(repeat):
        for p in peers:
            if p.name in failed:
                continue
            res = attempt(f"{p.name} {label}", lambda p=p: fn(p), 1, log, rep=(r, repeat))
            if "error" in res:
                failed[p.name] = res
            else:
                runs[p.name].append(res)
    return {p.name: failed.get(p.name) or median_of(runs[p.name]) for p in peers}


def summary(res: dict[str, Any]) -> str:
    keys = [
        "delivered_rate",
        "loss_pct",
        "p50_us",
        "p99_us",
        "max_us",
        "completed",
        "anon_growth_mb",
        "mean_us",
    ]
    return " ".join(
        f"{k}={res[k]:.4g}" for k in keys if k in res and isinstance(res[k], float)
    ) or ", ".join(f"{k}={v}" for k, v in res.items())


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    with contextlib.suppress(Exception):
        import shmcast

        out["shmcast core"] = "C" if shmcast.native else "pure Python"
    for dist in [
        "shmcast", "posix_ipc", "pyzmq", "faster-fifo", "redis", "iceoryx2", "shm-comm", "numpy",
        "orjson",
    ]:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    with contextlib.suppress(Exception):
        import subprocess

        from benchmarks.adapters.redis_peer import _server_binary

        b = _server_binary()
        if b:
            out["redis-server"] = (
                subprocess.run(
                    [b, "--version"], capture_output=True, text=True, timeout=5, check=False
                )
                .stdout.split()[2]
                .removeprefix("v=")
            )
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run, under a minute (CI)")
    ap.add_argument(
        "--peers",
        default=",".join(p.name for p in PEERS),
        help="comma-separated peers to run (default: all)",
    )
    ap.add_argument(
        "--scenarios",
        default="throughput,latency,stalled,floor,scaling",
        help="comma-separated scenarios (default: all)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="repetitions per cell; medians reported")
    ap.add_argument(
        "--json",
        choices=_codec.CHOICES,
        default="auto",
        help="JSON of the peers and of the floor: auto (default) is stdlib+orjson (encode with "
        "the stdlib, decode with orjson, as shmcast's json codec does) when orjson is "
        "installed, else stdlib",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where the markdown and PNGs go (default: docs/ for a full run, "
        "benchmarks/results/tmp/ for --quick)",
    )
    ap.add_argument("--no-docs", action="store_true", help="print only; write nothing")
    ap.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 if a cell of an available peer failed or the run left anything in /dev/shm",
    )
    ap.add_argument(
        "--render",
        metavar="JSON",
        type=Path,
        help="measure nothing: re-render the tables and charts of a saved run "
        "(e.g. benchmarks/results/latest.json)",
    )
    ap.add_argument("--stalled-child", metavar="PEER", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    plan = Plan(args.quick)
    scenarios = set(args.scenarios.split(","))
    wanted = [s.strip() for s in args.peers.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in BY_NAME]
    if unknown:
        print(f"unknown peers {unknown}; known: {list(BY_NAME)}", file=sys.stderr)
        return 2
    from benchmarks import _report

    args.json = _codec.resolve(args.json)
    os.environ[_codec.ENV] = args.json
    if args.stalled_child:
        return stalled_child(args.stalled_child, plan, args.json)
    if args.render:
        saved = json.loads(args.render.read_text())
        out = None if args.no_docs else (args.out or ROOT / "docs")
        print(_report.render(saved, out))
        return 0
    started = time.monotonic()
    shm_before = set(_shm_entries())
    log = lambda s: print(s, flush=True)  # noqa: E731
    results: dict[str, Any] = {
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "loadavg_start": os.getloadavg(),
        "versions": versions(),
        "json": args.json,
        "quick": args.quick,
        "depth": plan.depth,
        "unavailable": {},
        "semantics": {},
        "throughput": {},
        "latency": {},
        "stalled": {},
        "floor": [],
        "scaling_n": {},
        "scaling_size": {},
    }
    # Signals become exceptions so every ``finally`` below runs and reaps its processes.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    with tempfile.TemporaryDirectory(prefix="shmcast-bench-") as tmp:
        opts = Options(json=args.json, tmpdir=tmp)
        peers: list[Peer] = []
        try:
            for cls in PEERS:
                if cls.name not in wanted:
                    continue
                why = cls.unavailable()
                if why is None:
                    try:
                        peers.append(cls(opts))
                    except Exception as exc:  # noqa: BLE001
                        why = f"setup failed: {type(exc).__name__}: {exc}"
                if why is not None:
                    log(f"{cls.name}: unavailable: {why}")
                    results["unavailable"][cls.name] = why
                results["semantics"][cls.name] = cls.semantics
            run_all(peers, plan, scenarios, args, results, log)
        finally:
            for p in peers:
                try:
                    p.close()
                except Exception as exc:  # noqa: BLE001
                    log(f"{p.name}: close failed: {exc}")
    results["seconds"] = time.monotonic() - started
    results["loadavg_end"] = os.getloadavg()
    out = (
        None
        if args.no_docs
        else (
            args.out or (ROOT / "benchmarks" / "results" / "tmp" if args.quick else ROOT / "docs")
        )
    )
    print(_report.render(results, out))
    log(f"total {results['seconds']:.1f} s")
    leaks = sorted(set(_shm_entries()) - shm_before)
    if leaks:
        log(f"LEFT IN /dev/shm: {leaks}")
    failed = _failures(results)
    if failed:
        log(f"FAILED CELLS: {failed}")
    return 1 if args.strict and (leaks or failed) else 0


def _commit() -> str:
    """The checkout's commit, with ``+changes`` when tracked files differ from it."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *a], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _shm_entries() -> list[str]:
    """This suite's names in /dev/shm: its shmcast buses (``bench-PID-…``), floor semaphores
    and shm-comm segments."""
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return []
    return [
        n
        for n in names
        if n.startswith(
            ("shmcast.bench-", "sem.shmcast.bench-", "sem.shmcast-bench-", SHMCOMM_SEGMENT_PREFIX)
        )
    ]


def _failures(results: dict[str, Any]) -> list[str]:
    out = []
    for sec in ("throughput", "latency", "scaling_n", "scaling_size"):
        for peer, by in results.get(sec, {}).items():
            out += [f"{sec} {peer} {cell}" for cell, r in by.items() if "error" in r]
    out += [f"stalled {peer}" for peer, r in results.get("stalled", {}).items() if "error" in r]
    out += [f"floor {r['n']}" for r in results.get("floor", []) if "error" in r]
    return out


def run_all(
    peers: list[Peer],
    plan: Plan,
    scenarios: set[str],
    args: argparse.Namespace,
    results: dict[str, Any],
    log: Callable[[str], None],
) -> None:
    rep = args.repeat
    partial = ROOT / "benchmarks" / "results" / "tmp" / "partial.json"
    started = time.monotonic()

    def checkpoint(done: str) -> None:
        """What is measured so far, for ``--render`` if the run must be stopped early."""
        partial.parent.mkdir(parents=True, exist_ok=True)
        snap = dict(
            results,
            partial_after=done,
            seconds=time.monotonic() - started,
            loadavg_end=os.getloadavg(),
        )
        partial.write_text(json.dumps(snap, indent=1, default=str))

    if "throughput" in scenarios:
        log("== throughput")
        for size in plan.tp_sizes:
            for n in plan.tp_ns:
                cell = attempt_peers(
                    f"size={size} N={n}",
                    peers,
                    lambda p, n=n, size=size: sc_throughput(p, plan, n, size),
                    rep,
                    log,
                )
                for name, res in cell.items():
                    results["throughput"].setdefault(name, {})[f"{size}/{n}"] = res
        checkpoint("throughput")
    if "latency" in scenarios:
        log("== latency")
        for n in plan.lat_ns:
            cell = attempt_peers(f"N={n}", peers, lambda p, n=n: sc_latency(p, plan, n), rep, log)
            for name, res in cell.items():
                results["latency"].setdefault(name, {})[str(n)] = res
        checkpoint("latency")
    if "floor" in scenarios:
        log("== floor")
        shm_ok = any(p.name == "shmcast" for p in peers)
        results["floor"] = sc_floor(plan, args.json, shm_ok, plan.floor_ns)
        for row in results["floor"]:
            log(f"  {row}")
        checkpoint("floor")
    if "stalled" in scenarios:
        # A fresh publisher process per peer, so heap growth is not absorbed by memory
        # freed in earlier scenarios; --quick stays in-process (it checks function only).
        log("== stalled subscriber" + ("" if plan.quick else " (each in a fresh process)"))
        for p in peers:
            results["stalled"][p.name] = attempt(
                p.name,
                (lambda p=p: sc_stalled(p, plan))
                if plan.quick
                else (lambda p=p: stalled_in_child(p, plan, args.json)),
                1,
                log,
            )
        checkpoint("stalled")
    if "scaling" in scenarios:
        log("== scaling")
        results["scaling_floor_n"] = {
            str(r["n"]): r["floor_us"]
            for r in sc_floor(plan, args.json, False, plan.scale_ns)
            if r["n"] != "get"
        }
        results["scaling_floor_size"] = {}
        for size in plan.scale_sizes:
            rows = sc_floor(plan, args.json, False, [plan.scale_size_n], size)
            results["scaling_floor_size"][str(size)] = rows[0]["floor_us"]
        for p in peers:
            for n in plan.scale_ns:
                results["scaling_n"].setdefault(p.name, {})[str(n)] = attempt(
                    f"{p.name} N={n}", lambda p=p, n=n: sc_publish_cost(p, plan, n, 100), 1, log
                )
            for size in plan.scale_sizes:
                results["scaling_size"].setdefault(p.name, {})[str(size)] = attempt(
                    f"{p.name} size={size} N={plan.scale_size_n}",
                    lambda p=p, size=size: sc_publish_cost(p, plan, plan.scale_size_n, size),
                    1,
                    log,
                )


__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
