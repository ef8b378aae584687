"""memcached's protocol as bytes and replies, without a server: requests, parsing, errors."""

from __future__ import annotations

from typing import Any

import pytest
from pymemcache.client.base import check_key_helper
from pymemcache.exceptions import MemcacheIllegalInputError

from cachekit.backends import memcached_protocol as protocol
from cachekit.backends.memcached_protocol import (
    Command,
    IllegalKey,
    ProtocolError,
    Replies,
    Reply,
    ServerReplyError,
)


def answer(command: Command[Any], data: bytes, *, chunk: int | None = None) -> Any:
    """Feed ``data`` (in pieces of ``chunk`` bytes, or whole) and return the result."""
    replies = Replies()
    step = chunk or len(data)
    pieces = (data[i : i + step] for i in range(0, len(data), step))
    received: list[Any] = []
    for kind in command.expects:
        reply = replies.next(kind)
        while reply is None:
            replies.feed(next(pieces))  # StopIteration: the reply ended early
            reply = replies.next(kind)
        received.append(reply)
    assert next(pieces, None) is None and replies.pending == 0
    return command.result(received)


BIG = bytes(range(256)) * 1000
VALUES_REPLY = b"VALUE a 0 3\r\none\r\nVALUE b 5 0\r\n\r\nVALUE c 0 %d\r\n%b\r\nEND\r\n" % (
    len(BIG),
    BIG,
)


@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
def test_replies_arrive_in_any_pieces(chunk: int | None) -> None:
    found = answer(protocol.get_many(["a", "b", "c", "d"]), VALUES_REPLY, chunk=chunk)
    assert found == {"a": b"one", "b": b"", "c": BIG}
    assert answer(protocol.get("c"), VALUES_REPLY, chunk=chunk) == BIG
    assert answer(protocol.get("d"), b"END\r\n", chunk=chunk) is None


def test_requests_are_memcacheds_text_protocol() -> None:
    assert protocol.get_many(["a", "b", "a"]).request == b"get a b\r\n"
    assert protocol.gets_many(["a"]).request == b"gets a\r\n"
    store = protocol.store(b"add", {"a": b"1", "b": b"xy"}, 60)
    assert store.request == b"add a 0 60 1\r\n1\r\nadd b 0 60 2\r\nxy\r\n"
    assert store.expects == (Reply.LINE, Reply.LINE)
    cas = protocol.cas_many({"a": (b"v", b"42")}, -1)
    assert cas.request == b"cas a 0 -1 1 42\r\nv\r\n"
    assert protocol.delete_many(["a", "b"]).request == b"delete a\r\ndelete b\r\n"
    assert protocol.meta_add("a", b"L", 5).request == b"ms a 1 c T5 ME\r\nL\r\n"


def test_store_and_cas_replies_are_per_key() -> None:
    store = protocol.store(b"add", {"a": b"1", "b": b"2"}, 0)
    assert answer(store, b"STORED\r\nNOT_STORED\r\n") == {"a": b"STORED", "b": b"NOT_STORED"}
    cas = protocol.cas_many({"a": (b"1", b"7"), "b": (b"2", b"8")}, 0)
    assert answer(cas, b"EXISTS\r\nNOT_FOUND\r\n") == {"a": b"EXISTS", "b": b"NOT_FOUND"}
    gets = protocol.gets_many(["a"])
    assert answer(gets, b"VALUE a 0 1 99\r\nx\r\nEND\r\n") == {"a": (b"x", b"99")}


def test_meta_add_replies() -> None:
    assert protocol.parse_meta_add(b"HD c123") == b"123"
    assert protocol.parse_meta_add(b"HD") == b""
    assert protocol.parse_meta_add(b"NS") is None
    with pytest.raises(ProtocolError):
        protocol.parse_meta_add(b"EX c1")


@pytest.mark.parametrize(
    ("command", "reply", "kind"),
    [
        (protocol.meta_add("a", b"v", 0), b"ERROR\r\n", "ERROR"),
        (protocol.get("a"), b"CLIENT_ERROR bad command line format\r\n", "CLIENT_ERROR"),
        (
            protocol.store(b"set", {"a": b"v"}, 0),
            b"SERVER_ERROR object too large\r\n",
            "SERVER_ERROR",
        ),
        (protocol.flush_all(), b"CLIENT_ERROR flush_all not allowed\r\n", "CLIENT_ERROR"),
    ],
)
def test_error_replies_raise(command: Command[Any], reply: bytes, kind: str) -> None:
    with pytest.raises(ServerReplyError) as refused:
        answer(command, reply)
    assert refused.value.kind == kind


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (protocol.get("a"), b"STORED\r\n"),  # another command's reply: out of step
        (protocol.get("a"), b"VALUE a 0 3\r\nlonger than 3\r\nEND\r\n"),
        (protocol.get("a"), b"VALUE a 0 x\r\n"),
        (protocol.gets_many(["a"]), b"VALUE a 0 1\r\nx\r\nEND\r\n"),  # no CAS unique
        (protocol.store(b"set", {"a": b"v"}, 0), b"VALUE a 0 1\r\n"),
        (protocol.delete_many(["a"]), b"STORED\r\n"),
    ],
)
def test_replies_memcached_never_sends_are_protocol_errors(
    command: Command[Any], reply: bytes
) -> None:
    with pytest.raises(ProtocolError):
        answer(command, reply)


def test_a_line_without_end_is_a_protocol_error() -> None:
    replies = Replies()
    replies.feed(b"x" * 10_000)
    with pytest.raises(ProtocolError):
        replies.next(Reply.LINE)


@pytest.mark.parametrize(
    "key",
    ["ok", "a:b|c", "x" * 250, "x" * 251, "with space", "tab\t", "new\nline", "nul\x00",
     "ключ", "\x01control", "trailing ", "\x7f"],
)  # fmt: skip
def test_keys_are_refused_as_pymemcache_refuses_them(key: str) -> None:
    try:
        check_key_helper(key, allow_unicode_keys=False)
    except MemcacheIllegalInputError:
        refused = True
    else:
        refused = False
    if refused:
        with pytest.raises(IllegalKey):
            protocol.encode_key(key)
    else:
        assert protocol.encode_key(key) == key.encode()


def test_an_empty_key_and_values_that_are_not_bytes_are_refused() -> None:
    with pytest.raises(IllegalKey):
        protocol.get("")
    with pytest.raises(TypeError, match="bytes"):
        protocol.store(b"set", {"a": "text"}, 0)
    with pytest.raises(TypeError, match="bytes"):
        protocol.meta_add("a", 1, 0)
