"""``python -m benchmarks sse``: SSE end to end, real gunicorn, shmcast against Redis.

Usage (from the repository root)::

    python -m benchmarks sse            # cells a and b, every deployment; writes
                                        # benchmarks/results/sse-latest.json and the
                                        # "SSE end to end" section of docs/benchmarks.md
    python -m benchmarks sse --quick    # 50 clients, a few seconds each (CI); a temp dir only
    python -m benchmarks sse --cells a --deployments shmcast-asgi,broadcaster-asgi --repeat 3

Per cell (C clients at R events/s on W workers) and deployment, the harness starts
the servers (a ``redis-server`` on 127.0.0.1 for the peers, gunicorn, the peers'
publisher), one load process (``benchmarks/sse_load.py``: C raw-socket SSE clients on
asyncio), reads /proc counters of every process it started when the load process opens
and closes its measuring window, then stops everything by pid (SIGTERM, SIGKILL after
a deadline). Deployments:

* ``shmcast-asgi``: ``examples/asgi_sse`` (uvicorn workers), its own gunicorn.conf.py;
* ``shmcast-wsgi``: ``examples/gunicorn_sse`` (gthread, threads sized to the clients);
* ``broadcaster-asgi``: ``benchmarks/peers/asgi_broadcaster.py``, encode/broadcaster
  0.3.1 over Redis pub/sub, one Redis connection per worker (uvicorn workers);
* ``flask-sse-wsgi``: ``benchmarks/peers/wsgi_flask_sse.py``, the Flask-SSE shape, one
  Redis pub/sub connection per client (gthread).

The shmcast examples' gunicorn master publishes the events itself (``heartbeat`` every
``SHMCAST_HEARTBEAT`` = 1/R seconds, carrying ``ts = time.time()``, and its ``members``
snapshots); the harness talks to the examples only through HTTP and their environment
settings. The peers get the same heartbeats at the same rate from
``benchmarks/peers/publisher.py`` through Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import queue
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PEERS_DIR = Path(__file__).resolve().parent / "peers"
RESULTS = ROOT / "benchmarks" / "results" / "sse-latest.json"
SHM = Path("/dev/shm")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    clients: int
    rate: float  # events per second at the source
    workers: int
    settle: float  # seconds between the last handshake and the window
    duration: float  # the measuring window
    drain: float  # at most this long after it for late events
    connect_deadline: float

    @property
    def label(self) -> str:
        return f"{self.clients:,} clients at {self.rate:g} events/s on {self.workers} workers"


CELLS = {
    "a": Cell("a", 1000, 10.0, 2, settle=5, duration=20, drain=15, connect_deadline=120),
    "b": Cell("b", 10000, 1.0, 2, settle=10, duration=30, drain=30, connect_deadline=240),
}
QUICK = Cell("quick", 50, 10.0, 2, settle=1, duration=3, drain=3, connect_deadline=20)


@dataclasses.dataclass(frozen=True)
class Deployment:
    name: str
    kind: str  # "shmcast" or "peer"
    gthread: bool
    chdir: Path
    conf: str
    publish_format: str = ""  # the peers' publisher wire format
    about: str = ""


DEPLOYMENTS = [
    Deployment(
        "shmcast-asgi",
        "shmcast",
        False,
        EXAMPLES / "asgi_sse",
        "gunicorn.conf.py",
        about="examples/asgi_sse (uvicorn workers)",
    ),
    Deployment(
        "shmcast-wsgi",
        "shmcast",
        True,
        EXAMPLES / "gunicorn_sse",
        "gunicorn.conf.py",
        about="examples/gunicorn_sse (gthread)",
    ),
    Deployment(
        "broadcaster-asgi",
        "peer",
        False,
        PEERS_DIR,
        "gunicorn_broadcaster.conf.py",
        "broadcaster",
        about="broadcaster 0.3.1 + Redis pub/sub, one connection per worker (uvicorn workers)",
    ),
    Deployment(
        "flask-sse-wsgi",
        "peer",
        True,
        PEERS_DIR,
        "gunicorn_flask_sse.conf.py",
        "flask_sse",
        about="Flask-SSE shape, one Redis pub/sub connection per client (gthread)",
    ),
]
BY_NAME = {d.name: d for d in DEPLOYMENTS}


def unavailable(dep: Deployment) -> str | None:
    """Why *dep* cannot run here, or None."""
    need = ["gunicorn"]
    need += ["flask"] if dep.gthread else ["starlette", "uvicorn", "uvicorn_worker"]
    if dep.kind == "peer":
        need += ["redis"] + ([] if dep.gthread else ["broadcaster"])
    import importlib.util

    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"
    if dep.kind == "peer":
        if redis_binary() is None:
            return "no redis-server on PATH (apt-get install redis-server)"
        if not dep.gthread:
            from importlib import metadata

            major = int(metadata.version("redis").split(".")[0])
            if major >= 8:
                return (
                    f"redis-py {metadata.version('redis')}: broadcaster 0.3.1 delivers nothing "
                    "with redis-py 8 (pip install 'redis>=5,<6', the bench extra's pin)"
                )
    return None


def redis_binary() -> str | None:
    return os.environ.get("REDIS_SERVER") or shutil.which("redis-server")


def max_bus_subscribers() -> int:
    """The core's cap on a bus's subscribers (today every SSE stream of the examples is one).

    Asked in a child interpreter: the harness itself never imports shmcast, so that what
    it measures (the core in this tree, maybe half-rewritten) cannot crash it.
    """
    return int(_core_facts().get("max_subscribers", 1024))


_facts: dict[str, Any] = {}


def _core_facts() -> dict[str, Any]:
    """What the shmcast in this tree says about itself, from a child interpreter."""
    if not _facts:
        code = (
            "import json, shmcast; from shmcast import _names; print(json.dumps({"
            "'max_subscribers': _names.MAX_SUBSCRIBERS, "
            "'native': getattr(shmcast, 'native', None)}))"
        )
        with contextlib.suppress(OSError, subprocess.TimeoutExpired, ValueError, IndexError):
            out = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                cwd=ROOT,
            ).stdout
            _facts.update(json.loads(out.strip().splitlines()[-1]))
    return _facts


# --------------------------------------------------------------------------- /proc


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state)."""
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return s[s.rindex(")") + 2 :].split()


