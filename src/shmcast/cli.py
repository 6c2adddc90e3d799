"""The ``shmcast`` command (also ``python -m shmcast``): see, follow and clean buses, run the demo.

``ls``, ``stat`` and ``clean --dry-run`` only look: they open segments
read-only and never register a subscriber. ``tail`` subscribes like any
other subscriber and unsubscribes on Ctrl-C, SIGTERM or ``--count``.
``clean`` removes only what belongs to dead processes. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from . import _clean as _cleaning
from . import _inspect
from ._demo import run as run_demo
from ._errors import ShmcastError, StreamClosed
from ._event import Event
from ._subscription import subscribe

EXIT_OK = 0
EXIT_ERROR = 1  # missing bus, bad name, permission denied, not a shmcast bus, ...
EXIT_USAGE = 2  # argparse's own


# --------------------------------------------------------------------------- formatting


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _ago(ts: float) -> str:
    seconds = max(0.0, time.time() - ts)
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} d ago"


def _clock(ts: float, millis: bool = False) -> str:
    text = time.strftime("%H:%M:%S", time.localtime(ts))
    return f"{text}.{int(ts * 1000) % 1000:03d}" if millis else text


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: set[int]) -> str:
    """A plain text table: columns padded to their widest cell, *right* ones right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                 for i, cell in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _dash(value: object) -> object:
    return "-" if value is None else value


# --------------------------------------------------------------------------- ls


def _bus_summary(info: _inspect.BusInfo | _inspect.BadBus) -> dict[str, Any]:
    if isinstance(info, _inspect.BadBus):
        return {"name": info.name, "error": info.error}
    return {
        "name": info.name,
        "pid": info.pid,
        "publisher_alive": info.publisher_alive,
        "state": info.state,
        "subscribers": info.live_subscribers,
        "publishers": info.live_publishers,
        "version": info.version,
        "drops": info.drops,
        "shm_bytes": info.shm_bytes,
        "codec": info.codec,
        "created": info.created,
        "uid": info.uid,
        "mode": f"{info.mode:04o}",
    }


def _ls(args: argparse.Namespace) -> int:
    _inspect.check_patterns(args.patterns)
    buses = _inspect.scan(args.patterns)
    if args.json:
        print(json.dumps([_bus_summary(b) for b in buses], indent=None))
        return EXIT_OK
    if not buses:
        what = "matching " + " ".join(args.patterns) if args.patterns else "on this host"
        print(f"no shmcast bus {what}", file=sys.stderr)
        return EXIT_OK
    rows: list[Sequence[object]] = []
    for b in buses:
        if isinstance(b, _inspect.BadBus):
            rows.append((b.name, "-", "?", "-", "-", "-", "-", "-", b.error))
        else:
            pubs = b.live_publishers if b.max_publishers else "-"
            rows.append((b.name, b.pid, b.state if b.state != "open" else "alive",
                         b.live_subscribers, b.version, b.drops, pubs,
                         _human_bytes(b.shm_bytes), ""))
    print(_table(("NAME", "PID", "PUBLISHER", "SUBS", "VERSION", "DROPS", "PUBS", "MEMORY", ""),
                 rows, right={1, 3, 4, 5, 6, 7}))
    return EXIT_OK


# --------------------------------------------------------------------------- stat


def _stat_json(info: _inspect.BusInfo) -> dict[str, Any]:
    out = _bus_summary(info)
    out.update(
        nonce=f"{info.nonce:016x}",
        closed=info.closed,
        slots=info.slots,
        slot_size=info.slot_size,
        max_subscribers=info.max_subscribers,
        max_publishers=info.max_publishers,
        overflow=info.overflow,
        retired_drops=info.retired_drops,
        places=[dict(dataclasses.asdict(s), status=s.status) for s in info.subscribers],
        publisher_places=[dict(dataclasses.asdict(p), status=p.status)
                          for p in info.publishers],
        bridges=_bridges_json(info.name),
    )
    return out


