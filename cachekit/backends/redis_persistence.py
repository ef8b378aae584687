"""Whether a Redis server persists its data, which can resurrect deleted entries after a crash.

A Redis that writes RDB snapshots (``save``) and crashes reloads its last snapshot:
every entry deleted or invalidated since then is back, and readers get the old value
until its TTL. With ``appendonly yes`` it reloads the append-only file instead (never
the snapshot); fsynced once a second (``appendfsync everysec``, the default) or when
the OS likes (``no``), that file loses the last second or more of deletes the same
way. Only ``appendfsync always``, which writes each command to disk before Redis
answers it, loses no acknowledged delete. :class:`~cachekit.backends.redis.RedisBackend`
and its asyncio twin ask each server once, after their first write, and log a warning
if it persists.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = [
    "PARAMETERS",
    "awarn_if_persistent",
    "finding",
    "hazard",
    "queue_config_gets",
    "report",
    "warn_if_persistent",
]

logger = logging.getLogger("cachekit")

#: What :func:`queue_config_gets` asks each server, one ``CONFIG GET`` apiece.
PARAMETERS: Final = ("save", "appendonly", "appendfsync")


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


def queue_config_gets(pipe: Any, **options: Any) -> None:
    """Queue the reads of :data:`PARAMETERS` on a pipeline (one ``CONFIG GET`` each, so
    servers before Redis 7, whose CONFIG GET takes one parameter, answer too).
    ``options`` go with each command: a cluster pipeline's ``target_nodes``."""
    for name in PARAMETERS:
        # execute_command: a cluster pipeline refuses config_get() but routes this.
        pipe.execute_command("CONFIG GET", name, **options)


def finding(name: str, replies: Sequence[Any]) -> str | None:
    """``"name (reason)"`` if one server's replies to :func:`queue_config_gets` show it
    persists data, else None. Never raises: a server that forbids CONFIG (as managed
    services often do) is left out, with a debug log."""
    config: dict[str, str] = {}
    for reply in replies:
        if isinstance(reply, Exception):
            _unreadable(name, reply)
            return None
        config.update({_text(key): _text(value) for key, value in reply.items()})
    reason = hazard(config)
    return f"{name} ({reason})" if reason else None


def report(found: Sequence[str | None]) -> None:
    """Log one warning naming each server :func:`finding` found, if any."""
    named = [item for item in found if item]
    if named:
        logger.warning(
            "cachekit: Redis %s persists data: after a crash and restart it reloads "
            "entries that were deleted or invalidated since, and serves them until their "
            'TTL. For a cache, run it with --save "" --appendonly no (see the README, '
            '"When the cache server fails")',
            ", ".join(named),
        )


def _unreadable(name: str, exc: BaseException) -> None:
    logger.debug("cachekit: could not read the persistence settings of %s: %r", name, exc)


def warn_if_persistent(nodes: list[tuple[str, Any]]) -> None:
    """Ask each server (``(name, client)``, one pipeline apiece) and :func:`report`.

    Never raises: a server that does not answer is left out silently, and the check is
    not repeated.
    """
    found = []
    for name, node in nodes:
        try:
            pipe = node.pipeline(transaction=False)
            queue_config_gets(pipe)
            replies = pipe.execute(raise_on_error=False)
        except Exception as exc:  # a best-effort check must never fail a cache call
            _unreadable(name, exc)
            continue
        found.append(finding(name, replies))
    report(found)


async def awarn_if_persistent(pipe: Any, nodes: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """:func:`warn_if_persistent` for asyncio, in one pipeline: ``pipe`` reaches every
    server, each ``(name, options)`` queues its reads with ``options`` (a cluster
    pipeline's ``target_nodes``, sent to all nodes at once).

    Never raises an ``Exception``; a cancellation propagates.
    """
    try:
        for _, options in nodes:
            queue_config_gets(pipe, **options)
        replies = await pipe.execute(raise_on_error=False)
    except Exception as exc:  # a best-effort check must never fail a cache call
        _unreadable(", ".join(name for name, _ in nodes), exc)
        return
    size = len(PARAMETERS)
    report([finding(name, replies[i * size : (i + 1) * size]) for i, (name, _) in enumerate(nodes)])