def cpu_ticks(pid: int) -> int | None:
    f = proc_stat(pid)
    return None if f is None else int(f[11]) + int(f[12])  # utime + stime


def start_time(pid: int) -> int | None:
    f = proc_stat(pid)
    return None if f is None else int(f[19])


def status_field(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def children_of(pid: int) -> list[int]:
    """Live direct children of *pid*."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        kids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                st = proc_stat(int(entry))
                if st is not None and int(st[1]) == pid:
                    kids.append(int(entry))
    return [k for k in kids if (proc_stat(k) or ["Z"])[0] != "Z"]


def bus_entries(bus: str) -> list[Path]:
    """The /dev/shm entries of bus *bus*: its segments and its semaphores, nothing else."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(SHM):
            name = entry.removeprefix("sem.")
            if name == f"shmcast.{bus}" or name.startswith(f"shmcast.{bus}."):
                out.append(SHM / entry)
    return out


def shm_usage(bus: str) -> tuple[int, int]:
    """(apparent size, allocated bytes) of the bus's /dev/shm entries."""
    size = used = 0
    for p in bus_entries(bus):
        with contextlib.suppress(FileNotFoundError):
            st = p.stat()
            size += st.st_size
            used += st.st_blocks * 512
    return size, used


# --------------------------------------------------------------------------- processes


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard one, for this process and everything it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


class Managed:
    """A process this harness started; ``stop`` ends it (and any extra pids it adopted)
    by pid: SIGTERM, then SIGKILL once *grace* seconds passed."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        *,
        cwd: Path,
        env: dict[str, str],
        log: Path,
        grace: float = 10.0,
        stdout_pipe: bool = False,
    ) -> None:
        self.name = name
        self.log = log
        self.grace = grace
        self.extra: dict[int, int | None] = {}  # pid -> start time (guards against pid reuse)
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else f,
                stderr=f,
                start_new_session=True,  # Ctrl-C at the terminal reaches only the harness
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def adopt(self, pids: list[int]) -> None:
        for p in pids:
            self.extra.setdefault(p, start_time(p))

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.alive():
            self.adopt(children_of(self.pid))
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(10)
        # Workers of a master that had to be killed: ours if their start time still matches.
        deadline = time.monotonic() + 5
        for pid, born in self.extra.items():
            while born is not None and start_time(pid) == born:
                if (proc_stat(pid) or ["Z"])[0] == "Z":
                    break
                now = time.monotonic()
                if now > deadline + 10:
                    raise RuntimeError(f"{self.name}: pid {pid} survived SIGKILL")
                if now > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def child_env(extra: dict[str, str], tmp: Path) -> dict[str, str]:
    runtime = tmp / "run"  # gunicorn >= 24 keeps a control socket in XDG_RUNTIME_DIR
    runtime.mkdir(exist_ok=True)
    pythonpath = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(pythonpath),
        "PYTHONUNBUFFERED": "1",
        "XDG_RUNTIME_DIR": str(runtime),
        **extra,
    }


@contextlib.contextmanager
def redis_server(tmp: Path, maxclients: int) -> Iterator[tuple[Managed, str]]:
    import redis

    port = free_port()
    rdir = tmp / "redis"
    rdir.mkdir(exist_ok=True)
    cmd = [
        str(redis_binary()),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--protected-mode",
        "yes",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(rdir),
        # Flask-SSE holds one connection per client; redis refuses past maxclients.
        "--maxclients",
        str(maxclients),
        "--logfile",
        str(rdir / "redis.log"),
    ]
    proc = Managed(
        "redis-server", cmd, cwd=rdir, env=dict(os.environ), log=tmp / "redis.out", grace=5
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_timeout=1)

        def up() -> bool:
            if not proc.alive():
                raise RuntimeError(f"redis-server exited: {(rdir / 'redis.log').read_text()}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, 15, "redis-server to answer PING", 0.05)
        client.close()
        yield proc, url
    finally:
        proc.stop()


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


@contextlib.contextmanager
def gunicorn(
    dep: Deployment, cell: Cell, tmp: Path, env: dict[str, str]
) -> Iterator[tuple[Managed, int]]:
    per_worker = math.ceil(cell.clients / cell.workers * 1.1) + 16
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        dep.conf,
        "--chdir",
        str(dep.chdir),
        "-b",
        "127.0.0.1:0",  # gunicorn binds a free port and logs it
        "-w",
        str(cell.workers),
        # Connections wait here while the workers accept; the kernel caps it at somaxconn.
        "--backlog",
        str(max(2048, min(cell.clients, 65535))),
        # gthread: a worker stops accepting at worker_connections, so with threads equal
        # to it a full worker leaves new clients to the other (no client parked in a queue
        # of a worker without a free thread). Uvicorn workers do not read it.
        "--worker-connections",
        str(per_worker),
        "--timeout",
        "120",  # the worker heartbeat: not killed by a saturated box
        "--graceful-timeout",
        "5",
    ]
    if dep.gthread:
        args += ["--threads", str(per_worker)]
    proc = Managed(
        f"gunicorn {dep.name}",
        args,
        cwd=dep.chdir,
        env=env,
        log=tmp / f"gunicorn-{dep.name}.log",
        grace=15,
    )
    try:

        def listening() -> int | None:
            if not proc.alive():
                raise RuntimeError(f"gunicorn exited early:\n{proc.log_tail()}")
            m = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", proc.log_tail(200))
            return int(m.group(1)) if m else None

        port = int(wait_until(listening, 30, "gunicorn to listen"))

        def booted() -> bool:
            kids = children_of(proc.pid)
            proc.adopt(kids)
            if len(kids) < cell.workers:
                return False
            log = proc.log_tail(400)
            return all(f"Booting worker with pid: {k}" in log for k in kids)

        wait_until(booted, 60, f"{cell.workers} workers to boot", 0.1)
        # /healthz from every worker (each answer names its pid; a new connection per try).
        seen: set[int] = set()
        answered = [0]

        def healthy() -> bool:
            status, body = http_get(port, "/healthz")
            if status == 200:
                answered[0] += 1
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    seen.add(int(json.loads(body)["pid"]))
                if not seen and answered[0] >= 3:
                    return True  # a /healthz that names no pid: take three answers
            return len(seen) >= cell.workers

        with contextlib.suppress(TimeoutError):
            wait_until(healthy, 30, "every worker to answer /healthz", 0.05)
        if not answered[0]:
            raise RuntimeError(f"no worker answers /healthz:\n{proc.log_tail()}")
        yield proc, port
    finally:
        proc.stop()


class LoadProc:
    """The load process and the JSON lines it prints (read by a thread, with deadlines)."""

    def __init__(self, port: int, cell: Cell, args: argparse.Namespace, tmp: Path) -> None:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.sse_load",
            "--port",
            str(port),
            "--clients",
            str(cell.clients),
            "--sample",
            str(min(args.sample, cell.clients)),
            "--settle",
            str(cell.settle),
            "--duration",
            str(cell.duration),
            "--drain",
            str(cell.drain),
            "--connect-deadline",
            str(cell.connect_deadline),
        ]
        if args.last_event_id is not None:
            cmd += ["--last-event-id", args.last_event_id]
        self.proc = Managed(
            "load",
            cmd,
            cwd=ROOT,
            env=child_env({}, tmp),
            log=tmp / "load.err",
            grace=5,
            stdout_pipe=True,
        )
        if args.load_nice:
            # Real clients run elsewhere: here the load shares 2 cores with servers of
            # hundreds of threads (gthread), and a starved load process would add its own
            # lateness to every latency. Its event-loop lag is reported either way.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, args.load_nice)
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.finished = False
        threading.Thread(target=self._read, name="sse-load-reader", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for line in self.proc.proc.stdout:
                with contextlib.suppress(ValueError):
                    self.lines.put(json.loads(line))
        self.lines.put(None)

    def expect(self, phase: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"load process: no {phase!r} within {timeout:.0f} s")
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                raise RuntimeError(f"load process ended before {phase!r}:\n{self.proc.log_tail()}")
            if msg.get("phase") == phase:
                self.finished = phase == "result"
                return msg

    def stop(self) -> None:
        # After its result the load process closes its sockets and exits by itself: let it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.proc.wait(10 if self.finished else 0)
        self.proc.stop()


# --------------------------------------------------------------------------- one run


class Watch:
    """CPU ticks of the processes of one deployment, read at the window's two ends."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.t0 = time.monotonic()
        self.ticks0 = {pid: cpu_ticks(pid) for pids in groups.values() for pid in pids}

    def per_second(self) -> tuple[dict[str, float | None], list[int]]:
        wall = time.monotonic() - self.t0
        out: dict[str, float | None] = {}
        vanished = []
        for group, pids in self.groups.items():
            total, seen = 0.0, False
            for pid in pids:
                a, b = self.ticks0.get(pid), cpu_ticks(pid)
                if a is None or b is None:
                    vanished.append(pid)
                    continue
                total += (b - a) / CLK_TCK
                seen = True
            out[group] = total / wall if seen else None
        return out, vanished


def run_one(
    dep: Deployment, cell: Cell, args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, Any]:
    bus = f"bench-sse-{os.getpid()}-{next(_seq)}"
    res: dict[str, Any] = {"deployment": dep.name, "cell": cell.name, "load1": os.getloadavg()[0]}
    t_start = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="shmcast-bench-sse-") as tmpdir,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(tmpdir)
        procs: dict[str, Managed] = {}
        env: dict[str, str] = {}
        try:
            if dep.kind == "shmcast":
                env = {
                    "SHMCAST_BUS": bus,
                    "SHMCAST_HEARTBEAT": repr(1.0 / cell.rate),
                    "SHMCAST_CHURN": "0",  # no simulated topology changes: the rate is R
                    # Today every stream is one bus subscriber: room for all of them, up to
                    # the core's cap (past it the examples answer 503, counted as refused).
                    "SHMCAST_MAX_SUBSCRIBERS": str(min(cell.clients + 64, max_bus_subscribers())),
                }
                res["bus"] = bus
            else:
                redis_proc, url = stack.enter_context(redis_server(tmp, cell.clients + 1000))
                procs["broker"] = redis_proc
                env = {"BENCH_REDIS_URL": url, "BENCH_CHANNEL": "sse"}
            env.update(args.env)
            res["env"] = env
            cenv = child_env(env, tmp)
            if dep.kind == "peer":
                pub = Managed(
                    "publisher",
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.peers.publisher",
                        "--url",
                        env["BENCH_REDIS_URL"],
                        "--rate",
                        str(cell.rate),
                        "--format",
                        dep.publish_format,
                    ],
                    cwd=ROOT,
                    env=cenv,
                    log=tmp / "publisher.log",
                    grace=5,
                )
                # Stopped after gunicorn: Flask-SSE streams only notice a gone client when
                # they write the next event, so events must flow while the workers stop.
                stack.callback(pub.stop)
                procs["publisher"] = pub
            g, port = stack.enter_context(gunicorn(dep, cell, tmp, cenv))
            procs["master"] = g
            load = LoadProc(port, cell, args, tmp)
            stack.callback(load.stop)  # first out: clients close, streams end, then servers
            t_boot = time.monotonic()
            res["boot_s"] = t_boot - t_start
            msg = load.expect("connected", cell.connect_deadline + 30)
            res["connect_s"] = msg["connect_s"]
            log(f"    {msg['connected']}/{cell.clients} connected in {msg['connect_s']:.1f} s")
            load.expect("start", cell.settle + 30)
            workers = children_of(g.pid)
            g.adopt(workers)
            groups = {
                "master": [g.pid],
                "workers": workers,
                "publisher": [procs["publisher"].pid] if "publisher" in procs else [],
                "broker": [procs["broker"].pid] if "broker" in procs else [],
                "load": [load.proc.pid],
            }
            watch = Watch(groups)
            load.expect("end", cell.duration + 30)
            cpu, vanished = watch.per_second()
            threads = [status_field(w, "Threads") for w in workers]
            fds = [fd_count(w) for w in workers]
            rss = [status_field(w, "VmRSS") for w in workers]
            if dep.kind == "shmcast":
                res["shm_size"], res["shm_used"] = shm_usage(bus)
            res.update(
                cpu_master=cpu["master"],
                cpu_publisher=cpu["publisher"],
                cpu_workers=cpu["workers"],
                cpu_broker=cpu["broker"],
                cpu_load_proc=cpu["load"],
                threads_per_worker=[t for t in threads if t is not None],
                fds_per_worker=[f for f in fds if f is not None],
                rss_workers_mb=sum(r for r in rss if r is not None) / 1024,
                workers_vanished=vanished,
            )
            result = load.expect("result", cell.drain + 60)
            result.pop("phase", None)
            res.update(result)
            # The worker logs: a worker killed by the master (timeout) or a traceback
            # would explain a bad cell; count them.
            text = g.log.read_text(errors="replace")
            res["server_errors"] = text.count("Traceback") + text.count("WORKER TIMEOUT")
            if not g.alive():  # the master died during the run (a crash of what is measured)
                res["master_rc"] = g.proc.returncode
        except BaseException:
            for p in procs.values():
                tail = p.log_tail(15)
                if tail:
                    log(f"    --- {p.name} log:\n{tail}")
            raise
        finally:
            try:
                stack.close()  # load, gunicorn, publisher, redis: in that order
            finally:
                if args.logs is not None:  # the servers' logs, to explain a bad run later
                    keep = args.logs / f"{cell.name}-{dep.name}-{bus.rsplit('-', 1)[1]}"
                    keep.mkdir(parents=True, exist_ok=True)
                    for f in [*tmp.glob("*.log"), *tmp.glob("*.err"), *tmp.glob("redis/*.log")]:
                        with contextlib.suppress(OSError):
                            shutil.copy(f, keep / f.name)
                    res["logs"] = str(keep)
            if dep.kind == "shmcast":
                left = bus_entries(bus)
                res["shm_left"] = [p.name for p in left]
                for p in left:  # ours (the run's unique bus name); a clean exit leaves none
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
    res["seconds"] = time.monotonic() - t_start
    return res