def _bridges_json(name: str) -> list[dict[str, Any]]:
    """The bridges of this bus on this host (their status files), as ``stat`` lists them."""
    from .bridge import read_status

    return list(read_status(name))


def _stat_text(info: _inspect.BusInfo) -> str:
    publisher = {"open": "alive", "closing": "alive, closing the bus", "dead": "DEAD"}[info.state]
    head = (
        f"bus {info.name!r}: publisher pid {info.pid} ({publisher}), version {info.version}, "
        f"{info.live_subscribers} subscriber{'s' if info.live_subscribers != 1 else ''}, "
        f"{info.drops} dropped"
        + (f", {info.live_publishers} Publisher{'s' if info.live_publishers != 1 else ''}"
           if info.max_publishers else "")
        + f"\n  codec {info.codec}, {info.slots} slots of {info.slot_size} B, "
        f"overflow {info.overflow}, at most {info.max_subscribers} subscribers"
        + (f" and {info.max_publishers} publishers" if info.max_publishers else "")
        + f", mode {info.mode:04o}, {_human_bytes(info.shm_bytes)} in /dev/shm, "
        f"created {_ago(info.created)}"
    )
    pubs = _publishers_text(info) + _bridges_text(info.name)
    if not info.subscribers:
        return head + "\n\nno subscribers" + pubs
    rows: list[Sequence[object]] = []
    for s in info.subscribers:
        fill = f"{s.fill}/{s.slots}" if s.fill is not None else "-"
        note = s.error or ("" if s.ring_present else "ring gone")
        rows.append((s.index, s.pid, s.status, s.state, fill, _dash(s.lag), _dash(s.drops),
                     _dash(s.read), _clock(s.joined), note))
    table = _table(("PLACE", "PID", "ALIVE", "STATE", "FILL", "LAG", "DROPS", "READ", "JOINED",
                    ""), rows, right={0, 1, 4, 5, 6, 7})
    return f"{head}\n\n{table}{pubs}"


def _publishers_text(info: _inspect.BusInfo) -> str:
    """The table of Publisher places (what each handed to its inbox), or nothing."""
    if not info.max_publishers:
        return ""
    if not info.publishers:
        return "\n\nno publishers"
    rows = [(p.place, p.pid, p.status, _dash(p.sent), _dash(p.dropped), _dash(p.pending),
             p.state, _clock(p.joined), p.error or "") for p in info.publishers]
    return "\n\n" + _table(("PUB", "PID", "ALIVE", "SENT", "DROPS", "PENDING", "STATE", "JOINED",
                             ""), rows, right={0, 1, 3, 4, 5})


def _bridges_text(name: str) -> str:
    """The bridges of this bus (docs/howto-bridge.md), from their status files, or nothing."""
    from .bridge import status_lines

    lines = status_lines(name)
    return "\n\n" + "\n".join(lines) if lines else ""


def _stat(args: argparse.Namespace) -> int:
    if not args.watch:
        info = _inspect.read_bus(args.name, every_place=args.all)
        print(json.dumps(_stat_json(info)) if args.json else _stat_text(info))
        return EXIT_OK
    if args.interval <= 0:
        raise ValueError("--interval must be positive")
    tty = sys.stdout.isatty() and not args.json
    try:
        while True:
            info = _inspect.read_bus(args.name, every_place=args.all)
            if args.json:
                frame = json.dumps(dict(_stat_json(info), time=time.time())) + "\n"
            else:
                frame = (f"every {args.interval:g} s: shmcast stat {args.name}    "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}    (Ctrl-C to stop)\n\n"
                         f"{_stat_text(info)}\n")
                if tty:  # redraw in place: home, clear every line we write over
                    frame = "\x1b[H" + frame.replace("\n", "\x1b[K\n") + "\x1b[J"
                else:
                    frame += "\n"
            sys.stdout.write(frame)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK  # Ctrl-C is how --watch ends


# --------------------------------------------------------------------------- tail


class _PassThrough:
    """A codec that leaves payloads as bytes: tail never runs a bus's pickle or custom codec."""

    def __init__(self, name: str) -> None:
        self.name = name

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return bytes(obj)

    @staticmethod
    def loads(data: bytes) -> Any:
        return data


