"""Time-to-live values: the accepted types, the "use the default" marker, normalisation."""

from __future__ import annotations

import enum
from datetime import timedelta
from typing import Final

from cachekit.exceptions import ConfigurationError

__all__ = ["TTL", "USE_DEFAULT", "UseDefault", "to_seconds"]


class UseDefault(enum.Enum):
    """Type of :data:`USE_DEFAULT`."""

    USE_DEFAULT = "USE_DEFAULT"

    def __repr__(self) -> str:
        return "USE_DEFAULT"


#: "Use the cache's default TTL": distinct from ``None``, which means no expiry.
USE_DEFAULT: Final = UseDefault.USE_DEFAULT

#: A TTL in seconds or as a timedelta; ``None`` means no expiry.
TTL = float | timedelta | None


def to_seconds(ttl: TTL, *, what: str = "ttl") -> float | None:
    """Normalise a TTL to positive seconds, or ``None`` for no expiry.

    Raises:
        ConfigurationError: a non-positive or non-numeric TTL (a ValueError).
    """
    if ttl is None:
        return None
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, int | float) and not isinstance(ttl, bool):
        seconds = float(ttl)
    else:
        raise ConfigurationError(f"{what} must be seconds or a timedelta, got {ttl!r}")
    if not seconds > 0:
        raise ConfigurationError(f"{what} must be positive (None means no expiry), got {ttl!r}")
    return seconds
