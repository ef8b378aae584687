"""The typed usage file (checked by mypy in the gate) also runs as written."""

from __future__ import annotations

from tests.typing import usage


def test_the_typed_usage_runs() -> None:
    usage.main()
    assert usage.cache.stats().loads >= 5


async def test_the_typed_async_usage_runs() -> None:
    from tests.typing import async_usage

    await async_usage.main()
    assert async_usage.acache.stats().loads >= 5
