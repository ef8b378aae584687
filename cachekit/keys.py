"""Backend keys: namespacing, and hashing of keys a backend cannot store as given.

A key is never sanitised or truncated, because two different keys must never map to
one backend key. A key the backend's :class:`~cachekit.backends.base.KeyPolicy`
rejects is replaced by the SHA-256 of its UTF-8 bytes, marked with a leading ``#``;
user keys that themselves start with ``#`` are always hashed, so a raw key can never
collide with a hashed one.
"""

from __future__ import annotations

import hashlib
import re

from cachekit.backends.base import KeyPolicy
from cachekit.exceptions import ConfigurationError

__all__ = ["HASH_MARK", "encode_key", "make_backend_key", "validate_namespace"]

HASH_MARK = "#"
_NAMESPACE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# What a key may hold unhashed: printable ASCII, no whitespace or control characters
# (memcached's text protocol forbids those; non-ASCII would change the byte count).
_PRINTABLE = re.compile(r"[!-~]+")


def validate_namespace(namespace: str) -> str:
    """Return the namespace, or raise if it could break key parsing or hashing."""
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise ConfigurationError(
            f"namespace must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-'; got {namespace!r}"
        )
    return namespace


def encode_key(key: str) -> bytes:
    """UTF-8 with lone surrogates passed through, so that every ``str`` is a valid key."""
    return key.encode("utf-8", "surrogatepass")


def make_backend_key(prefix: str, key: str, policy: KeyPolicy | None) -> str:
    """Join ``prefix`` and ``key``, hashing the key if the policy rejects the result.

    Raises:
        TypeError: ``key`` is not a string.
    """
    if not isinstance(key, str):
        raise TypeError(f"cache keys are str, not {type(key).__name__}")
    full = prefix + key
    if policy is None:
        return full
    # Printable ASCII has one byte per character, so len() is the byte length.
    if len(full) <= policy.max_bytes and _PRINTABLE.fullmatch(full) and key[:1] != HASH_MARK:
        return full
    return prefix + HASH_MARK + hashlib.sha256(encode_key(key)).hexdigest()
