"""@cache.cached: keys from bound arguments, signature kept, controls, methods."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar

import numpy
import pytest
import redis

from cachekit import MISSING, Cache, ConfigurationError, KeyEncodingError
from cachekit.backends.base import Backend
from cachekit.backends.memory import MemoryBackend
from tests.support import FailingBackend


@pytest.fixture
def cache(backend: Backend, namespace: str) -> Cache:
    return Cache(backend, namespace=namespace)


def test_positional_keyword_and_default_calls_share_one_entry(cache: Cache) -> None:
    calls: list[tuple[int, int]] = []

    @cache.cached(ttl=60)
    def get_user(user_id: int, version: int = 1) -> dict[str, int]:
        calls.append((user_id, version))
        return {"id": user_id, "version": version}

    assert get_user(7) == get_user(user_id=7) == get_user(7, 1) == get_user(version=1, user_id=7)
    assert calls == [(7, 1)]
    # A closure: what it captures at decoration (calls, still empty) is part of the key.
    line = get_user.__wrapped__.__code__.co_firstlineno  # a nested function: its line too
    assert get_user.key(7) == f"{__name__}.{get_user.__qualname__}@{line}{{'calls':[]}}:7,1"
    assert cache.get(get_user.key(user_id=7)) == {"id": 7, "version": 1}
    get_user(7, 2)
    assert calls == [(7, 1), (7, 2)]


def test_argument_types_are_part_of_the_key(cache: Cache) -> None:
    @cache.cached()
    def echo(value: Any) -> str:
        return type(value).__name__

    assert [echo(1), echo("1"), echo(1.0), echo(True)] == ["int", "str", "float", "bool"]


def test_signature_and_metadata_are_kept(cache: Cache) -> None:
    def original(a: int, *, b: str = "x") -> str:
        """Docs."""
        return f"{a}{b}"

    wrapped = cache.cached()(original)
    assert inspect.signature(wrapped) == inspect.signature(original)
    assert wrapped.__name__ == "original" and wrapped.__doc__ == "Docs."
    assert wrapped.__wrapped__ is original  # type: ignore[attr-defined]
    assert wrapped(1, b="y") == "1y"
    assert wrapped.key(1, b="y") == wrapped.key(a=1, b="y")


def test_variadic_functions_get_stable_keys(cache: Cache) -> None:
    @cache.cached()
    def total(*numbers: int, **weights: int) -> int:
        return sum(numbers) + sum(weights.values())

    assert total(1, 2, a=3, b=4) == 10
    assert total.key(1, 2, a=3, b=4) == total.key(1, 2, b=4, a=3)
    assert total.key(1, 2) != total.key(12)


def test_a_template_key_is_the_logical_key(cache: Cache, namespace: str) -> None:
    @cache.cached(key="user:{user_id}")
    def get_user(user_id: int, verbose: bool = False) -> dict[str, int]:
        return {"id": user_id}

    get_user(5)
    assert get_user.key(5) == "user:5"
    assert cache.get("user:5") == {"id": 5}
    assert get_user(user_id=5, verbose=True) == {"id": 5}
    if cache.backend.capabilities.key_policy is None:
        assert cache.backend_key("user:5") == f"{namespace}:user:5"


def test_template_values_are_encoded_so_argument_tuples_never_collide(cache: Cache) -> None:
    @cache.cached(key="member:{org}:{user}")
    def member(org: str, user: str) -> str:
        return f"{org}/{user}"

    assert member("a", "b:c") == "a/b:c"
    assert member("a:b", "c") == "a:b/c"  # was served "a/b:c": both rendered member:a:b:c
    assert member.key("a", "b:c") == "member:a:b%3Ac"
    assert member(org="a:b", user="c") == "a:b/c" and cache.stats().loads == 2


def test_bad_templates_fail_at_decoration(cache: Cache) -> None:
    def get_user(user_id: int, verbose: bool = False) -> int:
        return user_id

    with pytest.raises(ConfigurationError, match="the parameters are: user_id, verbose"):
        cache.cached(key="user:{id}")(get_user)
    with pytest.raises(ConfigurationError, match="ambiguous"):
        cache.cached(key="user:{user_id}{verbose}")(get_user)


def test_a_callable_key(cache: Cache) -> None:
    @cache.cached(key=lambda org, user: f"member:{org}/{user}")
    def member(org: str, user: int) -> str:
        return f"{org}/{user}"

    assert member("acme", 3) == "acme/3"
    assert cache.get("member:acme/3") == "acme/3"


def test_invalidate_and_refresh(cache: Cache) -> None:
    rows = {1: "old"}

    @cache.cached()
    def read(row_id: int) -> str:
        return rows[row_id]

    assert read(1) == "old"
    rows[1] = "new"
    assert read(1) == "old"  # cached
    read.invalidate(1)
    assert read(1) == "new"
    rows[1] = "newer"
    assert read.refresh(1) == "newer"
    assert read(1) == "newer"


def test_none_results_are_cached_and_exceptions_are_not(cache: Cache) -> None:
    calls: list[int] = []

    @cache.cached()
    def find(row_id: int) -> int | None:
        calls.append(row_id)
        if row_id < 0:
            raise KeyError(row_id)
        return None

    assert find(1) is None and find(1) is None
    assert calls == [1]
    for _ in range(2):
        with pytest.raises(KeyError):
            find(-1)
    assert calls == [1, -1, -1]


class Users:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    def __cache_key__(self) -> str:
        return self.name

    def load(self, user_id: int) -> str:
        self.calls += 1
        return f"{self.name}:{user_id}"


def test_methods_key_self_by_its_cache_key_and_bind_their_controls() -> None:
    cache = Cache(MemoryBackend(), namespace="m")

    class Repo(Users):
        @cache.cached()
        def get(self, user_id: int) -> str:
            return self.load(user_id)

    repo = Repo("a")
    assert repo.get(1) == repo.get(user_id=1) == "a:1"
    assert repo.calls == 1
    line = Repo.get.__wrapped__.__code__.co_firstlineno  # nested: the definition's line
    assert (
        repo.get.key(1)
        == f"{__name__}.{Repo.get.__qualname__}@{line}:{__name__}.{Repo.__qualname__}@{line}('a'),1"
    )
    assert Repo("a").get(1) == "a:1" and Repo("b").get(1) == "b:1"  # state, not identity
    repo.get.invalidate(1)
    assert repo.get(1) == "a:1" and repo.calls == 2
    assert repo.get.refresh(1) == "a:1" and repo.calls == 3
    assert Repo.get(repo, 1) == "a:1" and Repo.get.key(repo, 1) == repo.get.key(1)


def test_classmethods_key_the_class_they_are_called_on() -> None:
    cache = Cache(MemoryBackend(), namespace="m")

    class Base:
        @classmethod
        @cache.cached()
        def kind(cls, kind: str) -> str:
            return f"{cls.__name__}:{kind}"

    class Sub(Base):
        pass

    assert Base.kind("x") == "Base:x"
    assert Sub.kind("x") == "Sub:x"  # never the base class's entry
    assert Sub().kind("x") == "Sub:x"
    Sub.kind.invalidate("x")
    assert cache.get(Base.kind.key("x")) == "Base:x"
    assert cache.get(Sub.kind.key("x")) is MISSING


def test_instances_with_different_state_never_share_entries(cache: Cache) -> None:
    """Two price services, EUR and USD: each instance's __cache_key__ is in the key."""

    class Prices:
        def __init__(self, currency: str) -> None:
            self.currency = currency

        def __cache_key__(self) -> str:
            return self.currency

        @cache.cached()
        def price(self, item: int) -> str:
            return f"{item * 10} {self.currency}"

    assert Prices("EUR").price(1) == "10 EUR"
    assert Prices("USD").price(1) == "10 USD"
    Prices("EUR").price.invalidate(1)
    assert cache.get(Prices("USD").price.key(1)) == "10 USD"


