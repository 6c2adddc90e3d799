"""Tables, the docs section and the chart of ``python -m benchmarks sse``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

HEADING = "## SSE end to end"
CHART = "benchmarks-sse.png"
SHMCAST_VS_PEER = {"shmcast-asgi": "broadcaster-asgi", "shmcast-wsgi": "flask-sse-wsgi"}


def _num(x: Any, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and not x.is_integer():
        ax = abs(x)
        s = f"{x:.0f}" if ax >= 100 else f"{x:.1f}" if ax >= 10 else f"{x:.2f}"
    else:
        s = f"{int(x):,}"
    return s + unit


def _pct(x: Any) -> str:
    if x is None:
        return "n/a"
    if x >= 1:
        return "100 %"
    return f"{100 * x:.2f} %" if x >= 0.99 else f"{100 * x:.1f} %"


def _mib(x: Any) -> str:
    if x is None:
        return "n/a"
    return f"{x / 2**20:.1f} MiB" if x else "0"


def _cell(s: dict[str, Any] | None, metric: str, fmt: Any = _num) -> str:
    """Median, and with repetitions the range: ``41 (38\u201355)``."""
    if not s or not s.get(metric):
        return "n/a"
    lo, med, hi = s[metric]
    out = fmt(med)
    if s.get("_reps", 1) > 1 and fmt(lo) != fmt(hi):
        out += f" ({fmt(lo)}\u2013{fmt(hi)})"
    return out


def _summary(res: dict[str, Any], cell: str, dep: str) -> dict[str, Any] | None:
    s = (res.get("spread", {}).get(cell) or {}).get(dep)
    if s is None:
        return None
    runs = [r for r in res["runs"][cell][dep] if "error" not in r]
    return {**s, "_reps": len(runs)}


def one_line(r: dict[str, Any]) -> str:
    lat = "/".join(_num(r.get(k)) for k in ("p50_ms", "p99_ms", "max_ms"))
    if r.get("latency_floor_ms") and r.get("p50_ms") is None:
        lat = f"all > {r['latency_floor_ms']:.0f}"
    cpu_src = (r.get("cpu_master") or 0) + (r.get("cpu_publisher") or 0)
    return (
        f"connected {r.get('connected')}/{r.get('clients')}, delivered {_pct(r.get('delivered'))}"
        f", gaps {r.get('gaps')}, late {r.get('late')}, latency p50/p99/max {lat} ms"
        f", CPU source {cpu_src:.3f}"
        f" workers {_num(r.get('cpu_workers'))} broker {_num(r.get('cpu_broker'))}"
        f" load {_num(r.get('cpu_load_proc'))}, threads {r.get('threads_per_worker')}"
        f" [{r.get('seconds', 0):.0f} s]"
    )


def _src(s: dict[str, Any] | None) -> dict[str, Any] | None:
    """master + publisher CPU, as a spread entry (medians add; the range is approximate)."""
    if not s:
        return s
    a, b = s.get("cpu_master"), s.get("cpu_publisher")
    if a and b:
        s = {**s, "cpu_source": [x + y for x, y in zip(a, b, strict=True)]}
    else:
        s = {**s, "cpu_source": a}
    return s


def table(res: dict[str, Any]) -> str:
    head = [
        "cell",
        "deployment",
        "connected",
        "refused",
        "delivered",
        "gaps",
        "late",
        "latency p50 / p99 / max (ms)",
        "CPU master + publisher",
        "CPU workers",
        "CPU Redis",
        "threads / worker",
        "/dev/shm used",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for cell, by in res.get("runs", {}).items():
        for dep, runs in by.items():
            errors = [r["error"] for r in runs if "error" in r]
            s = _src(_summary(res, cell, dep))
            if s is None:
                lines.append(f"| {cell} | {dep} | failed: {errors[0] if errors else '?'} |")
                continue
            lat = " / ".join(_cell(s, m) for m in ("p50_ms", "p99_ms", "max_ms"))
            if not s.get("p50_ms") and s.get("latency_floor_ms"):
                # nothing published in the window arrived before the drain deadline
                lat = f"all > {s['latency_floor_ms'][0] / 1e3:.0f} s"
            row = [
                cell,
                dep,
                _cell(s, "connected"),
                _cell(s, "refused"),
                _cell(s, "delivered", _pct),
                _cell(s, "gaps"),
                _cell(s, "late"),
                lat,
                _cell(s, "cpu_source"),
                _cell(s, "cpu_workers"),
                _cell(s, "cpu_broker"),
                _cell(s, "threads_max"),
                _cell(s, "shm_used", _mib) if dep.startswith("shmcast") else "-",
            ]
            if errors:
                row[1] += f" ({len(errors)} failed)"
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def load_table(res: dict[str, Any]) -> str:
    head = [
        "cell",
        "deployment",
        "load average at start",
        "handshakes (s)",
        "load process CPU",
        "reads / event",
        "event-loop lag p99 / max (ms)",
        "newest event's age at the end (s)",
        "worker RSS (MiB, sum)",
        "fds / worker",
        "shm size (MiB)",
        "runs",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for cell, by in res.get("runs", {}).items():
        for dep in by:
            s = _summary(res, cell, dep)
            if s is None:
                continue
            lag = f"{_cell(s, 'loop_lag_p99_ms')} / {_cell(s, 'loop_lag_max_ms')}"
            shm = _cell(s, "shm_size", lambda x: f"{x / 2**20:.1f}") if "shmcast" in dep else "-"
            lines.append(
                "| "
                + " | ".join(
                    [
                        cell,
                        dep,
                        _cell(s, "load1"),
                        _cell(s, "connect_s"),
                        _cell(s, "cpu_load_proc"),
                        _cell(s, "reads_per_event"),
                        lag,
                        _cell(s, "behind_at_end_s"),
                        _cell(s, "rss_workers_mb"),
                        _cell(s, "fds_max"),
                        shm,
                        str(s["_reps"]),
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def _med(res: dict[str, Any], cell: str, dep: str, metric: str) -> float | None:
    s = _summary(res, cell, dep)
    v = s.get(metric) if s else None
    return v[1] if v else None


def targets(res: dict[str, Any]) -> str:
    """Issue 10's targets, from the medians of this run."""
    rows = []
    runs = res.get("runs", {})

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}\u00d7" if a is not None and b else "n/a"

    if "a" in runs:
        for ours, peer in SHMCAST_VS_PEER.items():
            if ours not in runs["a"]:
                continue
            d = _med(res, "a", ours, "delivered")
            g = _med(res, "a", ours, "gaps")
            rows.append(
                [
                    f"a: {ours} delivered ≥ 99.9 %, no gaps",
                    f"{_pct(d)}, {_num(g)} gaps",
                    "met" if d is not None and d >= 0.999 and g == 0 else "not met",
                ]
            )
            if peer in runs["a"]:
                w = ratio(_med(res, "a", ours, "cpu_workers"), _med(res, "a", peer, "cpu_workers"))
                p = ratio(_med(res, "a", ours, "p99_ms"), _med(res, "a", peer, "p99_ms"))
                for what, val, goal in (
                    (f"worker CPU vs {peer} ≤ 0.5\u00d7", w, 0.5),
                    (f"latency p99 vs {peer} ≤ 0.5\u00d7", p, 0.5),
                ):
                    ok = val != "n/a" and float(val[:-1]) <= goal
                    if ours != "shmcast-asgi":  # the issue sets these against broadcaster only
                        rows.append([f"a: {ours} {what} (reference only)", val, "-"])
                        continue
                    rows.append([f"a: {ours} {what}", val, "met" if ok else "not met"])
    if "b" in runs:
        for ours in SHMCAST_VS_PEER:
            if ours not in runs["b"]:
                continue
            c = _med(res, "b", ours, "connected")
            d = _med(res, "b", ours, "delivered")
            n = res["cells"]["b"]["clients"]
            ok = c == n and d is not None and d >= 0.999
            rows.append(
                [
                    f"b: {ours} all {n:,} connected, ≥ 99.9 % delivered",
                    f"{_num(c)} connected, {_pct(d)}",
                    "met" if ok else "not met",
                ]
            )
    if not rows:
        return ""
    lines = ["| target (issue 10) | this run | |", "| --- | --- | --- |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def chart(res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cells = [c for c in res.get("runs", {}) if res["runs"][c]]
    deps = list(dict.fromkeys(d for c in cells for d in res["runs"][c]))
    if not cells or not deps:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    width = 0.8 / len(deps)
    colors = ["#1f77b4", "#aec7e8", "#d62728", "#ff9896"]
    for k, dep in enumerate(deps):
        xs = [i + (k - (len(deps) - 1) / 2) * width for i in range(len(cells))]
        for ax, metric, scale in (
            (axes[0], "p99_ms", 1.0),
            (axes[1], "cpu_workers", 1.0),
            (axes[2], "delivered", 100.0),
        ):
            meds, lo, hi, floors = [], [], [], []
            for c in cells:
                s = _summary(res, c, dep)
                v = s.get(metric) if s else None
                m = v[1] * scale if v else 0.0
                meds.append(m)
                lo.append(m - v[0] * scale if v else 0.0)
                hi.append(v[2] * scale - m if v else 0.0)
                floor = s.get("latency_floor_ms") if s and metric == "p99_ms" else None
                floors.append(floor[0] if floor and not v else 0.0)
            color = colors[k % len(colors)]
            ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=dep, color=color)
            for x, f in zip(xs, floors, strict=True):
                if f:  # nothing of the window arrived: its latency is above this
                    ax.bar([x], [f], width, color="white", edgecolor=color, hatch="//")
                    ax.annotate(f"> {f / 1e3:.0f} s", (x, f), ha="center", va="bottom", fontsize=7)
    labels = [
        f"{c}: {res['cells'][c]['clients']:,} clients\n{res['cells'][c]['rate']:g} ev/s"
        for c in cells
    ]
    titles = ("latency p99 (ms, log)", "worker CPU (cores, sum of 2 workers)", "delivered (%)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(range(len(cells)), labels)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].set_ylim(0, 105)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"SSE end to end, real gunicorn ({res['when']}, {res['machine'].split(',')[1]})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def section(res: dict[str, Any], chart_ok: bool) -> str:
    v = res["versions"]
    cells = "; ".join(
        f"**{k}**: {c['label']}, {c['duration']:g} s window after {c['settle']:g} s settle"
        for k, c in res["cells"].items()
    )
    unavailable = "".join(
        f"\n- **{k}** not measured: {why}" for k, why in res.get("unavailable", {}).items()
    )
    load = "/".join(f"{x:.1f}" for x in res["loadavg_start"])
    load_end = "/".join(f"{x:.1f}" for x in res.get("loadavg_end", (0, 0, 0)))
    parts = [
        HEADING,
        "",
        "Real gunicorn serving Server-Sent Events to C concurrent clients on 127.0.0.1, "
        "shmcast's two examples against what users deploy instead, in one run of one "
        "command (`benchmarks/sse.py`, `benchmarks/sse_load.py`, peers in `benchmarks/peers/`):",
        "",
        "```sh",
        ".venv/bin/pip install -e '.[bench]'   # broadcaster 0.3.1, redis-py < 6, gunicorn, "
        "uvicorn, Flask",
        "apt-get install -y redis-server",
        "python -m benchmarks sse --repeat 2,1 # cell a twice (interleaved), cell b once: 40 min"
        " here,",
        "                                      # waits for a quieter box included; rewrites this "
        "section,",
        "                                      # docs/benchmarks-sse.png and "
        "benchmarks/results/sse-latest.json",
        "python -m benchmarks sse --quick      # 50 clients, a few seconds each (CI, tests/"
        "integration/test_bench_sse_quick.py)",
        "```",
        "",
        "Options: `--cells a,b`, `--deployments shmcast-asgi,shmcast-wsgi,broadcaster-asgi,"
        "flask-sse-wsgi`, `--repeat N` or one count per cell (`2,1`; deployments interleaved, "
        "median and range reported), `--clients C --rate R` (a custom cell), `--duration`, "
        "`--settle`, `--sample N`, `--last-event-id ID` (every client sends it), "
        "`--env NAME=VALUE` (to the servers), `--max-load L --max-load-wait S` (before each run, "
        "wait up to S s for the 1-minute load average to drop below L; default L = the CPU "
        "count, 180 s), `--load-nice N` (default -5), `--logs DIR` (every run's server logs; "
        "default `benchmarks/results/tmp/sse-logs/`), `--out DIR`, "
        "`--render benchmarks/results/sse-latest.json` (measure nothing, redraw this section).",
        "",
        "**Deployments.** `shmcast-asgi`: `examples/asgi_sse` with its gunicorn.conf.py "
        "(uvicorn workers). `shmcast-wsgi`: `examples/gunicorn_sse` (gthread). Their gunicorn "
        "master publishes the events on the bus itself: a `heartbeat` every "
        "`SHMCAST_HEARTBEAT` = 1/R s, carrying `ts` (`time.time()` at publish), and its "
        "`members` snapshots (`SHMCAST_CHURN=0`: no simulated node changes; keyframes at the "
        "example's default). `broadcaster-asgi`: a Starlette app on encode/broadcaster 0.3.1 "
        "over Redis pub/sub, one Redis connection per worker fanned out to one asyncio queue "
        "per client (uvicorn workers). `flask-sse-wsgi`: the Flask-SSE shape, one Redis pub/sub "
        "connection per client (gthread). A publisher process puts the same heartbeats at the "
        "same rate into a `redis-server` the harness starts on a free 127.0.0.1 port "
        "(`--save '' --appendonly no`). broadcaster 0.3.1 silently delivers nothing with "
        "redis-py 8 (checked with 8.0.1 and 8.1.0: no message, no error; 5.3.1, 6.4.0, 7.0.1 "
        "and 7.4.1 deliver): the `bench` extra pins `redis>=5,<6`, the line issue 10 measured "
        "with, and the harness refuses to run this peer with redis-py 8.",
        "",
        "**Load.** One asyncio process opens C raw TCP connections (asyncio streams, 256 "
        "handshakes in flight), sends `GET /events` with `Accept: text/event-stream`, and "
        "reads every stream; it runs at nice "
        f"{res.get('load_nice', 0)}, because real clients would not share the servers' two "
        "cores (its own CPU and event-loop lag are in the second table). The first "
        f"{res.get('sample', 50)} connected "
        "clients are parsed in full (chunked decoding, every SSE field, the heartbeat's JSON): "
        "latency is their receive time minus the event's `ts`. The others only extract the "
        "ids from each read with one regular expression. Connected: HTTP 200; refused: any "
        "other status, a connection error, or no response head within 30 s. The events "
        "published in the window are the ids from its first heartbeat to its last (ids are "
        "consecutive at the source); delivered = events received / events expected, summed "
        "over the connected clients (a client the server disconnected expects those published "
        "before). A gap is a run of missing ids followed by a received one, or by the end of a "
        "stream the server closed; *late* counts the ids an open stream had still not received "
        "when the drain deadline came (behind, maybe lost). After the window the load waits "
        "until every "
        "open client has the window's last id, or the drain deadline; when none of the "
        "window's events reached the sample by then (a saturated server), latency reads "
        "`all > X s` (X: from the window's start to the drain deadline) and delivered 0 %. "
        "CPU is utime + stime "
        "from /proc over the window, in cores (CPU seconds per second): the gunicorn master "
        "(shmcast: publishing included) plus, for the peers, the publisher process; the "
        "workers summed; redis-server. Threads per worker and /dev/shm "
        "(allocated blocks of the bus's segments and semaphores) are read at the window's end.",
        "",
        "**Settings for many clients** (the harness sets them for every deployment): "
        f"`RLIMIT_NOFILE` raised to the hard limit ({res['nofile'][0]:,}) for itself and "
        "everything it starts; gunicorn `--backlog` max(2048, C) (the kernel caps it at "
        f"somaxconn = {res.get('somaxconn')}) and handshakes paced at 256 in flight; gthread "
        "`--threads` = `--worker-connections` = 1.1 \u00d7 C / workers + 16 (each open stream "
        "holds a thread; a worker at its connection limit stops accepting, so the other "
        "worker takes the rest instead of parking clients in a full worker's queue); "
        "`--timeout 120` (a saturated box must not get workers killed); "
        "`SHMCAST_MAX_SUBSCRIBERS` = min(C + 64, "
        f"{res.get('bus_subscriber_cap', 1024):,}), the core's cap on a bus's subscribers; "
        "redis-server `--maxclients` C + 1000.",
        "",
        f"Run {res['when']} on {res['machine']}; load average {load} at start, {load_end} at "
        f"end; {res.get('seconds', 0) / 60:.0f} min. Cells: {cells}. Command: "
        f"`{res['command'].strip()}`.",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "." + unavailable,
        "",
        table(res),
        "",
    ]
    tg = targets(res)
    if tg:
        parts += [tg, ""]
    parts += [
        "The load side, to check that it was not the bottleneck:",
        "",
        load_table(res),
        "",
    ]
    if chart_ok:
        parts += [f"![SSE end to end]({CHART})", ""]
    return "\n".join(parts)


def write_docs(res: dict[str, Any], docs: Path) -> None:
    ok = chart(res, docs / CHART)
    md = docs / "benchmarks.md"
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    new = section(res, ok)
    start = text.find("\n" + HEADING + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + new
    else:
        nxt = text.find("\n## ", start + 1)
        text = text[: start + 1] + new + ("\n" + text[nxt + 1 :] if nxt >= 0 else "")
    md.write_text(text.rstrip("\n") + "\n")
