"""``@cache.cached``: cache-aside for functions and methods, keyed on bound arguments.

Keys come from :class:`~cachekit.keymaker.KeyMaker`; this module wraps the function so
that a hit costs as little as possible: the common call shapes build their backend key
inline, in a closure prepared once at decoration.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
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
from cachekit.core.reads import NOT_PLAIN
from cachekit.entries import Entry
from cachekit.exceptions import CacheError, KeyEncodingError
from cachekit.keycodec import encode
from cachekit.keymaker import KeyMaker, KeySpec, TagSpec
from cachekit.policy import FillPolicy

if TYPE_CHECKING:
    from cachekit.cache import Cache
    from cachekit.core.state import CacheCore

__all__ = [
    "CachedFunction",
    "CachedMethod",
    "KeySpec",
    "TagSpec",
    "backend_key_of",
    "cached",
    "check_cacheable",
]

P = ParamSpec("P")
Q = ParamSpec("Q")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
T = TypeVar("T")


class CachedFunction(Protocol[P, R_co]):
    """A cached function: callable as before, plus controls over its entries.

    As a method it binds like a function (``obj.method(7)``, ``obj.method.key(7)``);
    the ``__get__`` overloads tell type checkers so.
    """

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Delete the entry these arguments map to."""
        ...

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Drop the entry, then call the function and store its result (under a lease)."""
        ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The logical key for these arguments, usable with ``cache.get()``."""
        ...

    # A classmethod (first parameter type[T]) binds to the class it is read from. mypy
    # reads class attributes through this overload for any first parameter, so a plain
    # method read from its class (rare: Service.get(service, 7)) types as bound.
    @overload
    def __get__(
        self: CachedFunction[Concatenate[type[T], Q], R], obj: T | None, objtype: type[T]
    ) -> CachedFunction[Q, R]: ...

    @overload
    def __get__(self, obj: None, objtype: type[Any] | None = None) -> Self: ...

    @overload
    def __get__(
        self: CachedFunction[Concatenate[T, Q], R], obj: T, objtype: type[Any] | None = None
    ) -> CachedFunction[Q, R]: ...


def check_cacheable(func: object, *, asynchronous: bool = False) -> None:
    """Refuse what ``@cache.cached`` cannot cache, at decoration, saying what to do.

    Args:
        asynchronous: the decorator is ``AsyncCache.cached``, which takes ``async def``
            functions only; ``Cache.cached`` takes plain functions only.

    Raises:
        TypeError: ``func`` is not a callable returning a value the way this cache
            awaits it: an ``async def`` for ``Cache`` (or a plain ``def`` for
            ``AsyncCache``), a generator function, or a classmethod/staticmethod object.
    """
    if isinstance(func, classmethod | staticmethod):
        kind = type(func).__name__
        raise TypeError(f"put @{kind} above @cache.cached(), not below it")
    if not callable(func):
        raise TypeError(f"@cache.cached() decorates functions, not {type(func).__name__}")
    name = getattr(func, "__qualname__", repr(func))
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(
            f"@cache.cached() cannot cache {name}: it is a generator function, and a"
            " generator can be consumed only once; return a list (or tuple) instead"
        )
    if inspect.iscoroutinefunction(func) and not asynchronous:
        raise TypeError(
            f"@cache.cached() cannot cache {name}: it is async, and Cache would hold the"
            " coroutine, not its result; use cachekit.AsyncCache for async functions"
        )
    if asynchronous and not inspect.iscoroutinefunction(func):
        raise TypeError(
            f"AsyncCache.cached() cannot cache {name}: it is not an async def; use"
            " cachekit.Cache for plain functions"
        )


