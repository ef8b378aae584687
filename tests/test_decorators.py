"""@cache.cached: keys from bound arguments, signature kept, controls, methods."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from cachekit import MISSING, Cache
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
    assert get_user.key(7) == f"{__name__}.{get_user.__qualname__}:7,1"
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
    if cache.backend.key_policy is None:
        assert cache.backend_key("user:5") == f"{namespace}:user:5"


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

    def load(self, user_id: int) -> str:
        self.calls += 1
        return f"{self.name}:{user_id}"


def test_methods_leave_self_out_of_the_key_and_bind_their_controls() -> None:
    cache = Cache(MemoryBackend(), namespace="m")

    class Repo(Users):
        @cache.cached()
        def get(self, user_id: int) -> str:
            return self.load(user_id)

        @classmethod
        @cache.cached(key="kind:{kind}")
        def kind(cls, kind: str) -> str:
            return f"{cls.__name__}:{kind}"

    repo = Repo("a")
    assert repo.get(1) == repo.get(user_id=1) == "a:1"
    assert repo.calls == 1
    assert repo.get.key(1) == f"{__name__}.{Repo.get.__qualname__}:1"
    assert Repo("b").get(1) == "a:1"  # self is not part of the default key
    repo.get.invalidate(1)
    assert repo.get(1) == "a:1" and repo.calls == 2
    assert repo.get.refresh(1) == "a:1" and repo.calls == 3
    assert Repo.kind("x") == "Repo:x" and cache.get("kind:x") == "Repo:x"


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