def _json_payload(event: Event, codec: str) -> dict[str, Any]:
    if codec == "json":
        return {"payload": event.payload}
    return {"codec": codec, "data_base64": base64.b64encode(event.data).decode("ascii")}


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


def _format_pretty(event: Event, codec: str) -> str:
    if codec == "json":
        body = event.data.decode("utf-8", errors="replace")
    elif codec == "raw":
        body = repr(event.data)
    else:
        body = f"<{codec}: {len(event.data)} bytes>"
    return f"{event.version:>8}  {_clock(event.timestamp, millis=True)}  {event.type}  {body}"


def _format_json(event: Event, codec: str) -> str:
    record = {"version": event.version, "type": event.type, "timestamp": event.timestamp}
    record.update(_json_payload(event, codec))
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _format_sse(event: Event, codec: str) -> str:
    if codec == "json":
        lines = [event.data.decode("utf-8", errors="replace")]
    else:
        try:
            lines = event.data.decode("utf-8").splitlines() or [""]
        except UnicodeDecodeError:
            lines = [base64.b64encode(event.data).decode("ascii")]
    data = "".join(f"data: {line}\n" for line in lines)
    return f"id: {event.version}\nevent: {_one_line(event.type)}\n{data}"


_FORMATS: dict[str, Callable[[Event, str], str]] = {
    "pretty": _format_pretty,
    "json": _format_json,
    "sse": _format_sse,
}


def _tail(args: argparse.Namespace) -> int:
    geometry = _inspect.read_geometry(args.name)  # a clear error before anything else
    codec = geometry.codec
    fmt = _FORMATS[args.format]
    out: TextIO = sys.stdout
    stop: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stop.append(signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in handled}
    try:
        sub = subscribe(args.name, slots=args.slots,
                        codec=None if codec == "json" else _PassThrough(codec))
        count = 0
        last = 0
        ended: str | None = None
        try:
            print(f"shmcast tail: subscribed to bus {args.name!r} (codec {codec}); "
                  "Ctrl-C to stop", file=sys.stderr, flush=True)
            while not stop and (args.count is None or count < args.count):
                try:
                    event = sub.get(timeout=0.1)
                except TimeoutError:
                    continue
                except StreamClosed as e:
                    ended = e.reason
                    break
                if args.format == "pretty":
                    # Versions tell the gap between two events; before the first,
                    # what the subscription counted so far.
                    gap = event.version - last - 1 if last else sub.dropped
                    if gap > 0:
                        out.write(f"{'':>8}  ... {gap} event{'s' if gap != 1 else ''} "
                                  "dropped\n")
                out.write(fmt(event, codec) + "\n")
                out.flush()
                last = event.version
                count += 1
        except BrokenPipeError:
            # The reader went away (e.g. `| head`): stop quietly; no flush at exit either.
            ended = "output closed"
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        finally:
            sub.unsubscribe()
        dropped = sub.dropped
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    why = ended or ("stopped by signal" if stop else "count reached"
                    if args.count is not None and count >= args.count else "stopped")
    print(f"shmcast tail: {count} event{'s' if count != 1 else ''}, {dropped} dropped ({why})",
          file=sys.stderr)
    return EXIT_ERROR if ended == StreamClosed.PUBLISHER_DIED else EXIT_OK


# --------------------------------------------------------------------------- clean


def _describe_action(action: _cleaning.CleanAction) -> str:
    if action.kind == "bus":
        extra = ""
        if action.rings:
            n = len(action.rings)
            extra = f", with {n} dead subscriber ring{'s' if n != 1 else ''}"
        return f"bus {action.bus!r} ({action.reason}{extra})"
    if action.kind == "inboxes":
        what = "orphan publisher inboxes"
    else:
        what = "ring" if action.kind == "ring" else "orphan ring"
    return f"{what} {_cleaning.subject_of(action)} of bus {action.bus!r} ({action.reason})"


