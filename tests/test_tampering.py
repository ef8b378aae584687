"""Tampered entries, written raw under a key's backend key, read through the facade.

The cache signs with ``PickleSerializer(secret=...)``. Whatever an attacker (or a
faulty network) leaves in the server, bit flips, truncations, another key's or another
namespace's valid entry, an unsigned pickle, a downgraded digest, an empty value, an
annotated entry cut short, must read as a miss that is counted
(``stats().decode_errors``) and deleted, and must never be unpickled: each forged
payload carries a pickle that records it ran.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cachekit import MISSING, Cache
from cachekit.backends.base import Backend
from cachekit.entries import ENTRY_BYTE
from cachekit.keys import encode_key
from cachekit.serializers import PickleSerializer

SECRET = b"a tamper-suite secret, 32 bytes."
HEADER = b"ckp1:sha256:"
MAC = 32
# fresh_until, delta, length of the tags blob: the annotated entry's header after 0x01.
ANNOTATED = struct.Struct("!ddI")

#: What the forged pickles did when (if ever) they were unpickled.
DETONATED: list[str] = []


def detonate(label: str) -> str:
    DETONATED.append(label)
    return label


class Bomb:
    """Unpickling it calls :func:`detonate`: the side effect that must never happen."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return detonate, (self.label,)


@pytest.fixture(autouse=True)
def no_detonations() -> Iterator[None]:
    DETONATED.clear()
    yield
    assert DETONATED == [], f"a tampered pickle ran: {DETONATED}"


@pytest.fixture
def cache(backend: Backend, namespace: str) -> Cache:
    if backend.capabilities.stores_objects:
        pytest.skip("the memory backend stores objects: nothing is serialized to tamper with")
    return Cache(backend, namespace=namespace, serializer=PickleSerializer(secret=SECRET))


def signed(key: str, payload: bytes, secret: bytes = SECRET, digest: str = "sha256") -> bytes:
    """An envelope as PickleSerializer builds it, with any secret and digest."""
    header = f"ckp1:{digest}:".encode()
    key_bytes = encode_key(key)
    mac = hmac.new(secret, header, digest)
    mac.update(len(key_bytes).to_bytes(4, "big") + key_bytes + payload)
    return header + mac.digest() + payload


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 1 << bit
    return bytes(changed)


def entry_of(cache: Cache, key: str, value: Any, **options: Any) -> bytes:
    """What the cache itself stores for ``value`` under ``key``."""
    cache.set(key, value, **options)
    raw = cache.backend.get(cache.backend_key(key))
    assert isinstance(raw, bytes)
    return raw


# Tags nested past any recursion limit: json.loads raises RecursionError on them.
DEEP = b"[" * 100_000 + b"]" * 100_000


def bomb_payload(label: str) -> bytes:
    return pickle.dumps(Bomb(label))


# Each case builds the tampered bytes for ``key`` from the cache and its valid entry.
Forge = Callable[[Cache, str, bytes], bytes]