_seq = iter(range(1, 1 << 30))


# --------------------------------------------------------------------------- driver

METRICS = [
    "connected",
    "refused",
    "delivered",
    "gaps",
    "late",
    "missing",
    "disconnected",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "cpu_master",
    "cpu_publisher",
    "cpu_workers",
    "cpu_broker",
    "cpu_load_proc",
    "load_cpu",
    "threads_max",
    "fds_max",
    "shm_size",
    "shm_used",
    "rss_workers_mb",
    "connect_s",
    "loop_lag_p99_ms",
    "loop_lag_max_ms",
    "load1",
    "latency_floor_ms",
    "behind_at_end_s",
    "reads_per_event",
]


def flat(run: dict[str, Any]) -> dict[str, Any]:
    out = dict(run)
    if run.get("events_total"):
        out["reads_per_event"] = run.get("reads", 0) / run["events_total"]
    out["threads_max"] = max(run.get("threads_per_worker") or [0]) or None
    out["fds_max"] = max(run.get("fds_per_worker") or [0]) or None
    return out


def spread(runs: list[dict[str, Any]]) -> dict[str, list[float] | None]:
    """min, median, max of every metric over the repetitions."""
    out: dict[str, list[float] | None] = {}
    for m in METRICS:
        vals = [r[m] for r in map(flat, runs) if isinstance(r.get(m), (int, float))]
        out[m] = [min(vals), statistics.median(vals), max(vals)] if vals else None
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks sse", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="50 clients, a few seconds (CI)")
    ap.add_argument("--cells", default="a,b", help="comma-separated cells: a, b (default both)")
    ap.add_argument(
        "--deployments",
        default=",".join(d.name for d in DEPLOYMENTS),
        help="comma-separated deployments (default: all)",
    )
    ap.add_argument(
        "--repeat",
        default="1",
        help="runs per cell and deployment, interleaved; spread reported. One number for "
        "every cell, or one per cell in --cells order (e.g. 3,1)",
    )
    ap.add_argument("--clients", type=int, help="a custom cell: this many clients")
    ap.add_argument("--rate", type=float, default=10.0, help="custom cell: events/s")
    ap.add_argument("--workers", type=int, default=2, help="custom cell: gunicorn workers")
    ap.add_argument("--duration", type=float, help="override the measuring window (s)")
    ap.add_argument("--settle", type=float, help="override the settle time (s)")
    ap.add_argument("--sample", type=int, default=50, help="clients parsed in full")
    ap.add_argument("--last-event-id", default=None, help="every client sends this Last-Event-ID")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the servers (e.g. SHMCAST_MAX_SUBSCRIBERS=64)",
    )
    ap.add_argument(
        "--load-nice",
        type=int,
        default=-5,
        help="nice value of the load process (default -5 when allowed; 0: leave it)",
    )
    ap.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="before each run wait (up to --max-load-wait s) for the 1-min load average to "
        "fall below this (default: the CPU count for a full run, off for --quick)",
    )
    ap.add_argument("--max-load-wait", type=float, default=180.0)
    ap.add_argument(
        "--logs",
        type=Path,
        default=None,
        help="keep every run's server logs under this folder (default: "
        "benchmarks/results/tmp/sse-logs/, or OUT/logs/ with --out or --quick)",
    )
    ap.add_argument("--out", type=Path, help="where the JSON (and with --docs the chart) go")
    ap.add_argument("--no-docs", action="store_true", help="full run: do not touch docs/")
    ap.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: print and re-render the docs of a saved run",
    )
    ap.add_argument("--strict", action="store_true", help="exit 1 if a run failed")
    args = ap.parse_args(argv)
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--env wants NAME=VALUE, not {item!r}")
        env[name] = value
    args.env = env
    return args


