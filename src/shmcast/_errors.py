"""The exceptions shmcast raises; each also derives from the builtin a stdlib user would catch.

::

    ShmcastError
    ├── BusNotFoundError (FileNotFoundError)   no live bus of that name
    ├── BusExistsError (FileExistsError)       a live bus of that name exists
    ├── BusPermissionError (PermissionError)   the bus belongs to another user
    ├── TooManySubscribersError                every subscriber place is taken
    ├── TooManyPublishersError                 every publisher place is taken, or none allowed
    ├── EventTooLargeError (ValueError)        an encoded event does not fit in a slot
    ├── DecodeError                            an event the reader's codec cannot decode
    └── StreamClosed                           the stream ended (see its reason)
"""

from __future__ import annotations

from typing import Any, Literal


class ShmcastError(Exception):
    """Root of every error shmcast raises on its own account."""


class BusNotFoundError(ShmcastError, FileNotFoundError):
    """No live bus of that name exists on this host (or it is still being created)."""


class BusExistsError(ShmcastError, FileExistsError):
    """A live bus of that name already exists on this host."""


class BusPermissionError(ShmcastError, PermissionError):
    """The bus's control segment belongs to another user than the one asked for."""


class TooManySubscribersError(ShmcastError):
    """Every subscriber place of the bus is taken."""


class TooManyPublishersError(ShmcastError):
    """Every publisher place of the bus is taken, or the bus allows none."""


class EventTooLargeError(ShmcastError, ValueError):
    """An encoded event does not fit in one slot."""


class DecodeError(ShmcastError):
    """An event arrived whose payload the reader's codec cannot decode.

    It was counted in the reader's ``dropped``; the stream goes on with the next event.

    :ivar version: the event's version.
    :ivar type: the event's type.
    :ivar data: the encoded payload exactly as published.
    """

    def __init__(self, message: str, version: int, type: str, data: bytes) -> None:
        super().__init__(message)
        self.version = version
        self.type = type
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.version, self.type, self.data)


Reason = Literal["unsubscribed", "bus closed", "publisher died"]


class StreamClosed(ShmcastError):
    """The stream ended and every event buffered before the end was delivered.

    :ivar reason: why it ended: ``"unsubscribed"`` (your code ended it),
        ``"bus closed"`` (the publisher closed the bus) or ``"publisher died"``
        (the publisher's process ended without closing).
    """

    UNSUBSCRIBED: Reason = "unsubscribed"
    BUS_CLOSED: Reason = "bus closed"
    PUBLISHER_DIED: Reason = "publisher died"

    def __init__(self, reason: Reason, name: str = "") -> None:
        self.reason: Reason = reason
        self.name = name
        super().__init__(reason, name)

    def __str__(self) -> str:
        where = f"bus {self.name!r}: " if self.name else ""
        return f"{where}stream ended ({self.reason})"


__all__ = [
    "BusExistsError",
    "BusNotFoundError",
    "BusPermissionError",
    "DecodeError",
    "EventTooLargeError",
    "Reason",
    "ShmcastError",
    "StreamClosed",
    "TooManyPublishersError",
    "TooManySubscribersError",
]
