"""Serializers for network backends: safe JSON by default, signed pickle on request.

Nothing read from a shared server may run code, so the default is JSON, extended with
tagged objects for the common types JSON lacks. Pickle is offered only inside an
HMAC-SHA256 envelope that binds the entry to its backend key (and so its namespace):
an entry that fails to verify is never unpickled.

A serializer may return any bytes: the facade frames them (see :mod:`cachekit.codec`),
so no output can be mistaken for one of its own markers or annotated entries.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import math
import pickle
import uuid
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

from cachekit.exceptions import ConfigurationError, DecodeError, SerializationError
from cachekit.keys import encode_key

try:  # orjson is several times faster; the stdlib is the fallback, never a requirement.
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised only where orjson is absent
    _orjson = None  # type: ignore[assignment]

__all__ = ["JsonSerializer", "PickleSerializer", "Serializer"]


@runtime_checkable
class Serializer(Protocol):
    """Turns values into bytes for one backend key and back.

    ``key`` is the exact backend key, so that a serializer can bind an entry to it.
    ``loads`` raises :class:`~cachekit.exceptions.DecodeError` for anything it cannot
    verify or decode; ``dumps`` raises :class:`~cachekit.exceptions.SerializationError`.
    """

    def dumps(self, value: Any, key: str) -> bytes: ...

    def loads(self, data: bytes, key: str) -> Any: ...


_TAG = "__ck__"
# A leading space marks JSON that holds tagged objects: JSON parsers skip it, so the
# common case (no tags) decodes with one C call and no second pass.
_TAGGED = b" "
_PLAIN = (str, bool, type(None))


def _tagged(name: str, value: Any) -> dict[str, Any]:
    return {_TAG: name, "v": value}


class _Encoder:
    """One pass that turns a value into plain JSON data, tagging what JSON would lose."""

    __slots__ = ("tags",)

    def __init__(self) -> None:
        self.tags = False

    def tag(self, name: str, value: Any) -> dict[str, Any]:
        self.tags = True
        return _tagged(name, value)

    def encode(self, obj: Any) -> Any:  # noqa: C901, PLR0911, PLR0912 - one flat type switch
        t = type(obj)
        if t in _PLAIN:
            return obj
        if t is int:
            # Hex, not decimal: str() refuses ints over 4,300 digits (and is quadratic).
            return obj if -(2**63) <= obj < 2**64 else self.tag("hexint", f"{obj:x}")
        if t is float:
            return obj if math.isfinite(obj) else self.tag("float", repr(obj))
        if t is list:
            return [self.encode(item) for item in obj]
        if t is dict:
            if _TAG not in obj and all(type(k) is str for k in obj):
                return {k: self.encode(v) for k, v in obj.items()}
            return self.tag("dict", [[self.encode(k), self.encode(v)] for k, v in obj.items()])
        if t is tuple:
            return self.tag("tuple", [self.encode(item) for item in obj])
        if t is dt.datetime:
            return self.tag("datetime", obj.isoformat())
        if t is dt.date:
            return self.tag("date", obj.isoformat())
        if t is dt.time:
            return self.tag("time", obj.isoformat())
        if t is dt.timedelta:
            return self.tag("timedelta", [obj.days, obj.seconds, obj.microseconds])
        if t is Decimal:
            return self.tag("decimal", str(obj))
        if t is uuid.UUID:
            return self.tag("uuid", str(obj))
        if t is bytes:
            return self.tag("bytes", base64.b64encode(obj).decode("ascii"))
        if t in (set, frozenset):
            return self.tag(t.__name__, [self.encode(item) for item in obj])
        raise SerializationError(
            f"JsonSerializer cannot encode {t.__module__}.{t.__qualname__}; convert it to "
            "JSON types, or use PickleSerializer(secret=...)"
        )


def _revive(obj: Any) -> Any:  # noqa: C901, PLR0911, PLR0912 - one flat type switch
    if type(obj) is list:
        return [_revive(item) for item in obj]
    if type(obj) is not dict:
        return obj
    name = obj.get(_TAG)
    if name is None:
        return {k: _revive(v) for k, v in obj.items()}
    v = obj["v"]
    if name == "tuple":
        return tuple(_revive(item) for item in v)
    if name == "dict":
        return {_revive(k): _revive(val) for k, val in v}
    if name == "datetime":
        return dt.datetime.fromisoformat(v)
    if name == "date":
        return dt.date.fromisoformat(v)
    if name == "time":
        return dt.time.fromisoformat(v)
    if name == "timedelta":
        return dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2])
    if name == "decimal":
        return Decimal(v)
    if name == "uuid":
        return uuid.UUID(v)
    if name == "bytes":
        return base64.b64decode(v, validate=True)
    if name == "hexint":
        return int(v, 16)
    if name == "int":  # written by earlier versions
        return int(v)
    if name == "float":
        return float(v)
    if name == "set":
        return {_revive(item) for item in v}
    if name == "frozenset":
        return frozenset(_revive(item) for item in v)
    raise DecodeError(f"unknown JSON tag {name!r}")


def _json_dumps(data: Any) -> bytes:
    if _orjson is not None:
        try:
            return _orjson.dumps(data)
        except TypeError:
            pass  # e.g. lone surrogates in a str: the stdlib escapes them
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode("ascii")


def _json_loads(data: bytes) -> Any:
    if _orjson is not None:
        try:
            return _orjson.loads(data)
        except _orjson.JSONDecodeError:
            pass  # the stdlib accepts the escaped lone surrogates orjson refuses
    return json.loads(data)


class JsonSerializer:
    """JSON that round-trips datetime, date, time, timedelta, Decimal, UUID, bytes,
    tuples, sets, non-string dict keys, big ints and non-finite floats.

    Uses orjson when installed. Values of other types raise
    :class:`~cachekit.exceptions.SerializationError` (a ``TypeError``) instead of being
    stored in a form that would read back as something else.
    """

    __slots__ = ()

    def dumps(self, value: Any, key: str) -> bytes:
        encoder = _Encoder()
        try:
            data = _json_dumps(encoder.encode(value))
        except RecursionError as exc:  # a value that contains itself, or nests too deep
            raise SerializationError(
                "JsonSerializer cannot encode a self-referential value"
            ) from exc
        return _TAGGED + data if encoder.tags else data

    def loads(self, data: bytes, key: str) -> Any:
        if not data:
            raise DecodeError("empty entry")
        try:
            if data[:1] == _TAGGED:
                return _revive(_json_loads(data))
            return _json_loads(data)
        except DecodeError:
            raise
        except Exception as exc:  # any parse failure of foreign bytes is a bad entry
            raise DecodeError(f"undecodable JSON entry: {exc}") from exc


class PickleSerializer:
    """Pickle inside an HMAC-SHA256 envelope bound to the backend key.

    Envelope: ``b"ckp1:sha256:" + mac(32 bytes) + pickle``, where the MAC covers the
    header, the length-prefixed key and the pickle. The key is the backend key (which
    includes the namespace) for a plain entry; for an annotated entry it also encodes
    the entry's header, in a form no backend key can take (see
    :func:`cachekit.entries.pack`). The digest name is pinned, so a header naming
    another algorithm is rejected, and nothing is unpickled before
    ``hmac.compare_digest`` succeeds.

    What someone who can write to the cache server, without the secret, can do:
    delete entries or make them unreadable (each is a counted miss), keep an entry
    past its TTL (the server's expiry is not signed), and replay an entry signed
    earlier for the same key and of the same kind (an older value of that key). What
    they cannot do: run code in a reader, make an entry read under another key or
    namespace, turn a plain entry into an annotated one or back, or change an
    annotated entry's freshness, load time or tags.

    Args:
        secret: at least 16 bytes, shared by every process that reads the cache.
        protocol: the pickle protocol to write.
    """

    __slots__ = ("_protocol", "_secret")

    _HEADER = b"ckp1:sha256:"
    _MAC_SIZE = 32

    def __init__(self, *, secret: bytes, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ConfigurationError("PickleSerializer needs secret=bytes of 16 or more bytes")
        self._secret = secret
        self._protocol = protocol

    def _mac(self, key: str, payload: bytes) -> bytes:
        mac = hmac.new(self._secret, self._HEADER, hashlib.sha256)
        key_bytes = encode_key(key)
        mac.update(len(key_bytes).to_bytes(4, "big"))
        mac.update(key_bytes)
        mac.update(payload)
        return mac.digest()

    def dumps(self, value: Any, key: str) -> bytes:
        try:
            payload = pickle.dumps(value, protocol=self._protocol)
        except Exception as exc:
            raise SerializationError(f"cannot pickle {type(value).__qualname__}: {exc}") from exc
        return self._HEADER + self._mac(key, payload) + payload

    def loads(self, data: bytes, key: str) -> Any:
        header = self._HEADER
        if not data.startswith(header):
            raise DecodeError("not a signed cachekit pickle (wrong header or digest name)")
        start = len(header) + self._MAC_SIZE
        mac, payload = data[len(header) : start], data[start:]
        if len(mac) != self._MAC_SIZE or not hmac.compare_digest(mac, self._mac(key, payload)):
            raise DecodeError("signature mismatch")
        try:
            return pickle.loads(payload)  # noqa: S301 - verified against the HMAC above
        except Exception as exc:
            raise DecodeError(f"signed pickle failed to load: {exc}") from exc
