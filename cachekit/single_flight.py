"""One miss path per key among the tasks of one ``AsyncCache``: the others follow it.

A thousand tasks that miss on a cold key would otherwise each take a lease attempt and
a poll loop of their own. Here the first leads (a lease, the loader, the fill) and the
rest await its result: a future per key, ``shield``-ed so that a follower's cancellation
never cancels it. Followers take the leader's value unless its fill was rejected by a
write or an invalidation (they load again, as lease waiters would); they give up past
the lease's lifetime (a hung loader must not hang every caller of its key); and a write
in this process detaches the key's miss path, so a read after its own write never
joins a load that began before it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from cachekit.core.leases import Outcome
from cachekit.stats import Counters

__all__ = ["SharedMisses"]

# What a miss path hands its followers when it ended without a value they may take (its
# loader raised, it was cancelled, or its fill was rejected): each then leads or follows
# again.
_RETRY: Final = object()


def _hand_over(future: asyncio.Future[Any], value: Any) -> None:
    """Give a miss path's followers its result, unless its event loop is gone (the miss
    path is being closed with it: nobody follows it any more)."""
    if not future.get_loop().is_closed():
        future.set_result(value)


class SharedMisses:
    """The miss paths in flight, by backend key."""

    def __init__(self, counters: Counters) -> None:
        self._paths: dict[str, asyncio.Future[Any]] = {}
        self._counters = counters

    async def share(
        self,
        bkey: str,
        lead: Callable[[Outcome], Awaitable[Any]],
        patience: float,
        alone: Callable[[], Awaitable[Any]],
    ) -> Any:
        """Follow the miss path in flight on ``bkey`` for up to ``patience`` seconds (then
        ``alone()``: load without the cache), or lead one with ``lead(outcome)``."""
        loop = asyncio.get_running_loop()
        if (shared := self._paths.get(bkey)) is not None and shared.get_loop() is loop:
            value = await self._follow(bkey, shared, patience, alone)
            if value is not _RETRY:
                return value
        # (A miss path left on an event loop that ended never completes: replaced here.)
        future: asyncio.Future[Any] = loop.create_future()
        self._paths[bkey] = future
        outcome = Outcome()
        try:
            value = await lead(outcome)
        except BaseException:
            _hand_over(future, _RETRY)
            raise
        else:
            _hand_over(future, _RETRY if outcome.rejected else value)
        finally:
            if self._paths.get(bkey) is future:
                del self._paths[bkey]
        return value

    async def _follow(
        self,
        bkey: str,
        shared: asyncio.Future[Any],
        patience: float,
        alone: Callable[[], Awaitable[Any]],
    ) -> Any:
        """The value of the miss path followed (or of the one that took over from it),
        :data:`_RETRY` when no one leads any more, or ``alone()`` past ``patience``."""
        self._counters.lease_waits += 1
        deadline = time.monotonic() + patience
        while True:
            try:
                timeout = max(0.0, deadline - time.monotonic())
                value = await asyncio.wait_for(asyncio.shield(shared), timeout)
            except TimeoutError:
                return await alone()
            if value is not _RETRY:
                return value
            again = self._paths.get(bkey)
            if again is None or again is shared or again.get_loop() is not shared.get_loop():
                return _RETRY  # no one leads now: this caller does
            shared = again

    def forget(self, bkeys: Iterable[str] | None) -> None:
        """After a write: a miss that starts now must not join a miss path that began
        before it (``None``: every key, after a tag invalidation)."""
        if bkeys is None:
            self._paths.clear()
        else:
            for bkey in bkeys:
                self._paths.pop(bkey, None)
