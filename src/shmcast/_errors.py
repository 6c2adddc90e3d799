"""The exceptions shmcast raises; each also derives from the builtin a stdlib user would catch."""

from __future__ import annotations


class ShmcastError(Exception):
    """Root of every error shmcast raises on its own account."""


class BusNotFoundError(ShmcastError, FileNotFoundError):
    """No live bus of that name exists on this host."""


class BusExistsError(ShmcastError, FileExistsError):
    """A live bus of that name already exists on this host."""


class TooManySubscribersError(ShmcastError):
    """Every subscriber place of the bus is taken."""


class EventTooLargeError(ShmcastError, ValueError):
    """An encoded event does not fit in one slot."""


class StreamClosed(ShmcastError):
    """The stream ended and every event buffered before the end was delivered.

    :ivar reason: why it ended: ``"unsubscribed"`` (your code ended it),
        ``"bus closed"`` (the publisher closed the bus) or ``"publisher died"``
        (the publisher's process ended without closing).
    """

    UNSUBSCRIBED = "unsubscribed"
    BUS_CLOSED = "bus closed"
    PUBLISHER_DIED = "publisher died"

    def __init__(self, reason: str, name: str = "") -> None:
        self.reason = reason
        self.name = name
        super().__init__(reason, name)

    def __str__(self) -> str:
        where = f"bus {self.name!r}: " if self.name else ""
        return f"{where}stream ended ({self.reason})"


__all__ = [
    "BusExistsError",
    "BusNotFoundError",
    "EventTooLargeError",
    "ShmcastError",
    "StreamClosed",
    "TooManySubscribersError",
]
