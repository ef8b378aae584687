"""AsyncCache at the edges a review found: a read after its own write, a hung leader,
closing with a replay in flight, a second cancellation, a closed event loop.

Each test gates the backend's replies with events (never with sleeps), so what happens
in between is fixed, whatever the machine's load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from cachekit import MISSING, AsyncCache
from cachekit.backends.memory import MemoryBackend
from cachekit.backends.proxy import InProcessAsync
from cachekit.exceptions import BackendError

HANG_GUARD = 30.0  # seconds: a hang guard, never expected to run out


class Gated(InProcessAsync):
    """Memory storage whose replies to ``method`` wait for ``gate`` (each call is applied
    first, as a server would, and ``applied`` is set); ``down`` fails deletes."""

    def __init__(self, method: str) -> None:
        super().__init__(MemoryBackend())
        self.method = method
        self.gate = asyncio.Event()
        self.applied = asyncio.Event()
        self.down = False

    async def _call(self, name: str, *args: Any) -> Any:
        if self.down and name in ("delete", "delete_many"):
            raise BackendError(f"{name}: connection refused")
        result = getattr(self.inner, name)(*args)
        if name == self.method and not self.gate.is_set():
            self.applied.set()
            await self.gate.wait()
        return result


async def within(awaitable: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(awaitable, HANG_GUARD)


def loader(value: Any) -> Callable[[], Awaitable[Any]]:
    async def load() -> Any:
        return value

    return load


async def test_a_read_after_its_own_write_never_joins_an_older_miss() -> None:
    backend = Gated("compare_and_set")
    cache = AsyncCache(backend, namespace="ryw")
    db = {"k": "v1"}

    async def load() -> str:
        return db["k"]

    first = asyncio.create_task(cache.get_or_load("k", load))
    await within(backend.applied.wait())  # v1 is stored; the reply is still on its way
    db["k"] = "v2"
    await cache.delete("k")  # the write's invalidation is done...
    backend.gate.set()  # (later replies are not held)
    assert await within(cache.get_or_load("k", load)) == "v2"  # ...so this read sees v2
    assert await first == "v1"  # the read that started before the write may see v1


async def test_followers_of_a_hung_leader_give_up_after_the_lease() -> None:
    cache = AsyncCache(MemoryBackend(), namespace="hung", lease_ttl=0.2)
    never = asyncio.Event()
    entered = asyncio.Event()

    async def hangs() -> str:
        entered.set()
        await never.wait()
        return "never"

    leader = asyncio.create_task(cache.get_or_load("k", hangs))
    await within(entered.wait())
    assert await within(cache.get_or_load("k", loader("fresh"))) == "fresh"
    assert cache.stats().lease_waits == 1
    leader.cancel()


async def test_aclose_replays_what_the_replayer_was_in_the_middle_of() -> None:
    backend = Gated("delete_many")
    cache = AsyncCache(backend, namespace="close")
    await cache.set("k", "old")
    backend.down = True
    await cache.delete("k")  # journaled; the replay task starts
    backend.down = False
    await within(backend.applied.wait())  # the task's replay is in flight, its reply held
    backend.gate.set()
    backend.inner.set(cache.backend_key("k"), "old", 60)  # as if the replay had not landed
    await cache.aclose()
    assert len(cache.journal) == 0
    assert backend.inner.get(cache.backend_key("k")) is MISSING


async def test_a_holder_cancelled_again_while_releasing_remembers_its_lease() -> None:
    backend = Gated("compare_and_delete")
    cache = AsyncCache(backend, namespace="twice", lease_ttl=60)
    entered = asyncio.Event()

    async def slow() -> str:
        entered.set()
        await asyncio.Event().wait()
        return "never"

    holder = asyncio.create_task(cache.get_or_load("k", slow))
    await within(entered.wait())
    holder.cancel()  # in the loader: the lease release starts...
    await within(backend.applied.wait())
    holder.cancel()  # ...and is cancelled in turn, its marker still there
    await asyncio.gather(holder, return_exceptions=True)
    assert cache.backend_key("k") in cache.lost_leases
    backend.gate.set()
    assert await within(cache.get_or_load("k", loader("v"))) == "v"
    assert cache.stats().lease_waits == 0  # reclaimed, not waited out


def test_a_pending_call_closed_with_its_loop_leaves_nothing_held() -> None:
    """``loop.run_until_complete`` per request: the loop ends with a miss in flight and
    a replay half done; the next loop reads, writes and replays as usual."""
    backend = Gated("delete_many")
    cache = AsyncCache(backend, namespace="loops", lease_ttl=1.0)
    entered_holder = asyncio.Event()

    async def hangs() -> str:
        entered_holder.set()
        await asyncio.Event().wait()
        return "never"

    async def first() -> None:
        await cache.set("x", "old")
        backend.down = True
        await cache.delete("x")  # journaled; the replay task starts
        backend.down = False
        await within(backend.applied.wait())  # mid-replay, its reply held
        asyncio.get_running_loop().create_task(cache.get_or_load("k", hangs))
        await within(entered_holder.wait())

    loop = asyncio.new_event_loop()
    loop.run_until_complete(first())
    loop.close()  # without cancelling either task

    async def second() -> None:
        backend.gate = asyncio.Event()  # the old one belongs to the closed loop
        backend.gate.set()
        assert await within(cache.replay_invalidations())
        await cache.set("x", "new")
        assert await cache.get("x") == "new"
        assert await within(cache.get_or_load("k", loader("v"))) == "v"

    asyncio.run(second())
