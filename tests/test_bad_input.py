"""Bad input through the facade, on every backend: keys, falsy values, values that cannot
be stored (too large, unserializable).

The key suite is the collision hunt: thousands of keys built to hit every edge of key
handling (every byte value, Unicode normal forms, lengths on both sides of memcached's
250-byte limit after the namespace, forged hash-like keys), then hypothesis. Each key's
value is the key itself, so a key that ever read another key's entry shows at once.
"""

from __future__ import annotations

import hashlib
import random
import unicodedata
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachekit import MISSING, Cache, ValueTooLarge
from cachekit.backends.base import Backend
from cachekit.exceptions import SerializationError
from cachekit.keys import HASH_MARK, encode_key

FORMS = ("NFC", "NFD", "NFKC", "NFKD")
# Each differs from some of its other normal forms: composed and decomposed accents,
# ligatures, compatibility digits, Hangul syllables, a dotted long s with a dot below.
NORMALIZABLE = [
    "é", "Å", "ﬁ", "①", "한국어", "Ǆ", "ẛ̣", "ḱṷṓn", "x\u0301", "Ω", "ｶﾞ", "¼", "™",
]  # fmt: skip
KEY_COUNT = 5_000
LIMIT = 250  # memcached's key limit, in bytes


@pytest.fixture
def cache(backend: Backend, namespace: str) -> Iterator[Cache]:
    built = Cache(backend, namespace=namespace)
    yield built


def edge_keys(namespace: str) -> list[str]:
    """Keys at every edge the key builder has, then seeded random ones, to KEY_COUNT."""
    keys: list[str] = ["", " ", "#", "##", ":", "::", "a:b", "\x00", "\r\n", "\ud800", "\udfff"]
    for byte in range(256):
        char = chr(byte)
        keys += [char, f"user:{char}:7", char * 3, f"{char}end", f"start{char}"]
    keys += [bytes(range(lo, lo + 16)).decode("latin-1") for lo in range(0, 256, 16)]
    for text in NORMALIZABLE:
        keys += [unicodedata.normalize(form, text) for form in FORMS]
        keys += [unicodedata.normalize(form, "key:" + text) for form in FORMS]
    room = LIMIT - len(namespace) - 1  # bytes left after "namespace:"
    for n in range(room - 4, room + 5):
        keys += ["a" * n, "#" + "a" * (n - 1), "é" * (n // 2), "a" * (n - 1) + "é"]
        keys += ["a" * (n - 3) + "\U0001f600", "a" * (n - 1) + " "]
    for other in ("user:7", "a b", ""):  # forged keys that look like hashed ones
        keys.append(HASH_MARK + hashlib.sha256(encode_key(other)).hexdigest())
    keys += ["x" * 1000, "é" * 1000]
    rng = random.Random(20240611)
    alphabet = [chr(c) for c in range(0x250)] + ["\ud800", "\U0001f600", "\u200b", "\ufeff"]
    while len(set(keys)) < KEY_COUNT:
        keys.append("".join(rng.choices(alphabet, k=rng.choice((1, 2, 8, 40, 240, 260, 600)))))
    return list(dict.fromkeys(keys))[:KEY_COUNT]


def test_no_key_ever_reads_another_keys_value(cache: Cache, namespace: str) -> None:
    keys = edge_keys(namespace)
    assert len(keys) == KEY_COUNT
    assert {len(encode_key(namespace + ":" + k)) for k in keys} >= {LIMIT - 1, LIMIT, LIMIT + 1}
    bkeys = {cache.backend_key(key) for key in keys}
    assert len(bkeys) == KEY_COUNT  # distinct keys, distinct backend keys
    if cache.backend.capabilities.key_policy is not None:
        limit = cache.backend.capabilities.key_policy.max_bytes
        assert all(len(encode_key(bkey)) <= limit and bkey.isprintable() for bkey in bkeys)
        assert all(" " not in bkey for bkey in bkeys)

    cache.set_many({key: key for key in keys}, ttl=60)
    assert cache.get_many(keys) == {key: key for key in keys}
    wrong = [key for key in keys if cache.get(key) != key]
    assert wrong == []
    cache.delete_many(keys[::2])
    assert cache.get_many(keys) == {key: key for key in keys[1::2]}


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.text(st.characters(exclude_categories=()), max_size=300),
        min_size=1,
        max_size=20,
    )
)
def test_fuzzed_keys_and_their_normal_forms_stay_apart(cache: Cache, texts: list[str]) -> None:
    keys = list(dict.fromkeys(unicodedata.normalize(f, t) for t in texts for f in FORMS))
    keys += [t for t in texts if t not in keys]
    for key in keys:  # one by one, so no batch can hide a collision
        cache.set(key, key)
    assert all(cache.get(key) == key for key in keys)
    assert cache.get_many(keys) == {key: key for key in keys}