def test_a_method_of_a_class_without_cache_key_says_how_to_fix_it() -> None:
    cache = Cache(MemoryBackend(), namespace="m")

    class Service:
        @cache.cached()
        def get(self, item: int) -> int:
            return item

    class Stateless(Service):
        def __cache_key__(self) -> None:
            return None  # the documented opt-out: every instance shares entries

    with pytest.raises(KeyEncodingError, match=r"argument 'self'.*__cache_key__.*constant"):
        Service().get(1)
    assert Stateless().get(1) == 1 and Stateless().get.key(1) == Stateless().get.key(1)


class Opaque:
    """Default repr: its address, which CPython reuses once an instance is freed."""

    def __init__(self, n: int) -> None:
        self.n = n


class Keyed(Opaque):
    def __cache_key__(self) -> int:
        return self.n


def test_an_argument_without_a_stable_encoding_is_refused_naming_it(cache: Cache) -> None:
    @cache.cached()
    def describe(label: str, thing: object) -> str:
        return f"{label}{thing}"

    for bad in (Opaque(1), print, lambda: 1, threading.Lock(), [Opaque(1)]):
        with pytest.raises(KeyEncodingError, match=r"describe\(\): argument 'thing'.*key="):
            describe("x", bad)
        with pytest.raises(TypeError, match="__cache_key__"):
            describe.key("x", thing=bad)
    assert cache.stats().loads == 0


