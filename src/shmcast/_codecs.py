"""Payload codecs: json (default), pickle (opt-in, trusted processes only), raw, or your own."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ._errors import ShmcastError
from ._names import MAX_CODEC_NAME


@runtime_checkable
class Codec(Protocol):
    """What a custom codec provides: a ``name`` the bus records, ``dumps`` and ``loads``."""

    name: str

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


# A run of 19 digits may be an integer beyond 64 bits, which orjson reads as a
# float (or refuses): such documents go to the standard decoder. Mapping digits
# to "0" and the rest to " " and searching for 19 zeros costs ~1 ns a byte; the
# regex [0-9]{19} cost 8 (it restarts at every position).
_DIGIT_MAP = bytes(0x30 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))
_LONG_RUN = b"0" * 19


def _fast_loads() -> Callable[[bytes], Any]:
    """json.loads, through orjson when it is installed and gives the same result."""
    try:
        import orjson
    except ImportError:
        return json.loads
    fast = orjson.loads
    fast_error = orjson.JSONDecodeError
    slow = json.loads

    def loads(data: bytes) -> Any:
        # find(), not `in`: bytes.__contains__ tries the argument as an int first and
        # builds a TypeError to throw away, a tenth of a get() on the C core.
        if data.translate(_DIGIT_MAP).find(_LONG_RUN) < 0:
            try:
                return fast(data)
            except fast_error:
                pass  # NaN, Infinity, lone surrogates, huge exponents: the stdlib reads them
        return slow(data)

    return loads


class JsonCodec:
    """Compact UTF-8 JSON, ready for an SSE ``data:`` line as it is.

    Encoding is the standard library's, so what encodes (and what raises
    ``TypeError``) never depends on what else is installed. Decoding goes through
    orjson when it is installed (the ``fast`` extra), about seven times faster,
    falling back to the standard library wherever their results could differ.
    """

    name = "json"

    def __init__(self) -> None:
        encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
        encode = encoder.encode
        self.dumps = lambda obj: encode(obj).encode()
        self.loads = _fast_loads()


class PickleCodec:
    """Pickle: any picklable object, for buses whose every process is trusted."""

    name = "pickle"

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)

    loads = staticmethod(pickle.loads)


class RawCodec:
    """Bytes in, bytes out: the payload is copied into the ring as given."""

    name = "raw"

    @staticmethod
    def dumps(obj: Any) -> bytes:
        if isinstance(obj, bytes):
            return obj
        if isinstance(obj, (bytearray, memoryview)):
            return bytes(obj)
        raise TypeError(f"the raw codec takes bytes, not {type(obj).__name__}")

    @staticmethod
    def loads(data: bytes) -> bytes:
        return data


BUILTIN: dict[str, Codec] = {c.name: c for c in (JsonCodec(), PickleCodec(), RawCodec())}


def resolve(codec: object) -> Codec:
    """Turn a codec argument (a built-in's name or a codec object) into a codec.

    :raises ValueError: for an unknown built-in name or a bad codec name.
    :raises TypeError: for an object that is not a codec.
    """
    if isinstance(codec, str):
        try:
            return BUILTIN[codec]
        except KeyError:
            raise ValueError(
                f"unknown codec {codec!r}: expected one of {sorted(BUILTIN)} or a codec object"
            ) from None
    if not isinstance(codec, Codec) or not callable(codec.dumps) or not callable(codec.loads):
        raise TypeError(
            "codec must be 'json', 'pickle', 'raw' or an object with name, dumps() and loads()"
        )
    name = codec.name
    if (not isinstance(name, str) or not 1 <= len(name) <= MAX_CODEC_NAME
            or not name.isascii() or not name.isprintable()):
        raise ValueError(f"codec name must be 1 to {MAX_CODEC_NAME} printable ASCII characters")
    return codec


def for_subscriber(bus_codec: str, codec: object) -> Codec:
    """Pick the codec a subscriber decodes with, given the name the bus recorded.

    :raises ShmcastError: if the bus uses pickle or a custom codec and *codec* is
        missing, or has another name.
    """
    if codec is None:
        if bus_codec == PickleCodec.name:
            # Unpickling runs code: only the reader may decide to, never a bus header.
            raise ShmcastError(
                "the bus uses the pickle codec: pass codec='pickle' to subscribe if you "
                "trust every process that can publish on it"
            )
        if bus_codec in BUILTIN:
            return BUILTIN[bus_codec]
        raise ShmcastError(
            f"the bus uses the custom codec {bus_codec!r}: pass codec= with that name to subscribe"
        )
    chosen = resolve(codec)
    if chosen.name != bus_codec:
        raise ShmcastError(f"the bus uses codec {bus_codec!r}, not {chosen.name!r}")
    return chosen


def for_publisher(bus_codec: str, codec: object) -> Codec:
    """Pick the codec a :class:`Publisher` encodes with, given the name the bus recorded.

    Unlike a subscriber, a publisher of a pickle bus needs no opt-in: it only
    dumps, and the danger of pickle is in loads.

    :raises ShmcastError: if the bus uses a custom codec and *codec* is missing,
        or if *codec* has another name than the bus's.
    """
    if codec is None:
        if bus_codec in BUILTIN:
            return BUILTIN[bus_codec]
        raise ShmcastError(
            f"the bus uses the custom codec {bus_codec!r}: pass codec= with that name to Publisher"
        )
    chosen = resolve(codec)
    if chosen.name != bus_codec:
        raise ShmcastError(f"the bus uses codec {bus_codec!r}, not {chosen.name!r}")
    return chosen


__all__ = ["BUILTIN", "Codec", "JsonCodec", "PickleCodec", "RawCodec", "for_publisher",
           "for_subscriber", "resolve"]