def _clean(args: argparse.Namespace) -> int:
    _inspect.check_patterns(args.patterns)
    actions = _cleaning.plan_clean(args.patterns)
    for action in actions:
        if action.kind == "keep":
            print(f"left alone: {_cleaning.subject_of(action)}: {action.reason}")
    todo = [a for a in actions if a.kind != "keep"]
    if args.dry_run:
        for action in todo:
            print(f"would remove {_describe_action(action)}")
        print(f"{len(todo)} to remove (dry run: nothing removed)" if todo else "nothing to clean",
              file=sys.stderr)
        return EXIT_OK
    removed = failed = 0
    for action, outcome, note in _cleaning.clean(todo):
        if outcome == "removed":
            removed += 1
            print(f"removed {_describe_action(action)}")
        elif outcome == "skipped":
            print(f"skipped {_describe_action(action)}: {note}")
        else:
            failed += 1
            print(f"shmcast clean: could not remove {_describe_action(action)}: {note}",
                  file=sys.stderr)
    print(f"{removed} removed" if todo else "nothing to clean", file=sys.stderr)
    return EXIT_ERROR if failed else EXIT_OK


# --------------------------------------------------------------------------- bridge


def _bridge(args: argparse.Namespace) -> int:
    from . import bridge as _br

    if args.status:
        found = list(_br.read_status(args.name, args.state_dir))
        if args.json:
            print(json.dumps(found))
        else:
            where = args.state_dir or _br.default_state_dir()
            print("\n".join(_br.status_lines(args.name, args.state_dir))
                  or f"no bridge of bus {args.name!r} in {where}")
        return EXIT_OK
    if not args.redis:
        raise ValueError("--redis URL is required (or --status)")
    try:
        br = _br.Bridge(args.name, args.redis, stream=args.stream, direction=args.direction,
                        host_id=args.host_id, maxlen=args.maxlen, block_ms=args.block_ms,
                        start=args.start, state_dir=args.state_dir, echo=args.echo)
    except ImportError as e:
        print(f"shmcast bridge: {e}", file=sys.stderr)
        return EXIT_ERROR

    def on_signal(signum: int, frame: object) -> None:
        br.request_stop()

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    print(f"shmcast bridge: bus {args.name!r} <-> {br.key!r} at {args.redis} as host "
          f"{br.host!r} ({args.direction}); status in {br.status_path}", file=sys.stderr,
          flush=True)
    ended = br.run()
    print(f"shmcast bridge: {ended}; in {br.stats.events_in}, out {br.stats.events_out}, "
          f"gaps {br.stats.gaps} ({br.stats.gap_events} events)", file=sys.stderr)
    return EXIT_OK if ended == "stopped" else EXIT_ERROR


# --------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    return 0 if run_demo(events=args.events, subscribers=args.subscribers,
                    slow_delay=args.slow_ms / 1000) else 1