def cached(
    cache: Cache,
    *,
    key: KeySpec | None = None,
    policy: FillPolicy,
    tags: TagSpec | None = None,
) -> Callable[[Callable[P, R]], CachedFunction[P, R]]:
    """Cache a function's results in ``cache`` (cache-aside); see ``Cache.cached``.

    Args:
        cache: the cache to store results in.
        key: ``None`` for a key from the module, qualified name and every bound
            argument, canonically encoded (:mod:`cachekit.keycodec`; ``self`` through
            its ``__cache_key__``); a template such as ``"user:{user_id}"``, each value
            encoded (:class:`~cachekit.keycodec.Template`); or a callable taking the
            function's arguments and returning the key.
        policy: TTL, lease, stale window and early refresh (``cache.policy(...)``).
        tags: key sets of each result: a list, or a callable taking the result and
            then the function's arguments (``lambda result, org_id: [...]``).

    The key is logical (``cache.get(f.key(7))`` works); namespacing and any hashing
    happen in ``cache.backend_key``.

    Raises:
        TypeError: at decoration, for what :func:`check_cacheable` refuses.
        ConfigurationError: at decoration, for a template naming something that is not
            a parameter, or one two argument tuples could render alike.
        KeyEncodingError: at decoration, for a default key of a lambda or of a closure
            whose captured values have no encoding; at a call, for an argument that has
            none.
    """

    def decorate(func: Callable[P, R]) -> CachedFunction[P, R]:
        check_cacheable(func)
        make_key = KeyMaker(func, key, tags)
        call = _wrap_function(cache, func, make_key, policy)
        if make_key.is_method:
            controls = _Controls(cache, func, make_key, policy)
            return cast("CachedFunction[P, R]", CachedMethod(func, call, controls))
        return call

    return decorate


def _wrap_function(
    cache: Cache, func: Callable[P, R], make_key: KeyMaker, policy: FillPolicy
) -> CachedFunction[P, R]:
    chosen = _generic_wrapper(cache, func, make_key, policy)
    # Annotated entries (stale_ttl, early_refresh, tags) need the generic path's checks.
    plain = not policy.annotated and make_key.tags is None
    fast = make_key.spec is None and cache.key_policy is None
    if cache.objects and plain and fast and make_key.arity == 1:
        chosen = _object_wrapper(cache, func, make_key, policy, chosen)
    functools.update_wrapper(chosen, func)
    controls = _Controls(cache, func, make_key, policy)
    chosen.invalidate = controls.invalidate  # type: ignore[attr-defined]
    chosen.refresh = controls.refresh  # type: ignore[attr-defined]
    chosen.key = controls.key  # type: ignore[attr-defined]
    return cast("CachedFunction[P, R]", chosen)


def backend_key_of(
    cache: CacheCore, make_key: KeyMaker
) -> Callable[[tuple[Any, ...], dict[str, Any]], str]:
    """The backend key of a call's arguments, as a closure prepared once: the common
    call shape (default keys on a backend that takes any key string, called
    positionally) builds it inline, with no call to ``make_key``."""
    fast = make_key.spec is None and cache.key_policy is None
    arity = make_key.arity if fast else -1
    full_prefix = cache.backend_key(make_key.prefix)
    backend_key = cache.backend_key

    def bkey_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        try:
            if kwargs or len(args) != arity:
                return backend_key(make_key(args, kwargs))
            if arity == 1:
                return full_prefix + encode(args[0])
            return full_prefix + ",".join(map(encode, args))
        except KeyEncodingError:
            make_key(args, kwargs)  # raises the error naming the argument and the fix
            raise

    return bkey_of


def _generic_wrapper(
    cache: Cache, func: Callable[P, R], make_key: KeyMaker, policy: FillPolicy
) -> Callable[P, R]:
    # Everything the hit path needs is bound here, once: each attribute lookup or
    # call saved is worth ~5% of an in-process hit.
    bkey_of = backend_key_of(cache, make_key)
    lookup = cache.lookup
    load_or_serve = cache.load_or_serve
    tags_of = make_key.tags_of

    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        bkey = bkey_of(args, kwargs)
        if (value := lookup(bkey)) is not MISSING and type(value) is not Entry:
            return value  # type: ignore[no-any-return]
        # partial, not a lambda: a closure over args would cost every hit two cells.
        loader = functools.partial(func, *args, **kwargs)
        return load_or_serve(bkey, value, loader, policy, tags_of(args, kwargs))  # type: ignore[no-any-return]

    return wrapper


# What an object backend's get returns that the fast path must not return as a value.


