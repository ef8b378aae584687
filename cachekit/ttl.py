"""Time-to-live values: the accepted types, the "use the default" marker, normalisation."""

from __future__ import annotations

import enum
import math
from datetime import timedelta
from typing import Final

from cachekit.exceptions import ConfigurationError

__all__ = ["MAX_POLL", "MAX_TTL", "TTL", "USE_DEFAULT", "UseDefault", "poll_seconds", "to_seconds"]

#: The longest finite duration accepted (365 days), for every TTL and lease. Longer ones
#: are refused at configuration time rather than failing deep inside a driver (Redis
#: overflows near 1e16 s, memcached's absolute expiry times end in 2038): use ``None``
#: for "no expiry".
MAX_TTL: Final = 365 * 24 * 3600.0
#: The longest interval between a lease waiter's polls: how late, at worst, a waiter
#: sees the value its lease holder stored.
MAX_POLL: Final = 1.0


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
        ConfigurationError: a non-positive, non-finite, over :data:`MAX_TTL` or
            non-numeric TTL (a ValueError).
    """
    if ttl is None:
        return None
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, int | float) and not isinstance(ttl, bool):
        try:
            seconds = float(ttl)
        except OverflowError:  # an int too large for a float: refused below, as inf is
            seconds = math.inf
    else:
        raise ConfigurationError(f"{what} must be seconds or a timedelta, got {ttl!r}")
    if not seconds > 0:
        raise ConfigurationError(f"{what} must be positive (None means no expiry), got {ttl!r}")
    if not (math.isfinite(seconds) and seconds <= MAX_TTL):
        raise ConfigurationError(
            f"{what} must be at most {MAX_TTL:.0f} seconds (365 days); use None for no "
            f"expiry, got {ttl!r}"
        )
    return seconds


def poll_seconds(poll: float) -> float:
    """Validate a polling interval: positive seconds, at most :data:`MAX_POLL`.

    Raises:
        ConfigurationError: anything else (a ValueError).
    """
    if isinstance(poll, bool) or not isinstance(poll, int | float) or not 0 < poll <= MAX_POLL:
        raise ConfigurationError(
            f"lease_poll must be positive seconds, at most {MAX_POLL}, got {poll!r}"
        )
    return float(poll)
