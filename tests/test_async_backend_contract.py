"""The backend contract for async backends: the sync suite's own cases, plus tasks and cancellation.

Every case of ``tests/test_backend_contract.py`` runs here unchanged against each
``async_backend``, through :class:`Blocking`: the case runs in a worker thread and each
backend call it makes runs as a coroutine on the test's event loop, which stays free
meanwhile. So the two suites cannot drift apart, and a case the sync suite gains runs
here too. What only an asyncio backend must get right (concurrent tasks on one
connection pool, cancellation at any point) is tested natively below.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from cachekit.backends.base import MISSING, AsyncBackend
from tests import test_backend_contract as sync_contract
from tests.blocking import Blocking
from tests.conftest import Expiry

Key = Callable[[str], str]

# A hang guard only: a call that takes this long is a bug, not a slow machine.
HANG_GUARD = 60.0

# Cases replaced by a native one here.
REPLACED = {"test_backend_satisfies_the_protocol"}
CASES = [
    case
    for name, case in vars(sync_contract).items()
    if name.startswith("test_") and callable(case) and name not in REPLACED
]


def submit(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any]) -> Any:
    """From a worker thread: run ``coroutine`` on the test's own loop and wait for it."""
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(HANG_GUARD)


@pytest.mark.parametrize("case", CASES, ids=[case.__name__.removeprefix("test_") for case in CASES])
async def test_sync_contract_case(
    case: Callable[..., None], async_backend: AsyncBackend, async_key: Key, async_expiry: Expiry
) -> None:
    fixtures = {
        "backend": Blocking(async_backend, functools.partial(submit, asyncio.get_running_loop())),
        "key": async_key,
        "expiry": async_expiry,
    }
    wanted = {name: fixtures[name] for name in inspect.signature(case).parameters}
    await asyncio.wait_for(asyncio.to_thread(case, **wanted), HANG_GUARD)


def test_backend_satisfies_the_async_protocol(async_backend: AsyncBackend) -> None:
    assert isinstance(async_backend, AsyncBackend)


async def test_racing_tasks_add_with_exactly_one_winner(
    async_backend: AsyncBackend, async_key: Key
) -> None:
    results = await asyncio.gather(
        *(async_backend.add(async_key("contested"), f"task {i}".encode(), 60) for i in range(16))
    )
    assert results.count(True) == 1
    assert await async_backend.get(async_key("contested")) == f"task {results.index(True)}".encode()


async def test_concurrent_tasks_each_get_their_own_replies(
    async_backend: AsyncBackend, async_key: Key
) -> None:
    """Tasks sharing one backend (one connection pool) never get each other's replies."""
    tasks = 32
    await async_backend.set_many(
        {async_key(f"t{i}"): f"value {i}".encode() for i in range(tasks)}, None
    )

    async def read(i: int) -> int:
        wrong = 0
        for _ in range(20):
            if await async_backend.get(async_key(f"t{i}")) != f"value {i}".encode():
                wrong += 1
            found = await async_backend.get_many([async_key(f"t{i}"), async_key("absent")])
            if found != {async_key(f"t{i}"): f"value {i}".encode()}:
                wrong += 1
        return wrong

    assert await asyncio.gather(*(read(i) for i in range(tasks))) == [0] * tasks


Operation = tuple[Callable[[], Awaitable[object]], object]


def _operations(
    backend: AsyncBackend, key: Key, values: dict[str, bytes], i: int
) -> list[Operation]:
    """Calls on key ``i`` that leave every value as it was, with their replies. The
    stored objects themselves are passed, as stored objects match by identity."""
    own, other = key(f"c{i}"), key(f"c{(i + 1) % len(values)}")
    value = values[own]
    return [
        (lambda: backend.get(own), value),
        (lambda: backend.get_many([own, other, key("absent")]), {own: value, other: values[other]}),
        (lambda: backend.set(own, value, None), None),
        (lambda: backend.set_many({own: value}, 60), None),
        (lambda: backend.add(own, b"never stored", None), False),
        (lambda: backend.add_many({own: b"never stored"}, 60), set()),
        (lambda: backend.compare_and_set(own, value, value, None), True),
        (lambda: backend.compare_and_set_many({own: (value, value)}, None), {own}),
        (lambda: backend.compare_and_delete(own, b"not the value"), False),
        (lambda: backend.delete(key(f"gone{i}")), None),
    ]


async def _cancel_at_random(rng: random.Random, calls: list[Coroutine[Any, Any, None]]) -> int:
    """Run each call as a task and cancel it after a random number of event loop steps
    (0: before it starts); return how many ended cancelled."""
    steps = 12
    tasks = [(asyncio.create_task(call), rng.randrange(steps)) for call in calls]
    for step in range(steps):
        for task, cancel_at in tasks:
            if cancel_at == step:
                task.cancel()
        await asyncio.sleep(0)
    done = await asyncio.gather(*(task for task, _ in tasks), return_exceptions=True)
    return sum(isinstance(outcome, asyncio.CancelledError) for outcome in done)


async def test_cancelled_calls_leave_no_reply_behind(
    async_backend: AsyncBackend, async_key: Key
) -> None:
    """Calls cancelled at random points (before sending, while waiting for the reply,
    after it) never hand a stale reply to a later call: every call that completes, and
    every read afterwards, answers for its own key."""
    n = 24
    values = {async_key(f"c{i}"): f"value {i}".encode() for i in range(n)}
    await async_backend.set_many(values, None)
    rng = random.Random(20240611)
    wrong: list[tuple[int, object, object]] = []

    async def run(i: int, operation: Operation) -> None:
        call, expected = operation
        result = await call()
        if result != expected:
            wrong.append((i, expected, result))

    cancelled = 0
    for _ in range(30):
        calls = [
            run(i, rng.choice(_operations(async_backend, async_key, values, i))) for i in range(n)
        ]
        cancelled += await _cancel_at_random(rng, calls)
    assert cancelled > 0  # at least those cancelled at step 0, before they started
    assert wrong == []
    for backend_key, value in values.items():
        assert await async_backend.get(backend_key) == value
    assert await async_backend.get_many(list(values)) == values
    assert await async_backend.get(async_key("absent")) is MISSING


async def test_timed_out_calls_leave_no_reply_behind(
    async_backend: AsyncBackend, async_key: Key
) -> None:
    """``asyncio.wait_for`` with tiny timeouts cancels calls wherever they are; the
    connections they leave behind answer the next callers correctly."""
    n = 16
    values = {async_key(f"w{i}"): f"value {i}".encode() for i in range(n)}
    await async_backend.set_many(values, None)
    rng = random.Random(7)

    async def read(backend_key: str) -> int:
        wrong = 0
        for _ in range(60):
            timeout = rng.choice([0.0, 0.00005, 0.0001, 0.0002, 0.0005, 0.001])
            try:
                got = await asyncio.wait_for(async_backend.get_many([backend_key]), timeout)
            except TimeoutError:
                continue
            wrong += got != {backend_key: values[backend_key]}
        return wrong

    assert await asyncio.gather(*(read(k) for k in values)) == [0] * n
    assert await asyncio.gather(*(async_backend.get(k) for k in values)) == list(values.values())