CASES: dict[str, Forge] = {
    "header bit flip": lambda c, k, e: flip(e, 0),
    "digest name bit flip": lambda c, k, e: flip(e, len("ckp1:s")),
    "mac bit flip": lambda c, k, e: flip(e, len(HEADER) + 7, 3),
    "payload bit flip": lambda c, k, e: flip(e, len(e) - 2, 5),
    "truncated to 1 byte": lambda c, k, e: e[:1],
    "truncated in the header": lambda c, k, e: e[: len(HEADER) - 1],
    "header only": lambda c, k, e: e[: len(HEADER)],
    "truncated in the mac": lambda c, k, e: e[: len(HEADER) + MAC // 2],
    "mac, no payload": lambda c, k, e: e[: len(HEADER) + MAC],
    "last byte cut": lambda c, k, e: e[:-1],
    "byte appended": lambda c, k, e: e + b".",
    "another key's valid entry": lambda c, k, e: entry_of(c, k + "-other", Bomb("other key")),
    "another namespace's entry": lambda c, k, e: entry_of(
        Cache(c.backend, namespace=c.namespace + "x", serializer=c.serializer),
        k,
        Bomb("other namespace"),
    ),
    "unsigned pickle": lambda c, k, e: bomb_payload("unsigned"),
    "header, no mac, pickle": lambda c, k, e: HEADER + bomb_payload("macless"),
    "digest downgraded to sha1": lambda c, k, e: b"ckp1:sha1:" + e[len(HEADER) :],
    "validly signed md5 envelope": lambda c, k, e: signed(
        c.backend_key(k), bomb_payload("md5"), digest="md5"
    ),
    "signed with another secret": lambda c, k, e: signed(
        c.backend_key(k), bomb_payload("other secret"), secret=b"not the secret at all!"
    ),
    "empty value": lambda c, k, e: b"",
    "json instead of pickle": lambda c, k, e: b'{"v": 1}',
    "annotated: entry byte only": lambda c, k, e: ENTRY_BYTE,
    "annotated: header cut short": lambda c, k, e: ENTRY_BYTE + ANNOTATED.pack(0.0, 0.0, 0)[:9],
    "annotated: tags length past the end": lambda c, k, e: (
        ENTRY_BYTE + ANNOTATED.pack(1e18, 0.0, 1 << 30) + b"[]"
    ),
    "annotated: bad tags": lambda c, k, e: ENTRY_BYTE + ANNOTATED.pack(1e18, 0.0, 3) + b"]]]" + e,
    "annotated: unsigned pickle inside": lambda c, k, e: (
        ENTRY_BYTE + ANNOTATED.pack(1e18, 0.0, 0) + bomb_payload("annotated")
    ),
    "annotated: valid entry truncated": lambda c, k, e: entry_of(c, k, "v", tags=["t"])[:-3],
    "annotated: deeply nested tags": lambda c, k, e: (
        ENTRY_BYTE + ANNOTATED.pack(1e18, 0.0, len(DEEP)) + DEEP + e
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_tampered_entry_is_a_counted_deleted_miss(cache: Cache, case: str) -> None:
    key = "victim"
    bkey = cache.backend_key(key)
    valid = entry_of(cache, key, {"v": 1})
    forged = CASES[case](cache, key, valid)
    assert forged != valid
    raw = cache.backend

    for read in ("get", "get_many", "get_or_load"):
        raw.set(bkey, forged, 60)
        before = cache.stats().decode_errors
        if read == "get":
            assert cache.get(key) is MISSING
        elif read == "get_many":
            assert cache.get_many([key]) == {}
        else:
            assert cache.get_or_load(key, lambda: "reloaded") == "reloaded"
        assert cache.stats().decode_errors == before + 1, read
        if read == "get_or_load":  # replaced by a fresh, valid entry
            assert cache.get(key) == "reloaded"
            cache.delete(key)
        else:
            assert raw.get(bkey) is MISSING, f"{read} left the tampered entry in place"


def test_every_single_bit_flip_of_a_signed_entry_is_a_miss(cache: Cache) -> None:
    key = "victim"
    bkey = cache.backend_key(key)
    valid = entry_of(cache, key, Bomb("flipped"))  # a valid read would detonate
    cache.delete(key)
    flips = [flip(valid, index, bit) for index in range(len(valid)) for bit in range(8)]
    served = []
    for forged in flips:
        cache.backend.set(bkey, forged, 60)
        if cache.get(key) is not MISSING:
            served.append(forged)
    stats = cache.stats()
    print(f"\n{len(flips)} single-bit flips of a {len(valid)}-byte entry: served={len(served)}")
    assert served == []
    assert stats.decode_errors == len(flips)
    assert cache.backend.get(bkey) is MISSING


def test_every_bit_flip_of_an_annotated_header_is_a_miss(cache: Cache) -> None:
    key = "victim"
    valid = entry_of(cache, key, {"v": 1}, tags=["t"])
    served = 0
    for index in range(1, 1 + ANNOTATED.size):
        for bit in range(8):
            cache.backend.set(cache.backend_key(key), flip(valid, index, bit), 60)
            served += cache.get(key) is not MISSING
    assert served == 0


def test_a_valid_entry_still_reads(cache: Cache) -> None:
    """The control: the same paths accept what the cache itself wrote, and the forger
    above builds exactly the cache's envelope when given the right secret."""
    cache.set("k", {"v": 1})
    cache.set("t", {"v": 2}, tags=["t"])
    assert cache.get("k") == {"v": 1}
    assert cache.get_many(["k", "t"]) == {"k": {"v": 1}, "t": {"v": 2}}
    payload = pickle.dumps({"v": 1}, protocol=pickle.HIGHEST_PROTOCOL)
    assert cache.backend.get(cache.backend_key("k")) == signed(cache.backend_key("k"), payload)
    assert cache.stats().decode_errors == 0


def test_a_plain_entry_never_verifies_as_an_annotated_entry_of_another_key(
    cache: Cache,
) -> None:
    """A key may hold NUL, and the MAC of an annotated entry's payload covers its key and
    a digest of its header: that input must not be one a plain entry's MAC can have.

    The forger picks a header (fresh for ages, no tags) and lets the application store
    any value under the key ``victim + NUL + sha256(header)``; then copies that signed
    entry, behind the chosen header, to the victim's key."""
    if cache.backend.capabilities.key_policy is not None:
        pytest.skip("keys with NUL are hashed here, so the forger cannot pick the key")
    header = ENTRY_BYTE + ANNOTATED.pack(1e18, 0.0, 0)
    donor = "victim\x00" + hashlib.sha256(header).hexdigest()
    assert cache.backend_key(donor) == cache.backend_key("victim") + donor[len("victim") :]
    signed_entry = entry_of(cache, donor, "the donor's value")
    cache.backend.set(cache.backend_key("victim"), header + signed_entry, 60)
    assert cache.get("victim") is MISSING
    assert cache.stats().decode_errors == 1
    assert cache.get(donor) == "the donor's value"  # the donor's own entry still reads