def plan_cells(args: argparse.Namespace) -> list[Cell]:
    if args.clients:
        base = QUICK if args.quick else CELLS["a"]
        cells = [
            dataclasses.replace(
                base,
                name=f"{args.clients}c",
                clients=args.clients,
                rate=args.rate,
                workers=args.workers,
                connect_deadline=max(base.connect_deadline, args.clients / 50),
            )
        ]
    elif args.quick:
        cells = [QUICK]
    else:
        cells = [CELLS[c.strip()] for c in args.cells.split(",") if c.strip()]
    over = {}
    if args.duration:
        over["duration"] = args.duration
    if args.settle is not None:
        over["settle"] = args.settle
    return [dataclasses.replace(c, **over) for c in cells]


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in [
        "shmcast",
        "gunicorn",
        "uvicorn",
        "uvicorn-worker",
        "starlette",
        "flask",
        "broadcaster",
        "redis",
        "orjson",
    ]:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        # What ran is the working tree: say so when src/ or examples/ differ from HEAD.
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "src", "examples"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        if head:
            out["shmcast tree"] = head + (
                " + uncommitted changes in src/ or examples/" if dirty.strip() else ""
            )
    native = _core_facts().get("native")
    if native is not None:
        out["shmcast core"] = "C (shmcast._native)" if native else "pure Python"
    b = redis_binary()
    if b:
        with contextlib.suppress(Exception):
            v = subprocess.run(
                [b, "--version"], capture_output=True, text=True, timeout=5, check=False
            ).stdout.split()
            out["redis-server"] = v[2].removeprefix("v=")
    return out


