"""AsyncMemcachedBackend under a cancellation storm: no reply ever reaches another call.

Thousands of tasks set and read keys of their own while half of them are cancelled or
time out at random points, on one server and on a pool of three (the session's own
memcached processes). Its figures are printed: run with ``-s``.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cachekit.backends.base import MISSING
from cachekit.backends.memcached import AsyncMemcachedBackend
from cachekit.backends.memcached_async_connections import ServerConnections
from tests.conftest import require
from tests.servers import ServerError, Servers, binary, memcached_command
from tests.test_memcached_connections import open_sockets

pytestmark = pytest.mark.memcached

GENEROUS = 30.0  # seconds: a hang guard, never expected to run out
STORM_TASKS = 2000
POOL_SIZE = 8


def pools(backend: AsyncMemcachedBackend) -> list[ServerConnections]:
    """Each server's connection pool."""
    nodes: Any = backend._nodes
    if hasattr(nodes, "members"):
        return [node.source for node in nodes.members.nodes.values()]
    return [nodes.connections]


def value_of(key: str, rng: random.Random) -> bytes:
    """A value only this key has, from a few bytes to 64 KiB (several reads' worth);
    3 KiB on average, so that 2000 of them fit in a 16 MiB server without eviction."""
    size = rng.choices([0, 10, 1000, 20_000, 64_000], weights=[30, 30, 33, 5, 2])[0]
    return f"{key}=".encode() + os.urandom(size)


class Storm:
    """Tasks that set then read keys of their own, half of them cut short at random.

    Tasks start as others end, ``window`` at a time: three for each connection, so
    calls are cut short both while waiting for a connection and in flight on one.
    """

    def __init__(
        self, backend: AsyncMemcachedBackend, namespace: str, seed: int, window: int
    ) -> None:
        self.backend = backend
        self.window = window
        self.rng = random.Random(seed)
        self.values = {
            f"{namespace}:{i}": value_of(f"{namespace}:{i}", self.rng) for i in range(STORM_TASKS)
        }
        self.wrong = 0
        self.completed = 0
        self.errors: list[BaseException] = []
        self.fates = {"cancel()": 0, "wait_for": 0, "cut short": 0}

    async def work(self, key: str) -> None:
        backend, value = self.backend, self.values[key]
        await backend.set(key, value, 60)
        self.wrong += not_mine(await backend.get(key), value)
        self.wrong += not_mine((await backend.get_many([key])).get(key, MISSING), value)
        self.completed += 1

    def start(self, key: str) -> asyncio.Future[None]:
        """A quarter under ``asyncio.wait_for`` with 0.1-3 ms, a quarter cancelled by
        ``task.cancel()`` after 0-30 turns of the event loop, half left alone."""
        fate = self.rng.random()
        if fate < 0.25:
            self.fates["wait_for"] += 1
            timeout = self.rng.uniform(0.0001, 0.003)
            return asyncio.ensure_future(asyncio.wait_for(self.work(key), timeout))
        task = asyncio.ensure_future(self.work(key))
        if fate < 0.5:
            self.fates["cancel()"] += 1
            cancel_after(task, self.rng.randrange(31))
        return task

    async def run(self) -> None:
        pending: set[asyncio.Future[None]] = set()
        finished: list[asyncio.Future[None]] = []
        for key in self.values:
            while len(pending) >= self.window:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                finished.extend(done)
            pending.add(self.start(key))
        if pending:
            done, _ = await asyncio.wait(pending, timeout=GENEROUS)
            finished.extend(done)
        assert len(finished) == STORM_TASKS, "the storm hung"
        for task in finished:
            if task.cancelled() or isinstance(task.exception(), TimeoutError):
                self.fates["cut short"] += 1
            elif task.exception() is not None:
                self.errors.append(task.exception())  # type: ignore[arg-type]

    async def wrong_after(self) -> int:
        """Every key written again and read back by tasks left to finish: the reads
        that did not return their own key's value, one by one and in one batch."""
        backend, values = self.backend, self.values
        await asyncio.gather(*(backend.set(key, value, 60) for key, value in values.items()))
        found = await asyncio.gather(*(backend.get(key) for key in values))
        batch = await backend.get_many(list(values))
        wrong = sum(not_mine(got, value) for got, value in zip(found, values.values(), strict=True))
        return wrong + sum(
            not_mine(batch.get(key, MISSING), value) for key, value in values.items()
        )