def object_probe(  # noqa: C901 - the hit path, inlined on purpose
    cache: CacheCore,
    get: Callable[[str], Any],
    full_prefix: str,
    slow: Callable[[tuple[Any, ...], dict[str, Any]], Any],
    miss: Callable[[str, tuple[Any, ...], dict[str, Any]], Any],
) -> Callable[..., Any]:
    """The hit path of an in-process backend for a one-argument function with a default
    key, with the lookup inlined: every call or branch saved here is ~5% of a hit
    (measured against cachetools.cached). Called with the function's arguments, it
    returns the cached value, or what ``slow(args, kwargs)`` (the generic path) or
    ``miss(bkey, args, kwargs)`` (a counted miss) return. ``Cache`` uses it as the
    wrapper itself; ``AsyncCache``'s wrapper awaits what the two callbacks return. An
    in-process ``get`` never waits on I/O, so both drivers share this one."""
    counters = cache.counters
    pending = cache.journal.keys  # updated in place, so this stays current
    not_plain = NOT_PLAIN
    quoted_prefix = full_prefix + "'"

    def probe(*args: Any, **kwargs: Any) -> Any:
        if kwargs or pending:
            return slow(args, kwargs)
        # keycodec.encode, inlined for one int or str argument; any other call shape or
        # type, or an int too long for repr(), takes the generic path, which encodes it.
        try:
            (arg,) = args  # cheaper than len() and [0]: a hit is only ~20 steps
            if type(arg) is int:
                bkey = full_prefix + repr(arg)
            elif type(arg) is str:
                bkey = quoted_prefix + arg.replace("\\", "\\\\").replace("'", "\\'") + "'"
            else:
                bkey = ""
        except ValueError:
            bkey = ""
        if not bkey:  # slow() is called outside the try: its ValueErrors are the user's
            return slow(args, kwargs)
        try:
            raw = get(bkey)
        except CacheError as exc:
            cache.read_failed(exc)
        else:
            if type(raw) not in not_plain:
                counters.hits += 1
                return raw
            if raw is not MISSING:  # a lease, or an annotated entry (a tagged cache.set)
                return slow(args, kwargs)
            counters.misses += 1
        return miss(bkey, args, kwargs)

    return probe


def _object_wrapper(
    cache: Cache,
    func: Callable[P, R],
    make_key: KeyMaker,
    policy: FillPolicy,
    generic: Callable[P, R],
) -> Callable[P, R]:
    """The in-process, one-argument case: :func:`object_probe` is the wrapper."""
    fill = cache.load_or_serve

    def slow(args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        return generic(*args, **kwargs)

    def miss(bkey: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        loader = functools.partial(func, *args, **kwargs)
        return fill(bkey, MISSING, loader, policy, None)  # type: ignore[no-any-return]

    full_prefix = cache.backend_key(make_key.prefix)
    return object_probe(cache, cache.store.get, full_prefix, slow, miss)


class _Controls(Generic[P, R]):
    """``invalidate``/``refresh``/``key`` for one function, given its full arguments."""

    def __init__(
        self, cache: Cache, func: Callable[P, R], make_key: KeyMaker, policy: FillPolicy
    ) -> None:
        self.cache = cache
        self.func = func
        self.make_key = make_key
        self.policy = policy

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        return self.make_key(args, kwargs)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        self.cache.delete(self.make_key(args, kwargs))

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        # Invalidate, then load under a lease: an unconditional overwrite could store
        # a value older than one a concurrent caller loaded after a write.
        key = self.make_key(args, kwargs)
        self.cache.delete(key)
        loader = functools.partial(self.func, *args, **kwargs)
        tags_of = self.make_key.tags_of(args, kwargs)
        bkey = self.cache.backend_key(key)
        return self.cache.load_or_serve(bkey, MISSING, loader, self.policy, tags_of)  # type: ignore[no-any-return]


class CachedMethod(Generic[P, R]):
    """A cached method: binding to an instance binds the controls too.

    ``obj.method.invalidate(7)`` must mean the entry of ``obj.method(7)``, which a
    plain function attribute cannot know; so this descriptor hands out bound copies.
    The same class serves ``AsyncCache``, whose call and controls return awaitables.
    """

    def __init__(self, func: Callable[..., Any], call: Callable[P, R], controls: Any) -> None:
        functools.update_wrapper(self, func)
        self._call = call
        self._controls = controls

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return _BoundCachedMethod(self, obj)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._call(*args, **kwargs)

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        return self._controls.key(*args, **kwargs)  # type: ignore[no-any-return]

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        return self._controls.invalidate(*args, **kwargs)

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        return self._controls.refresh(*args, **kwargs)


class _BoundCachedMethod:
    """A :class:`CachedMethod` bound to one instance (or class, for classmethods)."""

    __slots__ = ("_method", "_obj")

    def __init__(self, method: CachedMethod[Any, Any], obj: object) -> None:
        self._method = method
        self._obj = obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._method._call(self._obj, *args, **kwargs)

    def key(self, *args: Any, **kwargs: Any) -> str:
        return self._method.key(self._obj, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        return self._method.invalidate(self._obj, *args, **kwargs)

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        return self._method.refresh(self._obj, *args, **kwargs)