def test_new_objects_never_get_an_old_objects_entry(cache: Cache) -> None:
    @cache.cached()
    def double(box: Keyed) -> int:
        return box.n * 2

    # Each Keyed is freed after its call; with repr keys, 196 of 200 calls returned
    # the result of an earlier object that had the same address.
    assert [double(Keyed(i)) for i in range(200)] == [i * 2 for i in range(200)]
    assert double(Keyed(5)) == 10 and cache.stats().loads == 200


def make_scaler(cache: Cache, factor: int) -> Callable[[int], int]:
    @cache.cached()
    def scale(x: int) -> int:
        return x * factor

    return scale


def test_closures_from_one_factory_never_share_entries(cache: Cache) -> None:
    double, triple = make_scaler(cache, 2), make_scaler(cache, 3)
    assert double(5) == 10
    assert triple(5) == 15
    assert make_scaler(cache, 3)(5) == 15 and cache.stats().loads == 2  # same capture: shared


def test_a_closure_over_a_value_without_encoding_needs_a_key(cache: Cache) -> None:
    service = Opaque(1)
    with pytest.raises(KeyEncodingError, match=r"'service'.*key="):

        @cache.cached()
        def read(x: int) -> int:
            return x + service.n

    @cache.cached(key="read:{x}")
    def read_keyed(x: int) -> int:
        return x + service.n

    assert read_keyed(1) == 2
    with pytest.raises(KeyEncodingError, match="lambda"):
        cache.cached()(lambda x: x)


def test_keys_are_canonical_and_typed(cache: Cache) -> None:
    @cache.cached()
    def user(user_id: Any) -> str:
        return repr(user_id)

    user({"b": 2, "a": 1})
    user.invalidate({"a": 1, "b": 2})  # the same dict, in another order
    assert cache.get(user.key({"b": 2, "a": 1})) is MISSING
    assert len({user.key(v) for v in (7, 7.0, True, "7", (7,), [7])}) == 6
    # numpy scalars are keyed as the Python number they equal; 7.0 is not 7 (documented).
    assert user(numpy.int64(7)) == "np.int64(7)"
    user(7.0)
    user.invalidate(7)
    assert cache.get(user.key(numpy.int64(7))) is MISSING
    assert cache.get(user.key(7.0)) == "7.0"


def test_the_inlined_hit_path_builds_the_canonical_key(cache: Cache) -> None:
    calls: list[object] = []

    @cache.cached()
    def number(value: Any) -> int:
        calls.append(value)
        if value == 7.5:  # a float: the call goes through the generic path
            raise ValueError("the function's own error")
        return len(calls)

    values = [7, -7, 10**5000, "it's", "back\\slash", "", 7.0, (7,)]
    for n, value in enumerate(values, start=1):
        assert number(value) == n and number(value) == n
        assert cache.get(number.key(value)) == n  # the key the fast path stored under
    assert len(calls) == len(values)
    with pytest.raises(ValueError, match="own error"):
        number(7.5)
    assert len(calls) == len(values) + 1  # called once, not again by the key's fallback


