"""Profile shmcast's two hot paths in a real run: ``py-spy`` on one subscriber and on the publisher.

Usage: ``python -m benchmarks.profile_shmcast [--size 2048] [--n 1] [--seconds 4]``. Needs
``py-spy`` (``pip install py-spy``) and ptrace rights over one's own children (root, or
``kernel.yama.ptrace_scope`` = 0). Writes ``benchmarks/results/tmp/profile-{sub,pub}.txt``:
py-spy's top functions by own time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from benchmarks import run
from benchmarks.adapters import Options
from benchmarks.adapters.shmcast_peer import ShmcastPeer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(run.Path(sys.executable).parent / "py-spy")
    out = run.ROOT / "benchmarks" / "results" / "tmp"
    out.mkdir(parents=True, exist_ok=True)
    peer = ShmcastPeer(Options())
    plan = run.Plan(quick=False)
    with run.trial(peer, args.n, args.size, plan.depth) as (ch, fleet):
        sub_pid = fleet.procs[0].pid
        spies = []
        for who, pid in (("sub", sub_pid), ("pub", os.getpid())):
            cmd = [
                spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(args.seconds)),
                "--format",
                "raw",
                "--output",
                str(out / f"profile-{who}.raw"),
                "--nonblocking",
            ]
            spies.append(
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        try:
            n, t0, t1 = run.burst(ch.publish, run.pad_for(args.size), args.seconds + 1)
        finally:
            for p in spies:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    for who in ("sub", "pub"):
        top = _top(out / f"profile-{who}.raw")
        (out / f"profile-{who}.txt").write_text(top)
        print(f"== {who} (own time, top 12)\n{top}")
    print(f"published {n} in {(t1 - t0) / 1e9:.1f} s")
    return 0


def _top(raw: run.Path) -> str:
    """Own-time totals per frame from py-spy's collapsed-stack output."""
    own: dict[str, int] = {}
    total = 0
    if not raw.exists():
        return "(no profile: py-spy could not attach)\n"
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.split(";")[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
        total += int(count)
    rows = sorted(own.items(), key=lambda kv: -kv[1])[:12]
    return "".join(f"{100 * c / total:5.1f}%  {f}\n" for f, c in rows)


if __name__ == "__main__":
    raise SystemExit(main())
