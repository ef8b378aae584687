"""``@acache.cached``: cache-aside for ``async def`` functions and methods.

The twin of :mod:`cachekit.decorators`, sharing its keys (:class:`KeyMaker`,
:func:`backend_key_of`) and its method binding (:class:`CachedMethod`); only the
awaiting differs.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    ParamSpec,
    Protocol,
    Self,
    TypeVar,
    cast,
    overload,
)

from cachekit.backends.base import MISSING
from cachekit.decorators import (
    CachedMethod,
    backend_key_of,
    check_cacheable,
    object_probe,
)
from cachekit.entries import Entry
from cachekit.keymaker import KeyMaker, KeySpec, TagSpec
from cachekit.policy import FillPolicy

if TYPE_CHECKING:
    from cachekit.async_cache import AsyncCache

__all__ = ["AsyncCachedFunction", "acached"]

P = ParamSpec("P")
Q = ParamSpec("Q")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
T = TypeVar("T")


class AsyncCachedFunction(Protocol[P, R_co]):
    """A cached ``async def``: awaited as before, plus controls over its entries
    (``await f.invalidate(...)``, ``await f.refresh(...)``, ``f.key(...)``)."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R_co]: ...

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Delete the entry these arguments map to."""
        ...

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Drop the entry, then call the function and store its result (under a lease)."""
        ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The logical key for these arguments, usable with ``await cache.get()``."""
        ...

    @overload
    def __get__(
        self: AsyncCachedFunction[Concatenate[type[T], Q], R],
        obj: T | None,
        objtype: type[T],
    ) -> AsyncCachedFunction[Q, R]: ...

    @overload
    def __get__(self, obj: None, objtype: type[Any] | None = None) -> Self: ...

    @overload
    def __get__(
        self: AsyncCachedFunction[Concatenate[T, Q], R], obj: T, objtype: type[Any] | None = None
    ) -> AsyncCachedFunction[Q, R]: ...


def acached(
    cache: AsyncCache,
    *,
    key: KeySpec | None = None,
    policy: FillPolicy,
    tags: TagSpec | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], AsyncCachedFunction[P, R]]:
    """Cache an ``async def``'s results in ``cache``; the arguments are those of
    :func:`cachekit.decorators.cached`."""

    def decorate(func: Callable[P, Awaitable[R]]) -> AsyncCachedFunction[P, R]:
        check_cacheable(func, asynchronous=True)
        make_key = KeyMaker(func, key, tags)
        call = _wrap(cache, func, make_key, policy)
        controls = _Controls(cache, func, make_key, policy)
        if make_key.is_method:
            return cast("AsyncCachedFunction[P, R]", CachedMethod(func, call, controls))
        functools.update_wrapper(call, func)
        call.invalidate = controls.invalidate  # type: ignore[attr-defined]
        call.refresh = controls.refresh  # type: ignore[attr-defined]
        call.key = controls.key  # type: ignore[attr-defined]
        return cast("AsyncCachedFunction[P, R]", call)

    return decorate


def _wrap(
    cache: AsyncCache, func: Callable[P, Awaitable[R]], make_key: KeyMaker, policy: FillPolicy
) -> Callable[P, Coroutine[Any, Any, R]]:
    bkey_of = backend_key_of(cache, make_key)
    lookup = cache.lookup
    load_or_serve = cache.load_or_serve
    tags_of = make_key.tags_of

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        bkey = bkey_of(args, kwargs)
        if (value := await lookup(bkey)) is not MISSING and type(value) is not Entry:
            return value  # type: ignore[no-any-return]
        loader = functools.partial(func, *args, **kwargs)
        return await load_or_serve(bkey, value, loader, policy, tags_of(args, kwargs))  # type: ignore[no-any-return]

    plain = not policy.annotated and make_key.tags is None
    fast = make_key.spec is None and cache.key_policy is None and make_key.arity == 1
    if cache.inline_get is None or not (cache.objects and plain and fast):
        return wrapper
    # In-process objects, one argument, a default key: a hit needs no second coroutine.

    def slow(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Later:
        return _Later(wrapper(*args, **kwargs))

    def miss(bkey: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Later:
        loader = functools.partial(func, *args, **kwargs)
        return _Later(load_or_serve(bkey, MISSING, loader, policy, None))

    probe = object_probe(cache, cache.inline_get, cache.backend_key(make_key.prefix), slow, miss)

    async def object_wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        value = probe(*args, **kwargs)
        if type(value) is _Later:
            return await value.awaitable  # type: ignore[no-any-return]
        return value  # type: ignore[no-any-return]

    return object_wrapper


class _Later:
    """What the probe returns when the call must be awaited: the generic path or a miss."""

    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Awaitable[Any]) -> None:
        self.awaitable = awaitable


class _Controls(Generic[P, R]):
    """``invalidate``/``refresh``/``key`` for one async function, given its full arguments."""

    def __init__(
        self,
        cache: AsyncCache,
        func: Callable[P, Awaitable[R]],
        make_key: KeyMaker,
        policy: FillPolicy,
    ) -> None:
        self.cache = cache
        self.func = func
        self.make_key = make_key
        self.policy = policy

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        return self.make_key(args, kwargs)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        await self.cache.delete(self.make_key(args, kwargs))

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        # As Cache's: invalidate, then load under a lease, never an unconditional set.
        key = self.make_key(args, kwargs)
        await self.cache.delete(key)
        loader = functools.partial(self.func, *args, **kwargs)
        tags_of = self.make_key.tags_of(args, kwargs)
        bkey = self.cache.backend_key(key)
        return await self.cache.load_or_serve(bkey, MISSING, loader, self.policy, tags_of)  # type: ignore[no-any-return]
