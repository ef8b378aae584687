"""Whether a Redis server persists its data, which can resurrect deleted entries after a crash.

A Redis that writes RDB snapshots (``save``) and crashes reloads its last snapshot:
every entry deleted or invalidated since then is back, and readers get the old value
until its TTL. An append-only file fsynced once a second (``appendfsync everysec``,
the default) or left to the OS (``no``) loses the last second or more of deletes the
same way. Only ``appendonly yes`` with ``appendfsync always`` and no ``save`` points
loses no acknowledged delete. :class:`~cachekit.backends.redis.RedisBackend` asks the
server once, on its first write, and logs a warning if persistence is on.
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
    reasons = []
    save = config.get("save", "").strip()
    if save:
        reasons.append(f'RDB snapshots (save "{save}")')
    if config.get("appendonly", "no").lower() == "yes":
        fsync = config.get("appendfsync", "everysec").lower()
        if fsync != "always":
            reasons.append(f"an append-only file fsynced {fsync!r}")
    return " and ".join(reasons) or None


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
