"""Publish and get + decode of the C core and of the pure one, against their floors, in one run.

``python -m benchmarks.native_floor [--rounds 5] [--k 4000] [--only-get]``: for each round, one
child process per core (``SHMCAST_PURE=1`` for the pure one), interleaved, each
timing the floor (benchmarks/floor.py: encode once, then per ring a header pack,
one copy and one semaphore post; get: unpack, copy out, decode) and shmcast's
``Bus.publish`` with N idle subscribers and ``Subscription.get`` + ``.payload``
(the functions of ``python -m benchmarks``); the best of the rounds is reported.
Also the wake alone: ``write_all`` posting from C against the C loop followed by
the same check and post in Python.

``--ir``: get + decode and its floor counted in instructions by callgrind (needs
``valgrind``), the same loop bodies with only the loop counted: the measure to
trust on a machine shared with other work, where timings swing by half.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import _codec, floor
from benchmarks.run import pad_for, shmcast_get_cost, shmcast_idle_cost

NS = (1, 4, 16)


def child(k: int, json_impl: str, only_get: bool = False) -> dict[str, Any]:
    import shmcast

    objs = floor.payloads(k, pad_for(100))
    slot_size = 512
    out: dict[str, Any] = {"native": shmcast.native}
    for n in () if only_get else NS:
        out[f"floor{n}"] = floor.publish_floor(n, objs, slot_size, json_impl)
        out[f"publish{n}"] = shmcast_idle_cost(n, objs, slot_size)
    # Floor and get back to back, three times: on a shared machine a slice of
    # either may be slowed alone, and the best of each is the one to compare.
    for _ in range(3):
        for key, cost in (("floor_get", floor.get_floor(objs, slot_size, json_impl)),
                          ("get", shmcast_get_cost(objs, slot_size))):
            out[key] = min(cost, out.get(key, cost))
    if shmcast.native and not only_get:
        out.update(wake_costs(k))
    return out


def wake_costs(k: int) -> dict[str, float]:
    """Seconds per write_all to 16 rings whose readers sleep (every wake posts)."""
    import posix_ipc

    from shmcast import _native
    from shmcast._layout import ring_size
    from shmcast._ring import frame

    out: dict[str, float] = {}
    sems = [posix_ipc.Semaphore(f"/shmcast-bench-wake-{os.getpid()}-{i}", posix_ipc.O_CREX,
                                0o600, 0) for i in range(16)]
    try:
        rings = [memoryview(bytearray(ring_size(64, 512))) for _ in sems]
        writers = [_native.RingWriter(b, 64, 512, True, s) for b, s in zip(rings, sems,
                                                                            strict=True)]
        head, tail = frame(1, 0.0, b"bench", b"x" * 100)
        for posted in (True, False):  # readers asleep (value 0: post) or busy (value 1)
            for where in ("c", "python"):
                t = 0.0
                for _ in range(k):
                    if posted:  # consume every pending wake-up: each reader sleeps
                        for s in sems:
                            if s.value:
                                s.acquire(0)
                    t0 = time.perf_counter()
                    if where == "c":
                        _native.write_all(writers, head, tail)
                    else:
                        _native.write_all(writers, head, tail, False)
                        for s in sems:
                            if s.value == 0:
                                s.release()
                    t += time.perf_counter() - t0
                out[f"wake_{where}_{'post' if posted else 'pending'}"] = t / k
        for w in writers:
            w.release()
    finally:
        for s in sems:
            s.unlink()
            s.close()
    return out


def ir_child(what: str, k: int, json_impl: str) -> None:
    """*k* gets (``get``) or floor reads (``floor``), each one call inside ``itertools.starmap``:
    callgrind's ``--toggle-collect=starmap_next`` then counts the loop alone."""
    import collections
    import gc
    import itertools

    import shmcast

    objs = floor.payloads(k, pad_for(100))
    slot_size = 512

    def drain(step: Any) -> None:
        gc.disable()  # a collection would land in one run and not the other
        collections.deque(itertools.starmap(step, itertools.repeat((), k)), maxlen=0)

    if what == "floor":
        dumps, loads = _codec.get(json_impl)
        ring = bytearray(k * slot_size)
        hsize = floor.HEADER.size
        for v, obj in enumerate(objs):
            data = dumps(obj)
            floor.HEADER.pack_into(ring, v * slot_size, v + 1, len(data), 5, 0, 0.0)
            ring[v * slot_size + hsize: v * slot_size + hsize + len(data)] = data
        view = memoryview(ring)
        unpack = floor.HEADER.unpack_from
        offs = iter(range(0, k * slot_size, slot_size))

        def read() -> None:  # floor.get_floor's loop body
            off = next(offs)
            _, ln, _, _, _ = unpack(view, off)
            loads(bytes(view[off + hsize: off + hsize + ln]))

        drain(read)
        return
    name = f"bench-{os.getpid()}-ir"
    with shmcast.Bus(name, slots=k, slot_size=slot_size) as bus:
        sub = shmcast.subscribe(name)
        for obj in objs:
            bus.publish("bench", obj)
        get = sub.get

        def step() -> None:  # run.shmcast_get_cost's loop body
            get(timeout=0).payload  # noqa: B018 - the decode is the point

        drain(step)
        sub.unsubscribe()


