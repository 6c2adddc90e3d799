"""What the child processes of test_publisher.py do: publish through a Publisher, or subscribe.

Started by ``fork()`` (the function is called in the child), by
multiprocessing's ``spawn`` (it imports this module) or as ``python -c``
(:func:`python_c_argv`). Nothing here imports pytest. Children talk to the
test through files in a directory it owns: ``ready-<tag>`` once attached, the
test's ``go`` file to start, and ``<tag>.json`` with what they saw, written
whole (a rename) when they are done.

Events carry a checksum of their body, so a torn event cannot pass for a
real one::

    u16 source   u32 index   u32 crc32(body)   u32 len(body)   body
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any

HERE = str(Path(__file__).resolve().parent)
HEAD = struct.Struct("<HIII")
OWNER = 0  # the source number of the bus owner's own events


def make_event(src: int, i: int, rnd: random.Random, body_max: int = 160) -> bytes:
    """One event's payload: the header above, then a random body."""
    body = rnd.randbytes(rnd.randrange(body_max + 1))
    return HEAD.pack(src, i, zlib.crc32(body), len(body)) + body


def parse_event(data: bytes) -> tuple[int, int, bool]:
    """(source, index, whether the checksum and length hold) of an event's payload."""
    if len(data) < HEAD.size:
        return -1, -1, False
    src, i, crc, n = HEAD.unpack_from(data)
    body = data[HEAD.size:]
    return src, i, len(body) == n and zlib.crc32(body) == crc


def write_json(path: Path, obj: Any) -> None:
    """Write *obj* to *path* whole: a reader sees all of it or nothing."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.001)


def publisher(name: str, workdir: str, tag: str, src: int, count: int, *, pace: int = 0,
              seed: int = 0, forever: bool = False, body_max: int = 160,
              wait_go: bool = True) -> None:
    """Attach a Publisher, say ready, wait for go, publish *count* events (or until killed).

    Reports ``{"count", "dropped", "worst"}``: events given to publish, pub.dropped,
    and the longest publish() call in seconds. *pace*: sleep 0.5 ms every *pace* events.
    """
    from shmcast import Publisher

    work = Path(workdir)
    rnd = random.Random(seed or src)
    pub = Publisher(name)
    (work / f"ready-{tag}").touch()
    if wait_go:
        _wait_for(work / "go")
    worst = 0.0
    i = 0
    perf = time.perf_counter
    while forever or i < count:
        event = make_event(src, i, rnd, body_max)
        t = perf()
        pub.publish("e", event)
        worst = max(worst, perf() - t)
        i += 1
        if pace and i % pace == 0:
            time.sleep(0.0005)
    report = {"count": i, "dropped": pub.dropped, "worst": worst}
    pub.close()
    write_json(work / f"{tag}.json", report)


def subscriber(name: str, workdir: str, tag: str, slots: int) -> None:
    """Subscribe, say ready, read until the stream ends; report every event and the drops.

    Reports ``{"dropped", "reason", "events": [[version, source, index, intact], ...]}``.
    """
    from shmcast import StreamClosed, subscribe

    work = Path(workdir)
    got: list[tuple[int, bytes]] = []
    sub = subscribe(name, slots=slots)
    (work / f"ready-{tag}").touch()
    reason = ""
    try:
        while True:
            event = sub.get(timeout=60)
            got.append((event.version, event.data))
    except StreamClosed as e:
        reason = e.reason
    events = [[v, *parse_event(data)] for v, data in got]
    write_json(work / f"{tag}.json", {"dropped": sub.dropped, "reason": reason,
                                      "events": events})


ROLES = {"publisher": publisher, "subscriber": subscriber}


def run(role: str, kwargs: dict[str, Any]) -> None:
    """Entry point of every child: run *role*, exit 0, or 1 with the error on stderr."""
    ROLES[role](**kwargs)


def python_c_argv(role: str, **kwargs: Any) -> list[str]:
    """The argv of a ``python -c`` child running *role*."""
    code = (f"import sys, json; sys.path.insert(0, {HERE!r}); import _publisher_roles as r; "
            "r.run(sys.argv[1], json.loads(sys.argv[2]))")
    return [sys.executable, "-c", code, role, json.dumps(kwargs)]


__all__ = ["HEAD", "OWNER", "make_event", "parse_event", "python_c_argv", "publisher", "run",
           "subscriber", "write_json"]
