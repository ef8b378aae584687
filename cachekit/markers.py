"""Entries cachekit stores for itself (lease tokens), which must never reach a caller.

In object backends a marker is a :class:`Marker` instance; in byte backends it is any
value starting with :data:`MARKER_BYTE`, a first byte that no stored value has
(:mod:`cachekit.codec` escapes serializer outputs that start with it).
"""

from __future__ import annotations

import os
from typing import Any, Final

__all__ = ["MARKER_BYTE", "Marker", "is_marker", "new_lease"]

MARKER_BYTE: Final = b"\x00"
_LEASE_TAG: Final = MARKER_BYTE + b"L"
_TOKEN_BYTES: Final = 16


class Marker:
    """An in-process marker; compared by identity, so each instance is its own token."""

    __slots__ = ("token",)

    def __init__(self, token: bytes) -> None:
        self.token = token

    def __repr__(self) -> str:
        return f"Marker({self.token.hex()})"


def new_lease(objects: bool) -> Any:
    """A lease marker unique to this attempt: an object (memory) or bytes."""
    token = os.urandom(_TOKEN_BYTES)
    return Marker(token) if objects else _LEASE_TAG + token


def is_marker(raw: Any) -> bool:
    """Whether a raw stored entry is a cachekit marker rather than a value."""
    if type(raw) is Marker:
        return True
    return type(raw) is bytes and raw[:1] == MARKER_BYTE
