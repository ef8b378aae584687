"""Key building: namespacing, and collision-free hashing for restrictive backends."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachekit.backends.base import KeyPolicy
from cachekit.exceptions import ConfigurationError
from cachekit.keys import HASH_MARK, encode_key, make_backend_key, validate_namespace

MEMCACHED = KeyPolicy(max_bytes=250)


@pytest.mark.parametrize("namespace", ["", "a b", "a:b", "x" * 65, "é"])
def test_bad_namespaces_are_refused(namespace: str) -> None:
    with pytest.raises(ConfigurationError, match="namespace"):
        validate_namespace(namespace)


def test_keys_pass_through_without_a_policy() -> None:
    key = "any key\x00\n é " + "x" * 1000
    assert make_backend_key("ns:", key, None) == "ns:" + key


def test_non_string_keys_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="str"):
        make_backend_key("ns:", 7, None)  # type: ignore[arg-type]


def test_safe_keys_are_kept_readable() -> None:
    assert make_backend_key("ns:", "user:7", MEMCACHED) == "ns:user:7"


@pytest.mark.parametrize(
    "key", ["has space", "tab\there", "ctl\x01", "é", "x" * 248, "#user:7", "\ud800"]
)
def test_unsafe_keys_are_hashed(key: str) -> None:
    result = make_backend_key("ns:", key, MEMCACHED)
    assert result.startswith("ns:" + HASH_MARK)
    assert len(encode_key(result)) <= 250
    assert result.isascii() and " " not in result


@given(st.text(max_size=300), st.text(max_size=300))
def test_distinct_keys_never_share_a_backend_key(a: str, b: str) -> None:
    if a != b:
        assert make_backend_key("ns:", a, MEMCACHED) != make_backend_key("ns:", b, MEMCACHED)


def test_a_raw_key_cannot_collide_with_a_hashed_one() -> None:
    hashed = make_backend_key("ns:", "a b", MEMCACHED)
    forged = hashed.removeprefix("ns:")
    assert make_backend_key("ns:", forged, MEMCACHED) != hashed
