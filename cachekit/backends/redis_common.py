"""What the sync and async Redis backends share, none of it I/O: scripts, TTLs, errors, replies."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

from cachekit.exceptions import (
    BackendError,
    BackendTimeout,
    ConfigurationError,
    missing_dependency,
)
from cachekit.keys import encode_key

try:
    import redis
    from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
    from redis.exceptions import NoScriptError, RedisClusterException
    from redis.sentinel import SentinelConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_dependency("redis", "redis") from exc

__all__ = [
    "COMPARE_AND_DELETE",
    "COMPARE_AND_SET",
    "DRIVER_ERRORS",
    "check_client",
    "hits",
    "malformed_url",
    "merge_retried",
    "px",
    "px_or_none",
    "px_or_zero",
    "refused_script",
    "script_calls",
    "server_name",
    "stored",
    "url_options",
    "wrap",
]

# GET, compare, then SET inside the server, so no other client can write in between.
# ARGV: expected, new value, TTL in milliseconds or "0" for no expiry. An absent key
# reads as false in Lua, which never equals a string, so it never matches.
COMPARE_AND_SET: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
local px = tonumber(ARGV[3])
if px > 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', px)
else
    redis.call('SET', KEYS[1], ARGV[2])
end
return 1
"""

COMPARE_AND_DELETE: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
redis.call('DEL', KEYS[1])
return 1
"""

# RedisClusterException (no slot covered, no node reachable...) is not a RedisError.
# redis.asyncio raises the same exception classes as the sync client.
DRIVER_ERRORS: Final = (redis.exceptions.RedisError, RedisClusterException, OSError)


def px(ttl: float) -> int:
    """Seconds to whole milliseconds, rounded up so an entry never expires early.

    Rounding to a microsecond first keeps float noise (``0.3 * 1000``) from adding 1 ms.
    """
    return max(1, math.ceil(round(ttl * 1000.0, 3)))


def px_or_none(ttl: float | None) -> int | None:
    """The ``PX`` argument of a ``SET``: None (no expiry) stays None."""
    return None if ttl is None else px(ttl)


def px_or_zero(ttl: float | None) -> int:
    """The TTL argument of the compare-and-set script, where 0 means no expiry."""
    return 0 if ttl is None else px(ttl)


def wrap(operation: str, exc: Exception) -> BackendError:
    """The cachekit exception for a driver error; the caller raises it ``from exc``."""
    message = f"redis {operation} failed: {exc}"
    if isinstance(exc, redis.exceptions.TimeoutError | TimeoutError):
        return BackendTimeout(message)
    return BackendError(message)


def check_client(client: Any, backend: str) -> None:
    """Refuse a client that decodes replies to ``str``.

    Raises:
        ConfigurationError: the client has ``decode_responses=True``.
    """
    if client.get_encoder().decode_responses:
        raise ConfigurationError(
            f"{backend} needs a client with decode_responses=False: cached values "
            "are bytes, and decoding them to str would corrupt binary payloads"
        )


def url_options(timeout: float) -> dict[str, Any]:
    """The client options ``from_url`` sets besides its retry policy (none).

    Raises:
        ConfigurationError: ``timeout`` is not a positive number of seconds.
    """
    if not timeout > 0:
        raise ConfigurationError(f"timeout must be positive seconds, got {timeout!r}")
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "decode_responses": False,
    }


def server_name(pool: Any) -> str:
    """How a warning names the server behind a (non-cluster) client's pool."""
    if isinstance(pool, SentinelConnectionPool | AsyncSentinelPool):
        return f"the primary of Sentinel service {pool.service_name!r}"
    kwargs = pool.connection_kwargs
    return str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}")


def hits(keys: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
    """An ``MGET`` reply as the hits only, by the caller's keys."""
    return {key: value for key, value in zip(keys, values, strict=True) if value is not None}


def stored(keys: Iterable[str], replies: Sequence[Any]) -> set[str]:
    """The keys whose reply says the write happened: ``True`` from a ``SET NX`` (which
    redis-py turns ``OK`` into), ``1`` from a script."""
    return {key for key, ok in zip(keys, replies, strict=True) if ok == 1}


def script_calls(
    items: Mapping[str, tuple[Any, Any]], ttl: float | None
) -> list[tuple[bytes, list[Any]]]:
    """One compare-and-set script call, ``(key, args)``, per ``key: (expected, value)``."""
    ttl_ms = px_or_zero(ttl)
    return [
        (encode_key(key), [expected, value, ttl_ms]) for key, (expected, value) in items.items()
    ]


def refused_script(replies: Sequence[Any]) -> list[int]:
    """The positions of the calls a server refused with NOSCRIPT, to run again after
    ``SCRIPT LOAD``: such a call did not run at all."""
    return [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]


def merge_retried(replies: list[Any], retried: Sequence[int], again: Sequence[Any]) -> list[Any]:
    """Put the replies of the calls run again in their places.

    Raises:
        Exception: the first error reply left, as the driver raised it.
    """
    for i, reply in zip(retried, again, strict=True):
        replies[i] = reply
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


@contextlib.contextmanager
def malformed_url(url: str) -> Iterator[None]:
    """Around building a client from ``url`` (and one connection object from its
    options, without connecting): an unknown or malformed option in its query string
    fails at ``from_url``, as a ConfigurationError, not at the first command with a
    driver ``TypeError``.

    Raises:
        ConfigurationError: the URL carries an option the driver refuses.
    """
    try:
        yield
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"malformed Redis URL {url!r}: {exc}") from exc
