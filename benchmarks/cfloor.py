"""The C floor of issue 12: encode once in Python, then per ring in C a header store,
one copy and two release stores (``benchmarks/_cfloor.c``).

The extension is compiled on first use into a temporary folder with the
interpreter's own C compiler (the one that built ``shmcast._native``); where none
works, :func:`publish_floor` raises ``RuntimeError`` and the table says so.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import mmap
import shlex
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _codec

SOURCE = Path(__file__).with_name("_cfloor.c")
RING_HEAD = 128  # as _cfloor.c: the ring header before the first slot
_module: Any = None


def _build() -> Any:
    """Compile and import ``_cfloor`` once per process."""
    global _module  # noqa: PLW0603 - one build per process
    if _module is not None:
        return _module
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    with tempfile.TemporaryDirectory(prefix="shmcast-cfloor-") as tmp:
        target = Path(tmp) / f"_cfloor{suffix}"
        cmd = [
            *cc,
            "-O2",
            "-std=c11",
            "-shared",
            "-fPIC",
            f"-I{sysconfig.get_paths()['include']}",
            str(SOURCE),
            "-o",
            str(target),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except OSError as exc:
            raise RuntimeError(f"no C compiler ({exc})") from exc
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the C floor failed: {proc.stderr.strip()[-300:]}")
        spec = importlib.util.spec_from_file_location("_cfloor", target)
        if spec is None or spec.loader is None:
            raise RuntimeError(f"cannot load {target}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # loaded: the file may go with the folder
    _module = mod
    return mod


def publish_floor(
    n: int, objs: list[dict[str, Any]], slot_size: int, json_impl: str = "stdlib"
) -> float:
    """Seconds per publish to *n* rings of ``len(objs)`` slots, the per-ring work in C."""
    mod = _build()
    dumps = _codec.get(json_impl)[0]
    slots = len(objs)
    maps = []
    for _ in range(n):
        m = mmap.mmap(-1, RING_HEAD + slots * slot_size)
        m.write(b"\0" * len(m))  # fault the pages in before timing
        maps.append(m)
    try:
        rings = mod.Rings(maps, slots, slot_size)
        write = rings.write
        now = time.time
        t0 = time.perf_counter()
        for obj in objs:
            write(dumps(obj), now())
        elapsed = time.perf_counter() - t0
        del write, rings  # drop the buffer exports before the maps close
        return elapsed / len(objs)
    finally:
        for m in maps:
            m.close()


__all__ = ["publish_floor"]