def ir_counts(k: int, json_impl: str) -> dict[str, float]:
    """Instructions per event of the get floor and of get on each core, under callgrind."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, what, pure in (("floor", "floor", "0"), ("native", "get", "0"),
                                ("pure", "get", "1")):
            cg = os.path.join(tmp, f"{key}.out")
            env = dict(os.environ, SHMCAST_PURE=pure, PYTHONHASHSEED="0")
            subprocess.run(
                ["valgrind", "--tool=callgrind", "--toggle-collect=starmap_next",
                 f"--callgrind-out-file={cg}", sys.executable, "-m", "benchmarks.native_floor",
                 "--ir-child", what, "--k", str(k), "--json", json_impl],
                capture_output=True, env=env, timeout=900, check=True)
            with open(cg) as f:
                total = next(int(line.split()[1]) for line in f
                             if line.startswith(("summary:", "totals:")))
            out[key] = total / k
    return out


def run(rounds: int, k: int, json_impl: str, only_get: bool = False
        ) -> dict[str, dict[str, float]]:
    best: dict[str, dict[str, float]] = {"native": {}, "pure": {}}
    for _ in range(rounds):
        for core in ("native", "pure"):
            env = dict(os.environ, SHMCAST_PURE="1" if core == "pure" else "0")
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.native_floor", "--child", "--k", str(k),
                 "--json", json_impl, *(["--only-get"] if only_get else [])],
                capture_output=True, text=True, env=env, timeout=600, check=True)
            res = json.loads(proc.stdout.splitlines()[-1])
            if res.pop("native") != (core == "native"):
                raise SystemExit(f"the {core} child did not run the {core} core")
            for key, value in res.items():
                best[core][key] = min(value, best[core].get(key, value))
    return best


def report(best: dict[str, dict[str, float]]) -> str:
    nat, pure = best["native"], best["pure"]
    lines = ["| what | floor µs | C core µs | ratio | pure µs | ratio |",
             "|---|---|---|---|---|---|"]
    for n in (n for n in NS if f"floor{n}" in nat):
        f = min(nat[f"floor{n}"], pure[f"floor{n}"])
        lines.append(f"| publish, N={n} idle | {f * 1e6:.2f} | {nat[f'publish{n}'] * 1e6:.2f} | "
                     f"{nat[f'publish{n}'] / f:.2f}\u00d7 | {pure[f'publish{n}'] * 1e6:.2f} | "
                     f"{pure[f'publish{n}'] / f:.2f}\u00d7 |")
    f = min(nat["floor_get"], pure["floor_get"])
    lines.append(f"| get + decode | {f * 1e6:.2f} | {nat['get'] * 1e6:.2f} | "
                 f"{nat['get'] / f:.2f}\u00d7 | {pure['get'] * 1e6:.2f} | "
                 f"{pure['get'] / f:.2f}\u00d7 |")
    if "wake_c_post" in nat:
        lines += ["", "| write_all to 16 rings, 100 B | wake from C µs | wake in Python µs |",
                  "|---|---|---|"]
        for kind, label in (("post", "every reader asleep (16 posts)"),
                            ("pending", "a wake-up already pending (no post)")):
            lines.append(f"| {label} | {nat[f'wake_c_{kind}'] * 1e6:.2f} | "
                         f"{nat[f'wake_python_{kind}'] * 1e6:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--k", type=int, default=4000, help="events per measurement")
    parser.add_argument("--json", default="auto", choices=_codec.CHOICES)
    parser.add_argument("--only-get", action="store_true", help="get + decode alone")
    parser.add_argument("--ir", action="store_true",
                        help="get + decode against its floor in instructions (valgrind)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ir-child", choices=("floor", "get"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    json_impl = _codec.resolve(args.json)
    if args.ir_child:
        ir_child(args.ir_child, args.k, json_impl)
        return 0
    if args.ir:
        ir = ir_counts(args.k, json_impl)
        print(f"# instructions per event (callgrind), {args.k} events, json {json_impl}")
        print("| what | floor | C core | ratio | pure | ratio |\n|---|---|---|---|---|---|")
        print(f"| get + decode | {ir['floor']:.0f} | {ir['native']:.0f} | "
              f"{ir['native'] / ir['floor']:.2f}\u00d7 | {ir['pure']:.0f} | "
              f"{ir['pure'] / ir['floor']:.2f}\u00d7 |")
        return 0
    if args.child:
        print(json.dumps(child(args.k, json_impl, args.only_get)))
        return 0
    print(f"# {args.rounds} rounds of {args.k} events, json {json_impl}, best of rounds")
    print(report(run(args.rounds, args.k, json_impl, args.only_get)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
