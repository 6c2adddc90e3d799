"""The JSON every peer adapter uses: one encode per publish, one decode per delivery.

Three settings (``--json``):

- ``stdlib``: the standard library both ways;
- ``orjson``: orjson both ways;
- ``stdlib+orjson``: encode with the standard library, decode with orjson. This is
  what shmcast's ``json`` codec does when orjson is installed, so it is the default
  whenever orjson is importable (``auto``): every peer then does the same work per
  event as shmcast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

# Chosen once per run by the harness and handed to every subscriber process
# through the environment, so publisher and subscribers agree.
ENV = "SHMCAST_BENCH_JSON"
CHOICES = ("auto", "stdlib", "orjson", "stdlib+orjson")

Pair = tuple[Callable[[Any], bytes], Callable[[bytes], Any]]


def _stdlib() -> Pair:
    enc = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    loads = json.loads

    def dumps(obj: Any) -> bytes:
        return enc(obj).encode()

    def decode(data: bytes) -> Any:
        # json.loads on bytes first sniffs the encoding in Python; UTF-8 is known.
        return loads(data.decode())

    return dumps, decode


def resolve(name: str) -> str:
    """``auto`` becomes ``stdlib+orjson`` when orjson imports, else ``stdlib``."""
    if name != "auto":
        return name
    try:
        import orjson  # noqa: F401
    except ImportError:
        return "stdlib"
    return "stdlib+orjson"


def get(name: str | None = None) -> Pair:
    """Return ``(dumps, loads)`` for *name* (default: the run's setting from the environment)."""
    name = resolve(name or os.environ.get(ENV, "auto"))
    if name == "stdlib":
        return _stdlib()
    import orjson

    if name == "orjson":
        return orjson.dumps, orjson.loads
    if name == "stdlib+orjson":
        return _stdlib()[0], orjson.loads
    raise ValueError(f"unknown json setting {name!r}; expected one of {CHOICES}")


__all__ = ["CHOICES", "ENV", "get", "resolve"]
