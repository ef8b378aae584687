"""Typed use of ``AsyncCache``: mypy --strict checks it in the gate, pytest runs it."""

from __future__ import annotations

import asyncio
from typing import assert_type

from cachekit import AsyncCache, AsyncCachedFunction
from cachekit.backends.memory import MemoryBackend

acache = AsyncCache(MemoryBackend(), namespace="async-typing")


@acache.cached(ttl=60)
async def get_user(user_id: int, active: bool = True) -> dict[str, int]:
    await asyncio.sleep(0)
    return {"id": user_id}


@acache.cached
async def square(x: int) -> int:
    return x * x


class Prices:
    def __init__(self, currency: str) -> None:
        self.currency = currency

    def __cache_key__(self) -> str:
        return self.currency

    @acache.cached()
    async def price(self, item: int, *, vat: bool = False) -> float:
        return 10.0 * item * (1.2 if vat else 1.0)


async def load_answer() -> int:
    return 42


async def main() -> None:
    assert_type(await get_user(7), dict[str, int])
    assert_type(get_user.key(7, active=False), str)
    await get_user.invalidate(user_id=7)
    assert_type(await square(3), int)
    assert_type(await square.refresh(3), int)

    prices = Prices("EUR")
    assert_type(await prices.price(2), float)
    assert_type(await prices.price(2, vat=True), float)
    assert_type(prices.price.key(2), str)
    await prices.price.invalidate(2)
    bound: AsyncCachedFunction[[int], float] = prices.price
    assert await bound(1) == 10.0

    assert_type(await acache.get_or_load("answer", load_answer), int)
    users = acache.read_through("user", load=get_user)
    assert_type(await users.get(7), dict[str, int])
    await acache.aclose()