# -- falsy values are hits ----------------------------------------------------------------

FALSY: list[Any] = [0, 0.0, "", False, [], {}, None, b"", (), set(), frozenset()]
FALSY_IDS = [repr(value) for value in FALSY]


@pytest.mark.parametrize("value", FALSY, ids=FALSY_IDS)
def test_falsy_values_are_hits_never_misses(cache: Cache, value: Any) -> None:
    cache.set("k", value)
    found = cache.get("k", default="default")
    assert found == value and type(found) is type(value)
    assert cache.get_many(["k"]) == {"k": value}
    assert cache.get_or_load("k", lambda: pytest.fail("a falsy hit called the loader")) == value
    calls: list[int] = []

    @cache.cached(key="f:{x}")
    def falsy(x: int) -> Any:
        calls.append(x)
        return value

    assert falsy(1) == value and falsy(1) == value
    assert calls == [1]
    view = cache.read_through("v", load=lambda i: value)
    assert view.get(1) == value
    if value is not None:  # a view's None is "no such row": get_many leaves it out
        assert view.get_many([1, 2]) == {1: value, 2: value}
    assert cache.stats().hits >= 4


# -- values that cannot be stored -----------------------------------------------------------


def byte_backend(cache: Cache) -> None:
    if cache.backend.capabilities.stores_objects:
        pytest.skip("the memory backend stores objects: no serializer, no item size")


def test_unserializable_values_raise_a_clear_type_error_on_set(cache: Cache) -> None:
    byte_backend(cache)
    for value in (object(), lambda: 1, (x for x in ()), {"nested": [1, object()]}):
        with pytest.raises(TypeError, match=r"cannot encode .*PickleSerializer"):
            cache.set("k", value)
        with pytest.raises(TypeError):
            cache.set_many({"ok": 1, "k": value})
    assert cache.get("ok") is MISSING  # a batch that cannot be encoded stores nothing


def test_an_unserializable_replacement_does_not_leave_the_old_value(cache: Cache) -> None:
    byte_backend(cache)
    cache.set("k", "old")
    with pytest.raises(SerializationError):
        cache.set("k", object())
    assert cache.get("k") is MISSING


def test_an_unserializable_result_leaves_a_decorated_call_working(cache: Cache) -> None:
    byte_backend(cache)
    calls: list[int] = []

    @cache.cached(lease_ttl=30)
    def unstorable(x: int) -> object:
        calls.append(x)
        return object()

    results = [unstorable(1) for _ in range(3)]
    assert all(type(result) is object for result in results)
    assert calls == [1, 1, 1]  # never cached, and every call returned
    stats = cache.stats()
    assert stats.lease_waits == 0  # the lease was released, nobody waited it out
    assert stats.serialization_errors == 3  # counted, not hidden
    assert stats.errors == 0  # and not as server errors: the server never failed
    assert cache.get_or_load("k", object) is not MISSING


def test_a_self_referential_value_is_a_serialization_error(cache: Cache) -> None:
    byte_backend(cache)
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(TypeError):
        cache.set("k", loop)

    @cache.cached(key="circular:{x}", lease_ttl=30)  # a closure over loop: no default key
    def circular(x: int) -> list[Any]:
        return loop

    assert circular(1) is loop


def test_oversize_values_on_a_real_server_are_refused_counted_and_never_clobber(
    cache: Cache, namespace: str
) -> None:
    byte_backend(cache)
    limit = cache.max_value_size or 1024 * 1024 - 512
    cache.max_value_size = limit  # Redis has no item limit of its own: use memcached's
    room = LIMIT - len(namespace) - 1
    key = "k" * room  # the longest key memcached stores unhashed: the tightest fit
    assert len(cache.backend_key(key)) == LIMIT
    largest = "x" * (limit - 2)  # JSON adds two quotes: exactly ``limit`` bytes
    cache.set(key, largest)
    assert cache.get(key) == largest  # the boundary value fits on the server
    with pytest.raises(ValueTooLarge):
        cache.set(key, largest + "x")
    assert cache.get(key) is MISSING  # not the old value: the caller meant to replace it

    @cache.cached()
    def big(n: int) -> str:
        return "y" * n

    assert big(limit) == "y" * limit  # the call works; the value is not cached
    assert cache.get(big.key(limit)) is MISSING
    assert cache.stats().oversize == 2


def test_an_oversize_item_in_set_many_does_not_leave_the_old_value(cache: Cache) -> None:
    byte_backend(cache)
    cache.max_value_size = 1000
    cache.set("k", "old")
    with pytest.raises(ValueTooLarge):
        cache.set_many({"k": "x" * 2000, "j": "small"})
    assert cache.get("k") is MISSING
