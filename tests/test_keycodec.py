"""Canonical key text: one text per typed value, in every process; templates that cannot collide."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import math
import os
import subprocess
import sys
import uuid
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachekit.exceptions import ConfigurationError, KeyEncodingError
from cachekit.keycodec import Template, encode, render

ROOT = Path(__file__).resolve().parent.parent

# Small pools, so that drawn values often coincide, plus edge characters of the grammar.
SCALARS = st.one_of(
    st.sampled_from(
        [None, True, False, 0, 1, -1, 7, 0.0, -0.0, 1.0, 7.0, math.nan, math.inf, -math.inf]
    ),
    st.sampled_from(["", "1", "7", "a", "a'b", "a\\", "'", "\\'", ",", ")", ":", "%31", "~"]),
    st.sampled_from([b"", b"1", b"'", b"\x00"]),
    st.integers(),
    st.floats(),
    st.text(max_size=4),
)
HASHABLE = st.recursive(
    SCALARS, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=6
)
VALUES = st.recursive(
    HASHABLE,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner)
        | st.dictionaries(HASHABLE, inner, max_size=3)
        | st.sets(HASHABLE, max_size=3)
    ),
    max_leaves=10,
)


def typed(value: Any) -> Any:
    """Equality that also compares types, component by component (1 is not 1.0)."""
    kind = type(value)
    if kind is float:
        return (kind, "nan" if math.isnan(value) else value + 0.0)
    if kind in (list, tuple):
        return (kind, tuple(map(typed, value)))
    if kind in (set, frozenset):
        return (kind, frozenset(map(typed, value)))
    if kind is dict:
        return (kind, frozenset((typed(k), typed(v)) for k, v in value.items()))
    return (kind, value)


def assert_one_to_one(pairs: list[tuple[Any, str]]) -> None:
    """Equal typed values map to one text, and one text to equal typed values."""
    texts: dict[str, set[Any]] = {}
    values: dict[Any, set[str]] = {}
    for value, text in pairs:
        texts.setdefault(text, set()).add(typed(value))
        values.setdefault(typed(value), set()).add(text)
    assert all(len(found) == 1 for found in texts.values()), texts
    assert all(len(found) == 1 for found in values.values()), values


@given(st.lists(VALUES, min_size=2, max_size=8))
def test_values_share_a_text_only_if_equal_and_of_one_type(values: list[Any]) -> None:
    assert_one_to_one([(value, encode(value)) for value in values])


@given(st.lists(VALUES, min_size=2, max_size=8))
def test_renderings_are_one_to_one_in_their_own_alphabet(values: list[Any]) -> None:
    rendered = [(value, render(value)) for value in values]
    assert_one_to_one(rendered)
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_%~")
    assert all(set(text) <= allowed for _, text in rendered)


@given(st.lists(st.tuples(VALUES, VALUES, VALUES), min_size=2, max_size=6))
def test_templates_render_one_key_per_argument_tuple(tuples: list[tuple[Any, Any, Any]]) -> None:
    for template in ("m:{a}:{b}", "{a}-{b}.", "x{a}x:x{b}x", "{a}/{b}/{c}"):
        compiled = Template(template, ("a", "b", "c"))
        used = [name for name in "abc" if "{" + name + "}" in template]
        keys = []
        for values in tuples:
            arguments = dict(zip("abc", values, strict=True))
            keys.append((tuple(arguments[name] for name in used), compiled.render(arguments)))
        assert_one_to_one(keys)


def test_the_documented_texts() -> None:
    assert [encode(v) for v in (7, -7, 7.0, -0.0, True, None, "7", "a'b", b"\x00\xff")] == [
        "7", "-7", "7.0", "0.0", "True", "None", "'7'", "'a\\'b'", "x'00ff'",
    ]  # fmt: skip
    assert encode({"b": 1, "a": (1, [2])}) == "{'a':(1,[2]),'b':1}"
    assert encode({3, 1, 2}) == "set(1,2,3)" and encode(frozenset()) == "frozenset()"
    assert [render(v) for v in (7, "7", "ada", "a:b", "", -7, 7.0, True, None)] == [
        "7", "%37", "ada", "a%3Ab", "", "~%2D7", "~7%2E0", "~True", "~None",
    ]  # fmt: skip


class Color(enum.Enum):
    RED = 1


class Point(NamedTuple):
    x: int
    y: int


class UserId(int):
    def __repr__(self) -> str:
        return "overridden, and not used"


@dataclasses.dataclass(frozen=True)
class Filter:
    status: str
    page: int = 1


class Account:
    def __init__(self, number: str) -> None:
        self.number = number

    def __cache_key__(self) -> str:
        return self.number


class Ledger(Account):
    pass


def test_other_types_are_tagged_with_their_class() -> None:
    paris = ZoneInfo("Europe/Paris")
    assert encode(decimal.Decimal("1.50")) == encode(decimal.Decimal("15E-1"))
    assert encode(decimal.Decimal("-0.00")) == encode(decimal.Decimal(0))
    assert encode(decimal.Decimal("1" * 40 + ".0")) != encode(decimal.Decimal("1" * 39 + "2"))
    assert encode(Color.RED) == "tests.test_keycodec.Color('RED')"
    assert encode(Point(1, 2)) == "tests.test_keycodec.Point((1,2))" != encode((1, 2))
    assert encode(UserId(7)) == "tests.test_keycodec.UserId(7)"
    assert encode(Filter("open")) == "tests.test_keycodec.Filter('open',1)"
    assert encode(Account("1")) == "tests.test_keycodec.Account('1')" != encode(Ledger("1"))
    assert encode(int) == "type('builtins.int')" and encode(Account) != encode(Ledger)
    assert encode(uuid.UUID(int=1)) == "uuid.UUID('00000000000000000000000000000001')"
    noon = datetime.datetime(2024, 1, 1, 12, tzinfo=paris)
    assert encode(noon) == "datetime.datetime('2024-01-01T12:00:00+01:00','Europe/Paris')"
    assert encode(noon) != encode(noon.astimezone(datetime.UTC))  # one instant, two zones
    assert encode(datetime.date(2024, 1, 1)) != encode(datetime.datetime(2024, 1, 1))
    assert encode(Counter("aab")) == "collections.Counter({'a':2,'b':1})"
    # numpy scalars are the Python numbers they equal; a longdouble has no such number.
    assert encode(numpy.int64(7)) == "7" and encode(numpy.float32(0.5)) == "0.5"
    assert encode(numpy.bool_(True)) == "True"
    with pytest.raises(KeyEncodingError, match="longdouble"):
        encode(numpy.longdouble(1))


class Slotted(list[int]):
    __slots__ = ("note",)


class WithState(str):
    pass


@pytest.mark.parametrize(
    "value",
    [object(), print, lambda: 1, OrderedDict(), defaultdict(int), Slotted([1]), iter([]), ...],
    ids=lambda value: type(value).__name__,
)
def test_values_without_a_stable_text_are_refused(value: Any) -> None:
    with pytest.raises(KeyEncodingError, match="no stable key encoding"):
        encode(value)
    with pytest.raises(TypeError):
        encode([value])


def test_subclass_state_and_self_references_are_refused() -> None:
    stateful = WithState("a")
    stateful.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(KeyEncodingError, match="WithState"):
        encode(stateful)
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(KeyEncodingError, match="containing itself"):
        encode(loop)


def test_long_ints_keep_their_decimal_text() -> None:
    number = 7**20_000  # about 17,000 digits, over the default str() limit of 4,300
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        expected = str(number)
    finally:
        sys.set_int_max_str_digits(limit)
    assert encode(number) == expected and encode(-number) == "-" + expected
    assert render(number) == expected


# -- templates -------------------------------------------------------------------------------


def test_template_values_are_encoded() -> None:
    member = Template("member:{org}:{user}", ("org", "user"))
    assert member.render({"org": "a", "user": "b:c"}) != member.render({"org": "a:b", "user": "c"})
    assert Template("product:{id}", ("id",)).render({"id": 7}) == "product:7"
    account = Template("acct:{a.number}:{ids[0]}", ("a", "ids"))
    assert account.render({"a": Account("x y"), "ids": [3]}) == "acct:x%20y:3"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("user:{id}", r"names 'id', which is not a parameter; the parameters are: user_id, v"),
        ("{user_id}{v}", "ambiguous"),
        ("{user_id}_{v}", "ambiguous"),
        ("{user_id}%~9{v}", "ambiguous"),
        ("u:{user_id:04d}", "format spec"),
        ("u:{user_id!r}", "conversion"),
        ("u:{}", "not a parameter"),
        ("u:{user_id", "key template"),
    ],
)
def test_bad_templates_are_refused_when_compiled(template: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Template(template, ("user_id", "v"))


# -- across processes ------------------------------------------------------------------------

CHILD = """
import sys
from cachekit.keycodec import encode
members = frozenset(f"member-{i}" for i in range(12))
weights = {f"w{i}": i for i in (range(12) if sys.argv[1] == "up" else reversed(range(12)))}
print(encode((members, set(members), weights)))
"""


def test_keys_are_the_same_under_every_hash_seed() -> None:
    texts = set()
    for seed, order in (("1", "up"), ("2", "down"), ("3", "up")):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        child = subprocess.run(
            [sys.executable, "-c", CHILD, order],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
            check=True,
        )
        texts.add(child.stdout)
    assert len(texts) == 1, texts


def test_unnamed_flag_values_have_a_key_of_their_own() -> None:
    import enum

    class Perm(enum.Flag):
        READ = 1
        WRITE = 2

    class Wide(enum.IntFlag, boundary=enum.KEEP):
        ONE = 1

    texts = {encode(Perm(0)), encode(Perm.READ), encode(Perm.READ | Perm.WRITE), encode(Wide(8))}
    assert len(texts) == 4
