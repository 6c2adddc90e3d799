"""The C core and the pure-Python one on the same bus, in separate processes, and the build.

Each child picks its core at import: ``SHMCAST_PURE=1`` in its environment forces
the pure one, so a native publisher serves pure subscribers and the reverse.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import shmcast
from _support import kill_popen
from shmcast import _demo

ROOT = Path(__file__).resolve().parents[2]

needs_native = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import shmcast._native"], capture_output=True,
                   timeout=60, check=False).returncode != 0,
    reason="the C extension is not built here")

PUBLISHER = """
import json, sys, time, zlib
import shmcast
from _support import wait_until
name, events, overflow = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with shmcast.Bus(name, slots=16, slot_size=512, overflow=overflow) as bus:
    print(json.dumps({"native": shmcast.native}), flush=True)
    wait_until(lambda: bus.subscriber_count == 2, 20, "two subscribers")
    for i in range(events):
        blob = "x" * (i % 300)
        bus.publish("e", {"i": i, "blob": blob, "crc": zlib.crc32(blob.encode())})
        if i % 200 == 0:
            time.sleep(0.005)  # let the fast subscriber catch up now and then
    published = bus.version
    bus.close()
    print(json.dumps({"published": published, "dropped": bus.dropped}), flush=True)
"""

SUBSCRIBER = """
import json, sys, time, zlib
import shmcast
from _support import wait_until
name, delay = sys.argv[1], float(sys.argv[2])
def attach():
    try:
        return shmcast.subscribe(name)
    except shmcast.BusNotFoundError:
        return None
sub = wait_until(attach, 20, "the bus")
print(json.dumps({"native": shmcast.native}), flush=True)
versions, torn = [], 0
for event in sub:
    body = event.payload
    if zlib.crc32(body["blob"].encode()) != body["crc"]:
        torn += 1
    versions.append(event.version)
    if delay:
        time.sleep(delay)
print(json.dumps({"versions": versions, "dropped": sub.dropped, "torn": torn}), flush=True)
"""


def child(code: str, pure: bool, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.pop("SHMCAST_PURE", None)
    if pure:
        env["SHMCAST_PURE"] = "1"
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def lines(proc: subprocess.Popen[str], timeout: float) -> list[dict[str, Any]]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


@needs_native
@pytest.mark.timeout(120)
@pytest.mark.parametrize("overflow", ["overwrite", "drop_new"])
@pytest.mark.parametrize(("pub_pure", "sub_pure"), [(False, True), (True, False)],
                         ids=["native-publisher-pure-subscribers",
                              "pure-publisher-native-subscribers"])
def test_mixed_cores_across_processes(bus_name: str, pub_pure: bool, sub_pure: bool,
                                      overflow: str) -> None:
    events = 3000
    subs = [child(SUBSCRIBER, sub_pure, bus_name, "0"),
            child(SUBSCRIBER, sub_pure, bus_name, "0.0005")]  # the slow one loses events
    pub = child(PUBLISHER, pub_pure, bus_name, str(events), overflow)
    procs = [pub, *subs]
    try:
        pub_out = lines(pub, 90)
        sub_outs = [lines(p, 30) for p in subs]
    finally:
        for proc in procs:
            kill_popen(proc)
    assert pub_out[0] == {"native": not pub_pure}
    published, bus_dropped = pub_out[1]["published"], pub_out[1]["dropped"]
    assert published == events
    total = 0
    for out in sub_outs:
        assert out[0] == {"native": not sub_pure}
        result = out[1]
        versions = result["versions"]
        assert result["torn"] == 0
        assert all(a < b for a, b in itertools.pairwise(versions))
        missing = set(range(1, published + 1)) - set(versions)
        assert set(versions) <= set(range(1, published + 1))
        assert len(missing) == result["dropped"] == published - len(versions)
        total += result["dropped"]
    assert bus_dropped == total
    assert sub_outs[1][1]["dropped"] > 0  # the slow subscriber was lapped (or rejected)


def test_demo_says_which_core() -> None:
    stream = io.StringIO()
    assert _demo.run(events=300, subscribers=2, slow_delay=0.0, stream=stream)
    want = "native (C extension)" if shmcast.native else "pure Python"
    assert f"shmcast core: {want}" in stream.getvalue()


@pytest.mark.timeout(300)
def test_install_without_a_compiler_falls_back_to_pure_python(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src" / "shmcast", src / "src" / "shmcast",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    target = tmp_path / "site"
    env = dict(os.environ, CC="/bin/false", LDSHARED="/bin/false")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-cache-dir",
         "--target", str(target), str(src)],
        capture_output=True, text=True, env=env, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr
    assert not list(target.glob("shmcast/_native*.so"))
    env = dict(os.environ, PYTHONPATH=str(target))
    env.pop("SHMCAST_PURE", None)
    check = subprocess.run(
        [sys.executable, "-c", "import shmcast; print(shmcast.__file__, shmcast.native)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert check.returncode == 0, check.stderr
    path, native = check.stdout.split()
    assert path.startswith(str(target))
    assert native == "False"
