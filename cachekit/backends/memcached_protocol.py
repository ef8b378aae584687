"""memcached's text protocol (and the meta add) as bytes out and replies in, with no I/O.

A :class:`Command` is a request, the kinds of reply it expects in order, and a function
that turns those replies into its result; :class:`Replies` cuts the bytes a server sends
into replies. Whoever holds the socket writes ``command.request``, feeds what it reads
into a :class:`Replies` until each expected reply is complete, then calls
``command.result``. Several commands in one request (a pipelined batch) expect one
reply each, in order: memcached answers in the order it reads.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

__all__ = [
    "Command",
    "IllegalKey",
    "ProtocolError",
    "Replies",
    "Reply",
    "ServerReplyError",
]

T = TypeVar("T")

# pymemcache's rule, so both backends refuse the same keys: at most 250 bytes of ASCII,
# no whitespace, no NUL (and, here, not empty: ``get`` of nothing is a syntax error).
_KEY: Final = re.compile(rb"[^\s\x00]{1,250}")
# A reply line longer than this is not memcached's: the stream is out of step.
_MAX_LINE: Final = 8192
_CRLF: Final = b"\r\n"
_ERRORS: Final = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")
_STORE_REPLIES: Final = frozenset((b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND"))
_DELETE_REPLIES: Final = frozenset((b"DELETED", b"NOT_FOUND"))


class IllegalKey(ValueError):
    """A key memcached cannot take; refused before anything is sent."""


class ProtocolError(Exception):
    """The server sent something memcached never sends: the connection is out of step."""


class ServerReplyError(Exception):
    """The server answered ``ERROR``, ``CLIENT_ERROR ...`` or ``SERVER_ERROR ...``.

    Attributes:
        kind: ``"ERROR"`` (a command it does not know), ``"CLIENT_ERROR"`` or
            ``"SERVER_ERROR"``.
    """

    def __init__(self, line: bytes) -> None:
        self.kind = line.split(b" ", 1)[0].decode("ascii")
        super().__init__(line.decode("ascii", "replace"))


class Reply(enum.Enum):
    """The kinds of reply a command expects."""

    LINE = "one status line"
    VALUES = "VALUE blocks up to END"


#: A retrieval reply: each key found, with its value and its CAS unique (``gets``) or None.
Values = dict[bytes, tuple[bytes, bytes | None]]


@dataclass(frozen=True, slots=True)
class Command(Generic[T]):
    """A request, the replies it expects in order, and what they mean."""

    request: bytes
    expects: tuple[Reply, ...]
    result: Callable[[list[Any]], T]


def encode_key(key: str) -> bytes:
    """The key as sent.

    Raises:
        IllegalKey: not ASCII, empty, over 250 bytes, or with whitespace or NUL.
    """
    try:
        name = key.encode("ascii")
    except UnicodeEncodeError:
        raise IllegalKey(f"memcached keys are ASCII: {key!r}") from None
    if _KEY.fullmatch(name) is None:
        raise IllegalKey(f"memcached keys are 1-250 bytes without whitespace: {key!r}")
    return name


def _value(value: Any) -> bytes:
    if not isinstance(value, bytes):
        # Anything else would be stored as its repr, or fail half-way through a batch.
        raise TypeError(f"memcached values are bytes, not {type(value).__name__}")
    return value


def _names(keys: Iterable[str]) -> dict[bytes, str]:
    """Each distinct key by its encoded name (keys are ASCII, so the name decodes back)."""
    return {encode_key(key): key for key in keys}


def _store_line(line: bytes) -> bytes:
    if line not in _STORE_REPLIES:
        raise ProtocolError(f"unexpected reply to a store command: {line!r}")
    return line


def get_many(keys: Iterable[str]) -> Command[dict[str, bytes]]:
    """``get`` of every key in one command; the result holds the hits only."""
    names = _names(keys)

    def result(replies: list[Any]) -> dict[str, bytes]:
        found: Values = replies[0]
        return {names[name]: value for name, (value, _) in found.items() if name in names}

    return Command(b"get %b\r\n" % b" ".join(names), (Reply.VALUES,), result)


def get(key: str) -> Command[bytes | None]:
    """``get`` of one key: its value, or None."""
    name = encode_key(key)

    def result(replies: list[Any]) -> bytes | None:
        found = replies[0].get(name)
        return None if found is None else found[0]

    return Command(b"get %b\r\n" % name, (Reply.VALUES,), result)


def gets_many(keys: Iterable[str]) -> Command[dict[str, tuple[bytes, bytes]]]:
    """``gets`` of every key: each hit's value and CAS unique."""
    names = _names(keys)

    def result(replies: list[Any]) -> dict[str, tuple[bytes, bytes]]:
        found: Values = replies[0]
        hits: dict[str, tuple[bytes, bytes]] = {}
        for name, (value, unique) in found.items():
            if unique is None or name not in names:
                raise ProtocolError(f"unexpected VALUE {name!r} in a gets reply")
            hits[names[name]] = (value, unique)
        return hits

    return Command(b"gets %b\r\n" % b" ".join(names), (Reply.VALUES,), result)


