"""Entries cachekit stores for itself (lease tokens), which must never reach a caller.

In object backends a marker is a :class:`Marker` instance; in byte backends it is any
value starting with :data:`MARKER_BYTE`, a byte no serializer may emit first.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MARKER_BYTE", "Marker"]

MARKER_BYTE: Final = b"\x00"


class Marker:
    """An in-process marker; compared by identity, so each instance is its own token."""

    __slots__ = ("token",)

    def __init__(self, token: bytes) -> None:
        self.token = token

    def __repr__(self) -> str:
        return f"Marker({self.token.hex()})"
