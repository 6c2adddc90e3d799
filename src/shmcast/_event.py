"""The event a subscriber receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """One published event, as one subscriber received it.

    :ivar type: what kind of event, e.g. ``"members"`` or ``"heartbeat"``.
    :ivar payload: the payload, decoded by the bus codec.
    :ivar version: bus-monotonic; a gap between two received events means drops.
    :ivar timestamp: ``time.time()`` in the publisher when it was published.
    """

    type: str
    payload: Any
    version: int
    timestamp: float
    _data: bytes = field(default=b"", repr=False, compare=False)

    @property
    def data(self) -> bytes:
        """The encoded payload exactly as published (UTF-8 JSON for the json codec)."""
        return self._data


_new = object.__new__
_set = object.__setattr__


def make_event(type_: str, payload: Any, version: int, timestamp: float, data: bytes) -> Event:
    """Build an Event without the frozen dataclass's field-by-field ``__init__`` (a hot path).

    Both ring readers' ``get`` (_ring.py, _native.c) build theirs the same way: this
    instance dict, set whole on a new object.
    """
    event = _new(Event)
    _set(event, "__dict__", {"type": type_, "payload": payload, "version": version,
                             "timestamp": timestamp, "_data": data})
    return event


__all__ = ["Event", "make_event"]