def store(verb: bytes, items: Mapping[str, Any], expire: int) -> Command[dict[str, bytes]]:
    """``set`` or ``add`` of every item, pipelined: each key's reply (``STORED``,
    ``NOT_STORED``...). Client flags are 0, as the sync backend writes them."""
    parts = []
    for key, value in items.items():
        data = _value(value)
        parts.append(b"%b %b 0 %d %d\r\n%b\r\n" % (verb, encode_key(key), expire, len(data), data))
    keys = list(items)

    def result(replies: list[Any]) -> dict[str, bytes]:
        return {key: _store_line(line) for key, line in zip(keys, replies, strict=True)}

    return Command(b"".join(parts), (Reply.LINE,) * len(keys), result)


def cas_many(items: Mapping[str, tuple[Any, bytes]], expire: int) -> Command[dict[str, bytes]]:
    """``cas`` of each ``key: (value, unique)``, pipelined (each command carries its own
    unique, and each is atomic on its own): each key's reply (``STORED``, ``EXISTS``,
    ``NOT_FOUND``). A negative ``expire`` stores the item already expired."""
    parts = []
    for key, (value, unique) in items.items():
        data = _value(value)
        head = b"cas %b 0 %d %d %b\r\n" % (encode_key(key), expire, len(data), unique)
        parts.append(head + data + _CRLF)
    keys = list(items)

    def result(replies: list[Any]) -> dict[str, bytes]:
        return {key: _store_line(line) for key, line in zip(keys, replies, strict=True)}

    return Command(b"".join(parts), (Reply.LINE,) * len(keys), result)


def delete_many(keys: Iterable[str]) -> Command[None]:
    """``delete`` of every key, pipelined (the text protocol has no multi-key delete)."""
    names = list(_names(keys))

    def result(replies: list[Any]) -> None:
        for line in replies:
            if line not in _DELETE_REPLIES:
                raise ProtocolError(f"unexpected reply to delete: {line!r}")

    request = b"".join(b"delete %b\r\n" % name for name in names)
    return Command(request, (Reply.LINE,) * len(names), result)


def encode_meta_add(name: bytes, value: Any, expire: int) -> bytes:
    """memcached's ``add`` that also answers the new item's CAS unique; ``name`` is the
    key as sent (checked by the caller: see :func:`encode_key`).

    Meta set in add mode, ``ms <key> <len> c T<exptime> ME``: ``c`` asks for the CAS
    unique, ``T`` is the exptime (same meaning as the text protocol's: 0 is no expiry,
    over 30 days a unix time), ``ME`` is mode add. Client flags default to 0, as plain
    ``add`` writes them, so ``get`` reads the value unchanged.
    """
    data = _value(value)
    return b"ms %b %d c T%d ME\r\n%b\r\n" % (name, len(data), expire, data)


def parse_meta_add(line: bytes) -> bytes | None:
    """The reply to :func:`encode_meta_add`: ``HD c<unique>`` when stored, ``NS ...``
    when the key was present. Returns the unique if stored (b"" if the server left it
    out), else None.

    Raises:
        ProtocolError: any other reply.
    """
    code, *flags = line.split()
    if code == b"NS":
        return None
    if code != b"HD":
        raise ProtocolError(f"unexpected reply to meta add: {line!r}")
    return next((flag[1:] for flag in flags if flag.startswith(b"c")), b"")


