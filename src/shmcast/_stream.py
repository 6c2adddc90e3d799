"""The reading API that Subscription and Feed share: get, get_nowait, iteration, sync and async.

A stream provides three things: ``_poll()`` (the next event if one is ready,
``None`` if not; ``StreamClosed`` at the end, ``DecodeError`` for an event the
codec cannot read), ``_sleep(timeout)`` (block until an event may be ready)
and ``_asleep()`` (the same, awaited). Everything a user calls is built here
on those three, once, so both kinds of stream behave the same way.

Async waits are futures woken from another thread through
``loop.call_soon_threadsafe``, one call per loop for however many futures
are woken together (:func:`wake_futures`), so a waiting task costs no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from ._errors import StreamClosed
from ._event import Event

_monotonic = time.monotonic
_PLAIN = (int, float)


def check_timeout(timeout: object) -> float:
    """*timeout* as a float of seconds.

    :raises TypeError: if it is not a real number.
    :raises ValueError: if it is negative or NaN.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
    return float(timeout)


def _set_all(futures: list[asyncio.Future[None]]) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(None)


def wake_futures(futures: Iterable[asyncio.Future[None]]) -> None:
    """Wake every future, from any thread, with one ``call_soon_threadsafe`` per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for fut in futures:
        by_loop.setdefault(fut.get_loop(), []).append(fut)
    for loop, futs in by_loop.items():
        # A closed loop raises RuntimeError: nobody is waiting on it any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_set_all, futs)


class Stream:
    """What a reader of events can do, whatever feeds it: a Subscription or a Feed."""

    __slots__ = ()

    name: str

    # What a stream provides.
    def _poll(self) -> Event | None:
        raise NotImplementedError

    def _sleep(self, timeout: float | None) -> None:
        raise NotImplementedError

    async def _asleep(self) -> None:
        raise NotImplementedError

    def unsubscribe(self) -> None:
        """End the stream after the events already buffered. Idempotent."""
        raise NotImplementedError

    # What a user calls.
    def get(self, timeout: float | None = None) -> Event:
        """The next event, waiting up to *timeout* seconds (forever if None).

        :raises TimeoutError: if no event arrives in time.
        :raises StreamClosed: once the stream ended and its buffered events were delivered.
        :raises DecodeError: for an event the codec cannot decode (counted as dropped;
            the next call goes on with the next event).
        :raises ValueError: if *timeout* is negative or NaN.
        """
        # A plain non-negative number needs no more checks (NaN fails the comparison).
        if timeout is not None and (timeout.__class__ not in _PLAIN or not timeout >= 0):
            timeout = check_timeout(timeout)
        event = self._poll()
        if event is not None:
            return event
        deadline = None if timeout is None else _monotonic() + timeout
        while event is None:
            if deadline is None:
                self._sleep(None)
            else:
                left = deadline - _monotonic()
                if left <= 0:
                    raise TimeoutError(f"no event on bus {self.name!r} within {timeout} s")
                self._sleep(left)
            event = self._poll()
        return event

    def get_nowait(self) -> Event:
        """The next event if one is ready.

        :raises TimeoutError: if none is.
        :raises StreamClosed: once the stream ended and its buffered events were delivered.
        """
        event = self._poll()
        if event is None:
            raise TimeoutError(f"no event ready on bus {self.name!r}")
        return event

    def close(self) -> None:
        """The same as :meth:`unsubscribe`."""
        self.unsubscribe()

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Event:
        try:
            return self.get()
        except StreamClosed:
            raise StopIteration from None

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Event:
        """The next event without blocking the event loop; StopAsyncIteration at the end."""
        while True:
            try:
                event = self._poll()
            except StreamClosed:
                raise StopAsyncIteration from None
            if event is not None:
                return event
            await self._asleep()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.unsubscribe()


__all__ = ["Stream", "check_timeout", "wake_futures"]
