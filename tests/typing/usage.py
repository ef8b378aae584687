"""Typed use of ``@cache.cached``: mypy --strict checks it in the gate, pytest runs it.

Every line here is what a user writes; without the ``__get__`` overloads of
``CachedFunction`` the method calls below fail to type-check (a missing argument).
"""

from __future__ import annotations

from typing import assert_type

from cachekit import Cache, CachedFunction
from cachekit.backends.memory import MemoryBackend

cache = Cache(MemoryBackend(), namespace="typing")


@cache.cached(ttl=60)
def get_user(user_id: int, active: bool = True) -> dict[str, int]:
    return {"id": user_id}


@cache.cached
def square(x: int) -> int:
    return x * x


class Prices:
    def __init__(self, currency: str) -> None:
        self.currency = currency

    def __cache_key__(self) -> str:
        return self.currency

    @cache.cached()
    def price(self, item: int, *, vat: bool = False) -> float:
        return 10.0 * item * (1.2 if vat else 1.0)

    @classmethod
    @cache.cached(key="unit:{code}")
    def unit(cls, code: str) -> str:
        return f"{cls.__name__}:{code}"


def main() -> None:
    assert_type(get_user(7), dict[str, int])
    assert_type(get_user.key(7, active=False), str)
    get_user.invalidate(user_id=7)
    assert_type(square(3), int)

    prices = Prices("EUR")
    assert_type(prices.price(2), float)
    assert_type(prices.price(2, vat=True), float)
    assert_type(prices.price.key(2), str)
    prices.price.invalidate(2)
    assert_type(prices.price.refresh(2, vat=True), float)
    bound: CachedFunction[[int], float] = prices.price
    assert bound(1) == 10.0

    assert_type(Prices.unit("kg"), str)
    assert_type(prices.unit("kg"), str)
    assert_type(Prices.unit.key("kg"), str)
    Prices.unit.invalidate("kg")