def test_async_and_generator_functions_are_refused_at_decoration() -> None:
    cache = Cache(MemoryBackend(), namespace="m")

    async def fetch(x: int) -> int:
        return x

    def rows(n: int) -> Iterator[int]:
        yield from range(n)

    async def stream(n: int) -> AsyncIterator[int]:
        yield n

    for func, word in ((fetch, "async"), (rows, "a generator"), (stream, "a generator")):
        with pytest.raises(TypeError, match=f"{func.__name__}: it is {word}"):
            cache.cached()(func)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"use cachekit\.AsyncCache for async functions"):
        cache.cached()(fetch)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"put @classmethod above @cache\.cached\(\)"):
        cache.cached()(classmethod(lambda cls: 1))  # type: ignore[arg-type]


def test_the_decorator_works_without_parentheses() -> None:
    cache = Cache(MemoryBackend(), namespace="m")

    @cache.cached
    def square(x: int) -> int:
        return x * x

    assert square(3) == square(3) == 9
    assert cache.stats().loads == 1 and cache.get(square.key(3)) == 9


def test_a_failing_cache_never_breaks_the_call() -> None:
    cache = Cache(FailingBackend(MemoryBackend()), namespace="f")

    @cache.cached()
    def double(x: int) -> int:
        return 2 * x

    @cache.cached(key="k:{x}")
    def triple(x: int) -> int:
        return 3 * x

    assert double(2) == 4 and double(x=2) == 4 and triple(2) == 6
    assert cache.stats().errors == 6  # each call: a failed read and a failed fill
    assert cache.get(double.key(2)) is MISSING


# A worker process: a module-level cached function of a frozenset and a dict, whose dict
# it builds in the order given; prints how many loads it ran and the key.
WORKER = """
import sys
from cachekit import Cache
from cachekit.backends.redis import RedisBackend

url, namespace, action, order = sys.argv[1:]
cache = Cache(RedisBackend.from_url(url), namespace=namespace)
loads = 0


def members_of(group: frozenset, weights: dict) -> list:
    global loads
    loads += 1
    return sorted(group)


cached = cache.cached()(members_of)
group = frozenset(f"member-{i}" for i in range(12))
weights = {f"w{i}": i for i in (range(12) if order == "up" else reversed(range(12)))}
if action == "invalidate":
    cached.invalidate(group, weights)
else:
    cached(group, weights)
print(loads, cached.key(group, weights))
"""


@pytest.mark.redis
def test_processes_with_different_hash_seeds_share_entries(
    redis_server: str, redis_client: redis.Redis, namespace: str
) -> None:
    """A set's iteration order, and so its repr, depends on PYTHONHASHSEED: keys must not."""

    def worker(seed: str, action: str, order: str) -> tuple[int, str]:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        argv = [sys.executable, "-c", WORKER, redis_server, namespace, action, order]
        done = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        loads, key = done.stdout.split(" ", 1)
        return int(loads), key

    try:
        loads, key = worker("1", "call", "up")
        assert loads == 1
        assert worker("2", "call", "down") == (0, key), "a hit on the entry the first one filled"
        assert worker("3", "invalidate", "up") == (0, key)
        assert worker("4", "call", "down") == (1, key), "the invalidation reached that entry"
    finally:
        forget(redis_client, namespace)


def forget(client: redis.Redis, namespace: str) -> None:
    """Delete what a test left on the shared Redis."""
    keys = list(client.scan_iter(match=namespace + ":*"))
    if keys:
        client.delete(*keys)


def test_namesakes_a_factory_defines_never_share_entries(cache: Cache) -> None:
    """Functions and classes made under one name in one function, no closure involved."""

    def make(kind: str) -> Any:
        if kind == "double":

            @cache.cached()
            def apply(x: int) -> int:
                return x * 2

        else:

            @cache.cached()
            def apply(x: int) -> int:
                return x * 3

        return apply

    double, triple = make("double"), make("triple")
    assert double(5) == 10 and triple(5) == 15

    def unit(name: str) -> type:
        @dataclasses.dataclass(frozen=True)
        class Length:
            value: int
            unit: ClassVar[str] = name

        return Length

    metres, feet = unit("m"), unit("ft")

    @cache.cached()
    def show(length: Any) -> str:
        return f"{length.value}{length.unit}"

    assert show(metres(1)) == "1m" and show(feet(1)) == "1ft"