def not_mine(got: object, value: bytes) -> bool:
    """A reply holding another call's value. A miss is not one: the servers are small
    and shared with the rest of the suite, so a key may be evicted."""
    return got is not MISSING and got != value


def cancel_after(task: asyncio.Future[None], turns: int) -> None:
    """Cancel ``task`` once the event loop has turned ``turns`` more times."""
    if turns == 0:
        task.cancel()
    else:
        asyncio.get_running_loop().call_soon(cancel_after, task, turns - 1)


async def sample_sockets(peak: list[int], done: asyncio.Event) -> None:
    """The most sockets the process held at once, sampled at every turn of the loop."""
    while not done.is_set():
        peak[0] = max(peak[0], open_sockets())
        await asyncio.sleep(0)


@pytest.fixture(params=[1, 3], ids=["one-server", "pool"])
async def storm_backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[AsyncMemcachedBackend]:
    """Memcached servers of the storm's own, with room for every value: the suite's
    shared ones fill up (``SERVER_ERROR out of memory``) over a full run."""
    require("the memcached binary", binary("memcached") is not None, "install memcached")
    with Servers(tmp_path) as servers:
        try:
            nodes = [
                servers.start(f"storm-{i}", memcached_command(memory_mb=64))
                for i in range(request.param)
            ]
        except ServerError as exc:
            require("memcached processes of our own", False, str(exc))
            raise  # not reached: require() skipped or failed
        backend = AsyncMemcachedBackend(
            [node.address for node in nodes],
            timeout=GENEROUS,
            connect_timeout=GENEROUS,
            pool_size=POOL_SIZE,
        )
        yield backend
        await backend.aclose()
        for node in nodes:  # throwaway data: SIGKILL, not SIGTERM's ~1 s exit
            node.kill()


async def test_a_cancellation_storm_leaves_every_reply_with_its_caller(
    storm_backend: AsyncMemcachedBackend, namespace: str
) -> None:
    """2000 tasks set and read keys of their own (values up to 64 KiB), three per
    connection at a time, half of them cancelled or timed out at random points. Not
    one read returns another key's value, every key then reads its own value back,
    and no server ever had more than ``pool_size`` connections, counted by the pool
    and by the process's sockets."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("counts descriptors through /proc")
    connections = pools(storm_backend)
    seed = random.randrange(2**32)
    storm = Storm(storm_backend, namespace, seed, window=3 * POOL_SIZE * len(connections))
    before = open_sockets()
    peak, done = [before], asyncio.Event()
    sampler = asyncio.ensure_future(sample_sockets(peak, done))
    await storm.run()
    done.set()
    await sampler
    wrong_after = await storm.wrong_after()
    fates = storm.fates
    print(
        f"\nstorm (seed {seed}, {len(connections)} server(s), pool_size={POOL_SIZE}, "
        f"{storm.window} tasks at once): {STORM_TASKS} tasks, {fates['cancel()']} cancel() + "
        f"{fates['wait_for']} wait_for, {fates['cut short']} cut short, {storm.completed} "
        f"completed; wrong values {storm.wrong} during, {wrong_after} after; connections "
        f"opened {sum(p.opened for p in connections)}, peak per server "
        f"{[p.peak for p in connections]}, process sockets peak +{peak[0] - before}"
    )
    assert storm.errors == []
    assert storm.wrong == 0 and wrong_after == 0
    assert fates["cut short"] > 0  # the storm did cut calls short...
    assert sum(p.opened for p in connections) > len(connections) * POOL_SIZE  # ...in flight
    assert all(p.peak <= POOL_SIZE for p in connections)
    await storm_backend.aclose()
    await asyncio.sleep(0)  # the last closes' callbacks
    assert [p.connections for p in connections] == [0] * len(connections)  # none lost count
