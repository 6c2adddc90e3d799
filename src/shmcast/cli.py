"""The ``shmcast`` command (also ``python -m shmcast``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run

    return 0 if run(events=args.events, subscribers=args.subscribers,
                    slow_delay=args.slow_ms / 1000) else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="shmcast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
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


if __name__ == "__main__":
    sys.exit(main())
