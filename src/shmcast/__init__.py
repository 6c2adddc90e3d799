"""shmcast: fan-out broadcast of versioned events from one process to many, through shared memory.

One publisher process creates a :class:`Bus` and publishes; any process of the
same user on the host attaches with :func:`subscribe` and reads its own stream.
A slow subscriber never slows the publisher: its oldest unread event is
overwritten and counted as a drop.
"""

from ._bus import Bus as Bus
from ._codecs import Codec as Codec
from ._errors import BusExistsError as BusExistsError
from ._errors import BusNotFoundError as BusNotFoundError
from ._errors import BusPermissionError as BusPermissionError
from ._errors import DecodeError as DecodeError
from ._errors import EventTooLargeError as EventTooLargeError
from ._errors import ShmcastError as ShmcastError
from ._errors import StreamClosed as StreamClosed
from ._errors import TooManyPublishersError as TooManyPublishersError
from ._errors import TooManySubscribersError as TooManySubscribersError
from ._event import Event as Event
from ._hub import Feed as Feed
from ._hub import Hub as Hub
from ._publisher import Publisher as Publisher
from ._ring import NATIVE as _NATIVE
from ._subscription import Subscription as Subscription
from ._subscription import subscribe as subscribe

#: Whether the C core (shmcast._native) is in use; False when it was not built
#: or SHMCAST_PURE=1 forced the pure-Python rings.
native: bool = _NATIVE

__version__ = "0.1.0"

# Tracebacks and pickles show the public names, not the private modules.
for _obj in (Bus, Codec, BusExistsError, BusNotFoundError, BusPermissionError, DecodeError,
             EventTooLargeError, ShmcastError, StreamClosed, TooManyPublishersError,
             TooManySubscribersError, Event, Publisher, Feed, Hub, Subscription, subscribe):
    _obj.__module__ = __name__
del _obj

__all__ = [
    "Bus",
    "BusExistsError",
    "BusNotFoundError",
    "BusPermissionError",
    "DecodeError",
    "Codec",
    "Event",
    "EventTooLargeError",
    "Feed",
    "Hub",
    "Publisher",
    "ShmcastError",
    "StreamClosed",
    "Subscription",
    "TooManyPublishersError",
    "TooManySubscribersError",
    "native",
    "subscribe",
]
