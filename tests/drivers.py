"""Both drivers, one suite: ``Cache``'s API over an ``AsyncCache`` on a background loop.

A module that declares ``pytestmark = pytest.mark.usefixtures("both_drivers")`` runs
each test twice: with ``Cache``, and with :class:`AsyncAsSync`, which the fixture puts
in place of the module's ``Cache``. Every call then goes through ``AsyncCache`` and the
async driver of the same core flows, on one event loop thread shared by the session;
sync loaders run in worker threads (``asyncio.to_thread``), so a loader that blocks
never blocks the loop, and the caller's context (the lease re-entrancy check) travels
with each call. A plain ``RedisBackend`` is replaced by an ``AsyncRedisBackend`` on the
same server (standalone or cluster), so the fault suites hang and kill a real async
client; any other backend (memory, memcached, the suites' counting and failing
wrappers) is awaited inline (:class:`~cachekit.backends.proxy.InProcessAsync`). The
async backends have their own contract suite.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import redis
import redis.asyncio

from cachekit import AsyncCache
from cachekit.backends.base import AsyncBackend, Backend
from cachekit.backends.proxy import InProcessAsync
from cachekit.backends.redis import AsyncRedisBackend, RedisBackend
from tests.blocking import EventLoopThread

T = TypeVar("T")

_loops: list[EventLoopThread] = []
_started = threading.Lock()


def call(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the session's event loop (a daemon thread started on first use),
    in a copy of the caller's context; wait for it."""
    with _started:
        if not _loops:
            _loops.append(EventLoopThread())
    return _loops[0].call(coro)


def in_thread(func: Callable[..., T]) -> Callable[..., Coroutine[Any, Any, T]]:
    """``func`` as an ``async def`` that runs it in a thread of its own (same signature,
    name and qualified name, so its keys are the sync function's), in the caller's
    context. The thread is a daemon: a loader a test leaves blocked (its caller cancelled
    or timed out) must not hold up the interpreter's exit, as an executor's would."""

    @functools.wraps(func)
    async def run(*args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        context = contextvars.copy_context()

        def settle(outcome: Callable[[], None]) -> None:
            if not done.done():  # the awaiting task may have been cancelled meanwhile
                outcome()

        def work() -> None:
            try:
                result = context.run(func, *args, **kwargs)
            except BaseException as exc:  # handed to the awaiting task
                loop.call_soon_threadsafe(settle, functools.partial(done.set_exception, exc))
            else:
                loop.call_soon_threadsafe(settle, functools.partial(done.set_result, result))

        threading.Thread(target=work, name="test-loader", daemon=True).start()
        return await done

    return run


class _Controlled:
    """A decorated function's sync face: called, invalidated, refreshed, keyed."""

    def __init__(self, target: Any) -> None:
        self._target = target
        functools.update_wrapper(self, target, updated=())  # not its controls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call(self._target(*args, **kwargs))

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        return self if obj is None else _Controlled(self._target.__get__(obj, objtype))

    def invalidate(self, *args: Any, **kwargs: Any) -> None:
        call(self._target.invalidate(*args, **kwargs))

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        return call(self._target.refresh(*args, **kwargs))

    def key(self, *args: Any, **kwargs: Any) -> str:
        return str(self._target.key(*args, **kwargs))


class _View:
    """A view's sync face."""

    def __init__(self, view: Any) -> None:
        self._view = view

    def __getattr__(self, name: str) -> Any:
        return getattr(self._view, name)

    def get(self, id: Any) -> Any:
        return call(self._view.get(id))

    def get_many(self, ids: Iterable[Any]) -> Any:
        return call(self._view.get_many(list(ids)))

    def invalidate(self, id: Any) -> None:
        call(self._view.invalidate(id))

    def invalidate_many(self, ids: Iterable[Any]) -> None:
        call(self._view.invalidate_many(list(ids)))

    def put(self, id: Any, value: Any) -> None:
        call(self._view.put(id, value))

    def delete(self, id: Any) -> None:
        call(self._view.delete(id))


def _asynced(options: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    return {
        name: in_thread(value) if name in names and callable(value) else value
        for name, value in options.items()
    }


#: The async clients built for the current test, closed when it ends (both_drivers).
OPENED: list[AsyncRedisBackend] = []


def _async_twin(backend: Backend) -> AsyncBackend:
    """An async backend on the same storage as ``backend`` (see the module docstring)."""
    client = getattr(backend, "client", None)
    if type(backend) is not RedisBackend or type(client).__module__.startswith("fakeredis"):
        return InProcessAsync(backend)  # awaited inline
    assert client is not None
    if isinstance(client, redis.RedisCluster):
        node = client.get_default_node()
        assert node is not None
        twin = AsyncRedisBackend(
            redis.asyncio.RedisCluster(
                host=node.host, port=node.port, socket_timeout=2.0, decode_responses=False
            )
        )
    else:
        kwargs = client.connection_pool.connection_kwargs
        url = f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"
        twin = AsyncRedisBackend.from_url(url, timeout=kwargs.get("socket_timeout") or 0.1)
    OPENED.append(twin)
    return twin


async def close_opened() -> None:
    """Close the async clients the test's caches opened."""
    while OPENED:
        twin = OPENED.pop()
        await twin.aclose()
        if isinstance(twin.client, redis.asyncio.RedisCluster):
            await twin.client.aclose()  # injected: aclose() left it open


class AsyncAsSync:
    """``Cache(backend, **options)``, served by an ``AsyncCache``."""

    def __init__(self, backend: Backend | AsyncBackend, **options: Any) -> None:
        store: Any = backend
        if isinstance(backend, Backend) and not backend.capabilities.in_process:
            store = _async_twin(backend)
        self.acache = AsyncCache(store, **options)
        self.backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self.acache, name)

    def __repr__(self) -> str:
        return f"AsyncAsSync({self.acache!r})"

    def _awaited(name: str) -> Callable[..., Any]:  # type: ignore[misc]
        def method(self: AsyncAsSync, *args: Any, **kwargs: Any) -> Any:
            return call(getattr(self.acache, name)(*args, **kwargs))

        method.__name__ = name
        return method

    get = _awaited("get")
    get_many = _awaited("get_many")
    set = _awaited("set")
    set_many = _awaited("set_many")
    delete = _awaited("delete")
    delete_many = _awaited("delete_many")
    invalidate_tags = _awaited("invalidate_tags")
    replay_invalidations = _awaited("replay_invalidations")

    def get_or_load(self, key: str, loader: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        return call(self.acache.get_or_load(key, in_thread(loader), *args, **kwargs))

    def cached(self, func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        decorate = self.acache.cached(**options)

        def wrap(func: Callable[..., Any]) -> Any:
            if isinstance(func, classmethod | staticmethod) or not callable(func):
                decorate(func)  # raises the same TypeError as Cache's
            return _Controlled(decorate(in_thread(func)))

        return wrap if func is None else wrap(func)

    def read_through(self, prefix: str, **options: Any) -> _View:
        return _View(self.acache.read_through(prefix, **_asynced(options, ("load", "load_many"))))

    def write_through(self, prefix: str, **options: Any) -> _View:
        names = ("load", "load_many", "save", "remove")
        return _View(self.acache.write_through(prefix, **_asynced(options, names)))
