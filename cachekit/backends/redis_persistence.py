"""Whether a Redis server persists its data, which can resurrect deleted entries after a crash.

A Redis that writes RDB snapshots (``save``) and crashes reloads its last snapshot:
every entry deleted or invalidated since then is back, and readers get the old value
until its TTL. With ``appendonly yes`` it reloads the append-only file instead (never
the snapshot); fsynced once a second (``appendfsync everysec``, the default) or when
the OS likes (``no``), that file loses the last second or more of deletes the same
way. Only ``appendfsync always``, which writes each command to disk before Redis
answers it, loses no acknowledged delete. :class:`~cachekit.backends.redis.RedisBackend`
asks the server once, after its first write, and logs a warning if it persists.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["hazard", "warn_if_persistent"]

logger = logging.getLogger("cachekit")

_PARAMETERS = ("save", "appendonly", "appendfsync")


def hazard(config: Mapping[str, str]) -> str | None:
    """What makes a server with this ``CONFIG GET`` answer lose deletes on a crash, or
    None. A parameter the server did not report counts as off."""
    if config.get("appendonly", "no").lower() == "yes":  # then only the AOF is reloaded
        fsync = config.get("appendfsync", "everysec").lower()
        return None if fsync == "always" else f"an append-only file fsynced {fsync!r}"
    save = config.get("save", "").strip()
    return f'RDB snapshots (save "{save}")' if save else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def server_config(node: Any) -> dict[str, str]:
    """The persistence parameters of one server, in one round trip (a pipeline, so
    servers before Redis 7, whose CONFIG GET takes one parameter, answer too).

    Raises:
        Exception: whatever the client raises (CONFIG may be renamed or forbidden).
    """
    pipe = node.pipeline(transaction=False)
    for name in _PARAMETERS:
        pipe.config_get(name)
    config: dict[str, str] = {}
    for reply in pipe.execute():
        config.update({_text(key): _text(value) for key, value in reply.items()})
    return config


def warn_if_persistent(nodes: list[tuple[str, Any]]) -> None:
    """Log one warning naming each server (``(name, client)``) that persists data.

    Never raises: a server that does not answer, or forbids CONFIG (as managed services
    often do), is left out silently, and the check is not repeated.
    """
    found = []
    for name, node in nodes:
        try:
            reason = hazard(server_config(node))
        except Exception as exc:  # a best-effort check must never fail a cache call
            logger.debug("cachekit: could not read the persistence settings of %s: %r", name, exc)
            continue
        if reason:
            found.append(f"{name} ({reason})")
    if found:
        logger.warning(
            "cachekit: Redis %s persists data: after a crash and restart it reloads "
            "entries that were deleted or invalidated since, and serves them until their "
            'TTL. For a cache, run it with --save "" --appendonly no (see the README, '
            '"When the cache server fails")',
            ", ".join(found),
        )
