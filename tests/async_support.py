"""Helpers of the AsyncCache suites: backend selections, hang guards, pause points, loop
probes, a task canceller, and the entry point of spawned processes (which import it
from here)."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, TypeVar

import pytest

from cachekit import AsyncCache
from cachekit.backends.base import AsyncBackend
from cachekit.backends.proxy import AsyncBackendProxy
from cachekit.backends.redis import AsyncRedisBackend
from tests.conftest import SERVER_TIMEOUT
from tests.workloads import JOIN_TIMEOUT, Outcome, watchdog

T = TypeVar("T")

GENEROUS = 30.0  # seconds: a hang guard, never expected to run out
# Ids of the ``async_backend`` fixture (tests/conftest.py), for indirect parametrization.
INPROCESS = pytest.param("inprocess", id="inprocess")
AREDIS = pytest.param("aredis", id="aredis", marks=pytest.mark.redis)
AMEMCACHED = pytest.param("amemcached", id="amemcached", marks=pytest.mark.memcached)
on_three = pytest.mark.parametrize("async_backend", [INPROCESS, AREDIS, AMEMCACHED], indirect=True)
on_two = pytest.mark.parametrize("async_backend", [INPROCESS, AREDIS], indirect=True)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the loop run until ``condition()`` holds (a hang guard, never a timing bound)."""
    deadline = time.monotonic() + GENEROUS
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        await asyncio.sleep(0.001)


class Gate:
    """A loader's pause point: ``entered`` is set when it gets there; it goes on once
    ``opened`` is set."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def wait(self) -> None:
        self.entered.set()
        await self.opened.wait()

    def loader(self, value: T) -> Callable[[], Awaitable[T]]:
        async def load() -> T:
            await self.wait()
            return value

        return load


async def unexpected() -> Any:
    raise AssertionError("a caller that should have waited called the loader")


# -- the event loop and cancellation ----------------------------------------------------


class Ticker:
    """A task that counts the turns of the event loop it gets."""

    def __init__(self) -> None:
        self.ticks = 0

    async def run(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0)


def forbidden_sleep(slept: list[float]) -> Callable[[float], None]:
    """A ``time.sleep`` that notes the call and fails it: it would block the loop."""

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        raise AssertionError("time.sleep() on the event loop")

    return sleep


async def worst_lag(work: Awaitable[T], probe: float = 0.001) -> tuple[T, float]:
    """Await ``work`` while a task measures how late the loop wakes it from sleeps."""
    loop, worst, done = asyncio.get_running_loop(), 0.0, asyncio.Event()

    async def measure() -> None:
        nonlocal worst
        while not done.is_set():
            start = loop.time()
            await asyncio.sleep(probe)
            worst = max(worst, loop.time() - start - probe)

    measuring = asyncio.create_task(measure())
    try:
        return await work, worst
    finally:
        done.set()
        await measuring


class CancelsTasks(AsyncBackendProxy):
    """Cancels each task that has a plan ``[n, turns]`` during its n-th backend call,
    ``turns`` turns of the loop after the call starts (by then it may be over)."""

    def __init__(self, inner: AsyncBackend) -> None:
        super().__init__(inner)
        self.plans: dict[asyncio.Task[Any] | None, list[int]] = {}
        self.cancellers: list[asyncio.Task[None]] = []

    def _call(self, name: str, *args: Any) -> Any:
        task = asyncio.current_task()
        if (plan := self.plans.get(task)) is not None:
            plan[0] -= 1
            if plan[0] == 0 and task is not None:
                self.cancellers.append(asyncio.create_task(self._cancel(task, plan[1])))
        return getattr(self.inner, name)(*args)  # the coroutine, awaited by the caller

    async def _cancel(self, task: asyncio.Task[Any], turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()


# -- a stampede of processes, each running asyncio -------------------------------------

PROCESSES, TASKS_PER_PROCESS = 4, 64


async def _stampede(url: str, namespace: str) -> Outcome:
    """One process's tasks on one cold key; the loader counts its calls in Redis and
    holds the lease until every task of every process has arrived."""
    backend = AsyncRedisBackend.from_url(url, timeout=SERVER_TIMEOUT)
    acache = AsyncCache(backend, namespace=namespace, lease_ttl=GENEROUS, lease_poll=0.01)
    arrived, everyone = f"{namespace}:arrived", PROCESSES * TASKS_PER_PROCESS

    async def load() -> str:
        await backend.client.incr(f"{namespace}:loads")
        deadline = time.monotonic() + GENEROUS
        while int(await backend.client.get(arrived) or 0) < everyone:
            assert time.monotonic() < deadline, "not every task arrived"
            await asyncio.sleep(0.01)
        return "loaded"

    async def call() -> str:
        await backend.client.incr(arrived)
        return await acache.get_or_load("hot", load)

    try:
        results = await asyncio.gather(
            *(call() for _ in range(TASKS_PER_PROCESS)), return_exceptions=True
        )
    finally:
        await backend.aclose()
    errors = ["".join(traceback.format_exception(r)) for r in results if isinstance(r, Exception)]
    return Outcome(
        stats=asdict(acache.stats()),
        errors=errors,
        values=[repr(r) if isinstance(r, BaseException) else r for r in results],
    )


def stampede_process(url: str, namespace: str, barrier: Any, results: Any) -> None:
    """A spawned process: meet the others at ``barrier``, then stampede on asyncio."""
    watchdog()
    try:
        barrier.wait(JOIN_TIMEOUT)
        results.put(asyncio.run(_stampede(url, namespace)))
    except BaseException:
        results.put(Outcome(errors=[traceback.format_exc()]))