def quiet(args: argparse.Namespace, log: Callable[[str], None]) -> None:
    """Wait, with a deadline, for the shared box to calm down before a run."""
    limit = args.max_load
    if limit is None:
        limit = 0.0 if args.quick else float(os.cpu_count() or 1)
    if limit <= 0 or os.getloadavg()[0] < limit:
        return
    t = time.monotonic()
    deadline = t + args.max_load_wait
    while os.getloadavg()[0] >= limit and time.monotonic() < deadline:
        time.sleep(2)
    log(
        f"    waited {time.monotonic() - t:.0f} s for load average < {limit:g} "
        f"(now {os.getloadavg()[0]:.1f})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from benchmarks import _sse_report

    if args.render:
        saved = json.loads(args.render.read_text())
        print(_sse_report.table(saved))
        if not args.no_docs:
            _sse_report.write_docs(saved, ROOT / "docs")
        return 0
    unknown = [d for d in args.deployments.split(",") if d and d not in BY_NAME]
    if unknown:
        print(f"unknown deployments {unknown}; known: {list(BY_NAME)}", file=sys.stderr)
        return 2
    deps = [BY_NAME[d] for d in args.deployments.split(",") if d]
    out_dir = args.out or (
        Path(tempfile.mkdtemp(prefix="shmcast-bench-sse-")) if args.quick else None
    )
    if args.logs is None:
        args.logs = (
            out_dir / "logs" if out_dir else ROOT / "benchmarks" / "results" / "tmp" / "sse-logs"
        )
    cells = plan_cells(args)
    try:
        repeats = [int(x) for x in str(args.repeat).split(",")]
    except ValueError:
        repeats = []
    if len(repeats) == 1:
        repeats *= len(cells)
    if len(repeats) != len(cells) or min(repeats) < 1:
        print(f"--repeat {args.repeat}: one count, or one per cell", file=sys.stderr)
        return 2
    log = lambda s: print(s, flush=True)  # noqa: E731
    # Signals become exceptions, so every finally below stops what it started.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    nofile = raise_nofile()
    results: dict[str, Any] = {
        "command": "python -m benchmarks sse " + " ".join(sys.argv[2:] if argv is None else argv),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "loadavg_start": os.getloadavg(),
        "versions": versions(),
        "quick": args.quick,
        "repeat": {c.name: repeats[i] for i, c in enumerate(cells)},
        "sample": args.sample,
        "load_nice": args.load_nice,
        "nofile": nofile,
        "somaxconn": _read_int("/proc/sys/net/core/somaxconn"),
        "bus_subscriber_cap": max_bus_subscribers(),
        "cells": {c.name: dataclasses.asdict(c) | {"label": c.label} for c in cells},
        "deployments": {d.name: d.about for d in deps},
        "unavailable": {},
        "runs": {},
        "spread": {},
    }
    started = time.monotonic()
    available = []
    for d in deps:
        why = unavailable(d)
        if why:
            log(f"{d.name}: not measured: {why}")
            results["unavailable"][d.name] = why
        else:
            available.append(d)
    failed = []
    try:
        for cell in cells:
            log(f"== cell {cell.name}: {cell.label}, window {cell.duration:g} s")
            reps = repeats[cells.index(cell)]
            for rep in range(reps):
                for d in available:  # interleaved: a change of the box's load hits all alike
                    log(f"  {d.name}" + (f" (rep {rep + 1}/{reps})" if reps > 1 else ""))
                    quiet(args, log)
                    try:
                        r = run_one(d, cell, args, log)
                    except Exception as exc:  # noqa: BLE001 - one failed run must not sink all
                        log(f"    FAILED {type(exc).__name__}: {exc}")
                        if os.environ.get("SHMCAST_BENCH_DEBUG"):
                            traceback.print_exc()
                        r = {
                            "deployment": d.name,
                            "cell": cell.name,
                            "error": f"{type(exc).__name__}: {exc}",
                        }
                        failed.append(f"{cell.name}/{d.name}")
                    else:
                        log("    " + _sse_report.one_line(r))
                    results["runs"].setdefault(cell.name, {}).setdefault(d.name, []).append(r)
    finally:
        results["seconds"] = time.monotonic() - started
        results["loadavg_end"] = os.getloadavg()
    for cell_name, by in results["runs"].items():
        for name, runs in by.items():
            ok = [r for r in runs if "error" not in r]
            results["spread"].setdefault(cell_name, {})[name] = spread(ok) if ok else None
    print()
    print(_sse_report.table(results))
    if out_dir is not None:
        out = out_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "sse.json").write_text(json.dumps(results, indent=1))
        log(f"results in {out / 'sse.json'}")
    else:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
        log(f"results in {RESULTS.relative_to(ROOT)}")
        if not args.no_docs:
            _sse_report.write_docs(results, ROOT / "docs")
            log("docs/benchmarks.md (SSE end to end) and docs/benchmarks-sse.png updated")
    log(f"total {results['seconds']:.0f} s")
    if failed:
        log(f"FAILED RUNS: {failed}")
    return 1 if args.strict and failed else 0


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
