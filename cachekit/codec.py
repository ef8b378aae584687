"""How values become stored bytes and back: safe serializer calls and collision-free framing.

A byte backend holds four kinds of entry, told apart by their first byte:

- ``0x00``: a cachekit marker (a lease), never a value (:mod:`cachekit.markers`);
- ``0x01``: an annotated entry, a header then a payload framed as a plain entry
  (:mod:`cachekit.entries`);
- ``0x02``: an escaped plain entry: a serializer's output that itself starts with
  ``0x00``, ``0x01`` or ``0x02``, behind this byte, which the reader strips;
- anything else: a plain entry, a serializer's output as it is.

JSON and pickle outputs never start with a reserved byte, so they are stored
unchanged; whatever bytes a custom serializer returns read back exactly, and are
never mistaken for a marker or an annotated entry.

Serializers are user code: whatever their ``dumps`` raises becomes
:class:`~cachekit.exceptions.SerializationError`, and whatever their ``loads`` raises
becomes :class:`~cachekit.exceptions.DecodeError` (a counted miss for the facade).
"""

from __future__ import annotations

from typing import Any, Final

from cachekit.exceptions import DecodeError, SerializationError, ValueTooLarge
from cachekit.serializers import Serializer

__all__ = ["ESCAPE_BYTE", "decode", "encode"]

#: Prefixes a serializer's output that starts with a reserved byte (0x00-0x02).
ESCAPE_BYTE: Final = b"\x02"
_ESCAPE: Final = ESCAPE_BYTE[0]


def _dumps(serializer: Serializer, key: str, value: Any) -> bytes:
    """The serializer's output for ``value``, unframed.

    Raises:
        SerializationError: the serializer raised anything, or returned no bytes.
    """
    try:
        data = serializer.dumps(value, key)
    except SerializationError:
        raise
    except Exception as exc:  # ValueError, RecursionError, a custom serializer's own
        raise SerializationError(
            f"{type(serializer).__name__} cannot encode {type(value).__qualname__}: {exc!r}"
        ) from exc
    if type(data) is not bytes:
        if not isinstance(data, bytearray | memoryview):
            raise SerializationError(
                f"{type(serializer).__name__}.dumps returned {type(data).__name__}, not bytes"
            )
        data = bytes(data)
    return data


def encode(serializer: Serializer, key: str, value: Any, limit: int | None) -> bytes:
    """A plain entry (or an annotated entry's payload): the serializer's output,
    escaped if it starts with a reserved byte.

    Raises:
        SerializationError: the serializer cannot encode ``value``.
        ValueTooLarge: the entry is over ``limit`` bytes.
    """
    data = _dumps(serializer, key, value)
    if data and data[0] <= _ESCAPE:
        data = ESCAPE_BYTE + data
    if limit is not None and len(data) > limit:
        raise ValueTooLarge(f"{len(data)} bytes for {key!r} is over the limit of {limit}")
    return data


def decode(serializer: Serializer, key: str, raw: bytes) -> Any:
    """The value of a plain entry (or of an annotated entry's payload).

    Raises:
        DecodeError: the serializer cannot decode it.
    """
    try:
        return serializer.loads(raw[1:] if raw[:1] == ESCAPE_BYTE else raw, key)
    except DecodeError:
        raise
    except Exception as exc:  # a RecursionError, a custom serializer's own error
        raise DecodeError(f"{type(serializer).__name__} cannot decode: {exc!r}") from exc