# --------------------------------------------------------------------------- parser and main


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="shmcast",
        description="See, follow and clean shmcast buses on this host; run the demo.",
        epilog="Exit status: 0 on success, 1 on an error (no such bus, bad name, permission "
               "denied, not a shmcast segment), 2 on bad usage. See docs/cli.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("ls", help="list the buses on this host",
                        description="List every bus on this host: publisher pid and liveness, "
                                    "live subscribers, last version, drops, memory used. "
                                    "Reads only; never attaches.")
    ls.add_argument("patterns", nargs="*", metavar="PATTERN",
                    help="only buses whose name matches one of these shell patterns")
    ls.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    ls.set_defaults(func=_ls)

    st = sub.add_parser("stat", help="one bus in detail, one row per subscriber",
                        description="Show one bus and one row per subscriber: pid, alive, ring "
                                    "fill, lag (bus version minus the last version it read), "
                                    "drops. Reads only; never attaches.")
    st.add_argument("name", metavar="NAME")
    st.add_argument("--watch", "-w", action="store_true", help="refresh until Ctrl-C")
    st.add_argument("--interval", "-n", type=_positive_float, default=1.0, metavar="SECONDS",
                    help="refresh period of --watch (default 1)")
    st.add_argument("--all", "-a", action="store_true",
                    help="also list places whose subscriber left or died and was cleaned up")
    st.add_argument("--json", action="store_true",
                    help="one JSON object (with --watch: one per line and refresh)")
    st.set_defaults(func=_stat)

    tl = sub.add_parser("tail", help="subscribe and print events as they arrive",
                        description="Subscribe to a bus and print its events as they arrive, "
                                    "until Ctrl-C, SIGTERM, --count events, or the bus ends. "
                                    "Unsubscribes cleanly. Never unpickles: payloads of "
                                    "non-JSON codecs are shown as bytes.")
    tl.add_argument("name", metavar="NAME")
    tl.add_argument("--format", "-f", choices=sorted(_FORMATS), default="pretty",
                    help="pretty (default), json (one object per line) or sse "
                         "(text/event-stream frames)")
    tl.add_argument("--count", "-c", type=_positive_int, metavar="N",
                    help="exit after N events")
    tl.add_argument("--slots", type=_positive_int, metavar="N",
                    help="ring size of this subscriber (default: the bus's)")
    tl.set_defaults(func=_tail)

    cl = sub.add_parser("clean", help="remove dead buses and dead subscribers' rings",
                        description="Remove buses whose publisher is dead, rings whose "
                                    "subscriber is dead, and orphan rings nobody uses. Never "
                                    "touches a live bus or a live subscriber's ring.")
    cl.add_argument("patterns", nargs="*", metavar="PATTERN",
                    help="only buses whose name matches one of these shell patterns")
    cl.add_argument("--dry-run", "-n", action="store_true",
                    help="list what would be removed, remove nothing")
    cl.set_defaults(func=_clean)

    br = sub.add_parser("bridge", help="bridge a bus to other hosts through a Redis stream",
                        description="Carry bus NAME's events to and from the same bus on other "
                                    "hosts through one Redis stream, one connection per host. "
                                    "Runs until Ctrl-C or SIGTERM, or the bus ends. "
                                    "See docs/howto-bridge.md.")
    br.add_argument("name", metavar="NAME")
    br.add_argument("--redis", metavar="URL", help="redis://host:port/db")
    br.add_argument("--stream", metavar="KEY", help="stream key (default shmcast:NAME)")
    br.add_argument("--direction", choices=("in", "out", "both"), default="both")
    br.add_argument("--host-id", metavar="ID", help="this host's id (default: the hostname)")
    br.add_argument("--maxlen", type=_positive_int, default=100_000, metavar="N",
                    help="XADD MAXLEN ~ N (default 100000)")
    br.add_argument("--block-ms", type=_positive_int, default=10, metavar="MS",
                    help="with --direction both, the longest pause between two reads of a "
                         "quiet stream (default 10); with in, the XREAD BLOCK time (500 at least)")
    br.add_argument("--start", choices=("end", "begin"), default="end",
                    help="where a bridge without saved state starts reading (default end)")
    br.add_argument("--echo", action="store_true",
                    help="also publish this host's own entries as read back from the stream "
                         "(every host's bus then holds the whole stream in its order, with its "
                         "ids, for Hub.subscribe(since=STREAM_ID) on any host)")
    br.add_argument("--state-dir", metavar="DIR",
                    help="state and status files (default $SHMCAST_RUN_DIR, "
                         "$XDG_RUNTIME_DIR/shmcast or /tmp/shmcast-UID)")
    br.add_argument("--status", action="store_true",
                    help="print the counters of this bus's bridges and exit")
    br.add_argument("--json", action="store_true", help="with --status: JSON")
    br.set_defaults(func=_bridge)

    demo = sub.add_parser("demo", help="run a publisher and subscriber processes, check invariants")
    demo.add_argument("--events", type=int, default=20_000)
    demo.add_argument("--subscribers", type=int, default=4)
    demo.add_argument("--slow-ms", type=float, default=1.0,
                      help="how long the slow subscriber spends on each event")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except (ShmcastError, OSError, ValueError) as e:
        print(f"shmcast {args.command}: {_inspect.describe_error(e)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
