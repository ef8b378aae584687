"""Annotated entries: a value stored with the metadata freshness and key sets read.

A plain entry is the serializer's bytes (or the object itself in memory) and costs
nothing extra. An annotated entry, used only by callers that ask for stale-while-
revalidate, early refresh or tags, also carries when it stops being fresh (wall
clock, shared by every process), how long its load took, and the token of each of its
tags at the time it was filled.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from cachekit import codec
from cachekit.exceptions import DecodeError

if TYPE_CHECKING:
    from cachekit.core.state import CacheCore
    from cachekit.serializers import Serializer

__all__ = ["ENTRY_BYTE", "FOREVER", "Entry", "Loaded", "pack", "unpack"]

#: First byte of an annotated entry in a byte backend (escaped in plain entries, see
#: cachekit.codec).
ENTRY_BYTE: Final = b"\x01"
#: ``fresh_until`` of an entry without expiry.
FOREVER: Final = math.inf
# Starts every key an annotated payload is serialized under (see _bound_key).
_DOMAIN: Final = ENTRY_BYTE.decode("ascii")
# fresh_until (wall clock), delta (load seconds), length of the tags blob.
_HEADER = struct.Struct("!ddI")


class Entry:
    """A value with its metadata; object backends store the instance itself."""

    __slots__ = ("delta", "fresh_until", "raw", "tags", "value")

    def __init__(
        self,
        value: Any,
        fresh_until: float,
        delta: float,
        tags: dict[str, str] | None = None,
        raw: Any = None,
    ) -> None:
        self.value = value
        self.fresh_until = fresh_until
        self.delta = delta
        self.tags = tags
        # What the backend holds, for compare_and_set: the bytes, or this very object.
        self.raw = self if raw is None else raw


@dataclass(slots=True)
class Loaded:
    """A loader's result on its way to the cache.

    Attributes:
        value: what the loader returned (and what the caller gets, stored or not).
        delta: seconds the load took, for early refresh.
        tags: each tag's token at fill time, for a tagged entry.
        rejected: a tag of this entry was invalidated while it loaded: don't store.
    """

    value: Any
    delta: float
    tags: dict[str, str] | None = None
    rejected: bool = False


def pack(
    core: CacheCore, bkey: str, loaded: Loaded, seconds: float | None, stale_ttl: float | None
) -> tuple[Any, float | None]:
    """Encode an annotated entry; return it with its physical TTL (``seconds`` plus
    the stale window).

    Raises:
        SerializationError: the serializer cannot encode the value.
    """
    fresh_until = FOREVER if seconds is None else core.clock() + seconds
    physical = None if seconds is None else seconds + (stale_ttl or 0.0)
    if core.objects:
        return Entry(loaded.value, fresh_until, loaded.delta, loaded.tags), physical
    tags = b"" if not loaded.tags else json.dumps(sorted(loaded.tags.items())).encode()
    header = ENTRY_BYTE + _HEADER.pack(fresh_until, loaded.delta, len(tags)) + tags
    # The payload is framed as a plain entry is (see cachekit.codec), and size-checked.
    return header + core.encode(_bound_key(bkey, header), loaded.value), physical


def _bound_key(bkey: str, header: bytes) -> str:
    """The key the payload is serialized under, so that a signing serializer's MAC
    covers the header (expiry, load time, tags) as well as the backend key.

    It can equal neither a plain entry's key nor another annotated entry's: a plain
    entry is serialized under its backend key, which starts with the namespace (a
    letter, digit, ``_``, ``.`` or ``-``, see cachekit.keys), never with ``\\x01``;
    and the digest has a fixed length, so where it ends and the key begins is known.
    """
    return f"{_DOMAIN}{hashlib.sha256(header).hexdigest()}{bkey}"


def unpack(serializer: Serializer, bkey: str, raw: bytes) -> Entry:
    """Decode an annotated entry read from a byte backend.

    Raises:
        DecodeError: a truncated header, bad tags or an undecodable value.
    """
    start = len(ENTRY_BYTE) + _HEADER.size
    if len(raw) < start:
        raise DecodeError("truncated annotated entry")
    fresh_until, delta, size = _HEADER.unpack_from(raw, len(ENTRY_BYTE))
    tags = None
    if size:
        try:
            tags = {str(tag): str(token) for tag, token in json.loads(raw[start : start + size])}
        except Exception as exc:  # ValueError, TypeError, RecursionError: foreign bytes
            raise DecodeError(f"bad tags in annotated entry: {exc!r}") from exc
    header = raw[: start + size]
    value = codec.decode(serializer, _bound_key(bkey, header), raw[start + size :])
    return Entry(value, fresh_until, delta, tags, raw)