def meta_add(key: str, value: Any, expire: int) -> Command[bytes | None]:
    """:func:`encode_meta_add` as a command; its result is :func:`parse_meta_add`'s."""
    request = encode_meta_add(encode_key(key), value, expire)
    return Command(request, (Reply.LINE,), lambda replies: parse_meta_add(replies[0]))


def _expect_line(request: bytes, expected: bytes) -> Command[bool]:
    return Command(request, (Reply.LINE,), lambda replies: replies[0].startswith(expected))


def flush_all() -> Command[bool]:
    """``flush_all``: whether the server emptied itself (``OK``)."""
    return _expect_line(b"flush_all\r\n", b"OK")


def version() -> Command[bool]:
    """``version``: whether the server answered it."""
    return _expect_line(b"version\r\n", b"VERSION ")


class Replies:
    """Cuts the bytes a server sends into replies, one expected kind at a time.

    Incremental: a large value is copied once, when complete, and a retrieval reply
    is kept across reads, never parsed twice. An error line where a reply should be
    raises :class:`ServerReplyError`; anything memcached never sends raises
    :class:`ProtocolError`. After either, the connection is out of step: close it.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0
        self._values: Values = {}
        self._header: tuple[bytes, int, bytes | None] | None = None

    def feed(self, data: bytes) -> None:
        """Add bytes read from the server."""
        if self._start == len(self._buffer):  # all parsed: the usual case between reads
            self._buffer.clear()
            self._start = 0
        elif self._start > 65536 and self._start * 2 > len(self._buffer):
            del self._buffer[: self._start]  # compact: what was parsed is never read again
            self._start = 0
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete reply."""
        return len(self._buffer) - self._start

    def next(self, kind: Reply) -> Any:
        """The next reply of ``kind`` (a line, or :data:`Values`), or None if more bytes
        are needed.

        Raises:
            ServerReplyError: the server answered with an error.
            ProtocolError: the server sent something memcached never sends.
        """
        if kind is Reply.LINE:
            line = self._line()
            if line is not None and line.startswith(_ERRORS):
                raise ServerReplyError(line)
            return line
        return self._next_values()

    def _next_values(self) -> Values | None:
        while True:
            if self._header is not None and not self._take_block(*self._header):
                return None
            line = self._line()
            if line is None:
                return None
            if line == b"END":
                values, self._values = self._values, {}
                return values
            if line.startswith(b"VALUE "):
                self._header = _value_header(line)
            elif line.startswith(_ERRORS):
                raise ServerReplyError(line)
            else:
                raise ProtocolError(f"unexpected line in a retrieval reply: {line[:80]!r}")

    def _take_block(self, name: bytes, length: int, unique: bytes | None) -> bool:
        start = self._start
        end = start + length
        if len(self._buffer) < end + 2:
            return False
        if self._buffer[end : end + 2] != _CRLF:
            raise ProtocolError(f"a value of {length} bytes for {name!r} does not end in CRLF")
        self._values[name] = (bytes(self._buffer[start:end]), unique)
        self._start = end + 2
        self._header = None
        return True

    def _line(self) -> bytes | None:
        end = self._buffer.find(_CRLF, self._start)
        if end < 0:
            if self.pending > _MAX_LINE:
                raise ProtocolError(f"no line end in {self.pending} bytes")
            return None
        line = bytes(self._buffer[self._start : end])
        self._start = end + 2
        return line


def _value_header(line: bytes) -> tuple[bytes, int, bytes | None]:
    """``VALUE <key> <flags> <bytes> [<cas unique>]``: the key, length and unique."""
    parts = line.split()
    if len(parts) not in (4, 5) or not parts[3].isdigit():
        raise ProtocolError(f"malformed VALUE line: {line[:80]!r}")
    return parts[1], int(parts[3]), parts[4] if len(parts) == 5 else None
