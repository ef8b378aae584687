"""Serializers: JSON round-trips the common types; pickle only when signed and verified."""

from __future__ import annotations

import datetime as dt
import math
import pickle
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachekit.exceptions import ConfigurationError, DecodeError, SerializationError
from cachekit.serializers import JsonSerializer, PickleSerializer

JSON = JsonSerializer()
SECRET = b"s" * 32

SAMPLES: list[Any] = [
    None,
    0,
    "",
    False,
    [],
    {},
    {"a": [1, 2.5, "x", None, True]},
    (1, (2, 3), [4]),
    dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    dt.datetime(2024, 5, 6, 7, 8, 9),
    dt.date(2024, 5, 6),
    dt.time(7, 8, 9),
    dt.timedelta(days=1, seconds=2, microseconds=3),
    Decimal("12.3400"),
    uuid.UUID(int=7),
    b"\x00\xffbytes",
    {1: "int key", (1, 2): "tuple key"},
    {"__ck__": "user data that looks like a tag", "v": 1},
    {"a", "b"},
    frozenset({1}),
    2**70,
    -(2**70),
    10**5000,  # past the 4,300 digits int() and str() refuse in decimal
    -(10**5000) + 1,
    float("inf"),
    "lone \ud800 surrogate",
]


def sample_id(value: Any) -> str:
    """repr() of the value; an int past repr's 4,300 digits by its size."""
    if type(value) is int and value.bit_length() > 1000:
        return f"int of {value.bit_length()} bits"
    return repr(value)


@pytest.mark.parametrize("value", SAMPLES, ids=sample_id)
def test_json_round_trips_the_common_types(value: Any) -> None:
    data = JSON.dumps(value, "k")
    assert data[:1] != b"\x00"  # the marker byte is reserved for cachekit itself
    result = JSON.loads(data, "k")
    assert result == value and type(result) is type(value)


def test_json_reads_big_ints_in_decimal_as_earlier_versions_wrote_them() -> None:
    assert JSON.loads(b' {"__ck__":"int","v":"-123456789012345678901234567890"}', "k") == (
        -123456789012345678901234567890
    )


def test_json_nan_round_trips() -> None:
    result = JSON.loads(JSON.dumps(float("nan"), "k"), "k")
    assert math.isnan(result)


def test_plain_json_is_plain() -> None:
    assert JSON.dumps({"a": [1, "b"]}, "k") == b'{"a":[1,"b"]}'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children) | st.dictionaries(st.text(), children) | st.tuples(children, children)
    ),
    max_leaves=20,
)


@given(json_values)
def test_json_round_trips_nested_values(value: Any) -> None:
    assert JSON.loads(JSON.dumps(value, "k"), "k") == value


def test_json_refuses_unknown_types_with_a_type_error() -> None:
    with pytest.raises(SerializationError, match="PickleSerializer") as info:
        JSON.dumps(object(), "k")
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b' {"__ck__": "nope", "v": 1}'])
def test_json_garbage_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        JSON.loads(data, "k")


def test_pickle_round_trips_with_its_key() -> None:
    serializer = PickleSerializer(secret=SECRET)
    value = {"when": dt.datetime(2024, 1, 1), "obj": Decimal(1)}
    assert serializer.loads(serializer.dumps(value, "ns:k"), "ns:k") == value


def test_pickle_needs_a_real_secret() -> None:
    with pytest.raises(ConfigurationError, match="16"):
        PickleSerializer(secret=b"short")


class Boom:
    """Unpickling this runs code: it must never happen for an unverified entry."""

    ran = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (Boom.explode, ())

    @staticmethod
    def explode() -> None:
        Boom.ran = True


def _tampered(data: bytes) -> list[bytes]:
    flipped = bytearray(data)
    flipped[-1] ^= 1
    return [
        bytes(flipped),
        data[:-3],
        b"",
        pickle.dumps(Boom()),  # an unsigned pickle
        data.replace(b"sha256", b"md5\x00\x00\x00", 1),  # a downgraded digest name
    ]


def test_pickle_rejects_tampering_without_running_code() -> None:
    serializer = PickleSerializer(secret=SECRET)
    good = serializer.dumps(Boom(), "ns:k")
    Boom.ran = False
    for data in _tampered(good):
        with pytest.raises(DecodeError):
            serializer.loads(data, "ns:k")
    with pytest.raises(DecodeError):
        serializer.loads(good, "ns:other")  # another key's valid entry, replayed
    with pytest.raises(DecodeError):
        serializer.loads(good, "other:k")  # another namespace's entry
    with pytest.raises(DecodeError):
        PickleSerializer(secret=b"t" * 32).loads(good, "ns:k")
    assert not Boom.ran
