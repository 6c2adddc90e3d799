"""Bus names, the names of the host objects a bus owns, and the limits on bus geometry."""

from __future__ import annotations

import re

PREFIX = "shmcast."
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Limits checked before anything is created, so a bad argument fails with a
# ValueError instead of an ENOMEM, a SIGBUS on a full /dev/shm or an absurd mmap.
MAX_SLOTS = 1 << 20
MAX_SLOT_SIZE = 64 << 20
MAX_SUBSCRIBERS = 1024
MAX_PUBLISHERS = 64
MAX_RING_BYTES = 1 << 31
MAX_TYPE_BYTES = 255
MAX_CODEC_NAME = 32


# While the pytest plugin's leak check runs, the names of the buses this process
# creates or subscribes to, so that it blames a test only for its own buses.
touched: set[str] | None = None


def touch(name: str) -> None:
    """Note that this process used bus *name* (only while a leak check listens)."""
    if touched is not None:
        touched.add(name)


def check_name(name: object) -> str:
    """Return *name* if it is a valid bus name, else raise.

    :raises TypeError: if *name* is not a str.
    :raises ValueError: if *name* is not 1 to 64 ASCII letters, digits, ``_`` or ``-``.
    """
    if not isinstance(name, str):
        raise TypeError(f"bus name must be a str, not {type(name).__name__}")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid bus name {name!r}: expected 1 to 64 ASCII letters, digits, '_' or '-'"
        )
    return name


def check_int(what: str, value: object, low: int, high: int) -> int:
    """Return *value* if it is an int in ``[low, high]``, else raise TypeError or ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low} and {high}, got {value}")
    return value


def encode_type(type_: object) -> bytes:
    """An event type as the bytes a slot holds.

    :raises TypeError: if it is not a str.
    :raises ValueError: if it is longer than 255 bytes in UTF-8.
    """
    if not isinstance(type_, str):
        raise TypeError(f"event type must be a str, not {type(type_).__name__}")
    tb = type_.encode()
    if len(tb) > MAX_TYPE_BYTES:
        raise ValueError(f"event type is {len(tb)} bytes in UTF-8; at most {MAX_TYPE_BYTES}")
    return tb


def control_name(name: str) -> str:
    """The POSIX name of a bus's control segment: ``/dev/shm/shmcast.NAME``."""
    return f"/{PREFIX}{name}"


def ring_name(name: str, nonce: int, ring_id: int) -> str:
    """The POSIX name of one subscriber's ring segment, also used for its wake semaphore.

    The bus nonce is part of the name so that a subscription left over from a
    dead bus can never unlink the ring of a newer bus of the same name.
    """
    return f"/{PREFIX}{name}.{nonce:016x}.{ring_id:016x}"


def inbox_name(name: str, nonce: int, index: int) -> str:
    """The POSIX name of the inbox ring of publisher place *index* (the bus creates it)."""
    return f"/{PREFIX}{name}.{nonce:016x}.inbox{index}"


def drain_name(name: str, nonce: int) -> str:
    """The POSIX name of the semaphore that wakes the bus owner's drain thread."""
    return f"/{PREFIX}{name}.{nonce:016x}.drain"


__all__ = [
    "encode_type",
    "MAX_CODEC_NAME",
    "MAX_PUBLISHERS",
    "MAX_RING_BYTES",
    "MAX_SLOTS",
    "MAX_SLOT_SIZE",
    "MAX_SUBSCRIBERS",
    "MAX_TYPE_BYTES",
    "PREFIX",
    "check_int",
    "check_name",
    "control_name",
    "drain_name",
    "inbox_name",
    "ring_name",
    "touch",
]
