"""In-process LRU backend with per-item TTL, storing objects by reference or bytes.

By default values are not copied or serialized: a caller that mutates a value it got
from the cache mutates the cached value too (as with ``functools.lru_cache`` and
cachetools), and any object can be cached. With ``serialize=True`` the backend is a
byte backend like Redis and memcached: the cache stores its serializer's output, so
every read decodes a fresh copy and a value the serializer refuses is refused here
too; a test suite run on it predicts what the network backends do.

Reads take no lock: each ``OrderedDict`` operation they use is a single C call, atomic
under the GIL, and a read that loses a race with a delete is simply a miss. Writes take
one lock so that eviction, ``add`` and ``compare_and_set`` stay atomic. A locked
``cachetools.LRUCache`` lookup measured 325 ns here against 116 ns for this read, which
is most of the hit-path budget, hence the hand-rolled LRU.

After ``os.fork()`` the child keeps a copy of the entries (its own from then on) and
gets a new write lock (see :mod:`cachekit.forks`): one held by another thread at the
instant of the fork would otherwise block the child's writes forever.
"""

from __future__ import annotations

import operator
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from cachekit.backends.base import MISSING, KeyPolicy
from cachekit.exceptions import ConfigurationError
from cachekit.forks import renew_locks_in_child

__all__ = ["MemoryBackend"]

_Entry = tuple[Any, float | None]  # (value, expires_at on the injected clock, or None)


class MemoryBackend:
    """A thread-safe, size-bounded LRU with per-item expiry.

    Args:
        maxsize: the number of entries kept; the least recently used goes first.
        timer: the clock TTLs are measured on; inject a fake one to test expiry
            without sleeping.
        serialize: store bytes, as the network backends do (``stores_objects`` is
            then false), instead of objects by reference.
    """

    stores_objects: bool = True
    key_policy: KeyPolicy | None = None

    def __init__(
        self,
        maxsize: int = 10_000,
        *,
        timer: Callable[[], float] = time.monotonic,
        serialize: bool = False,
    ) -> None:
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ConfigurationError(f"maxsize must be a positive int, got {maxsize!r}")
        self.maxsize = maxsize
        self.stores_objects = not serialize
        # compare_and_set matches bytes by equality, objects by identity (the contract).
        self._same: Callable[[Any, Any], bool] = operator.eq if serialize else operator.is_
        self.timer = timer
        self.evictions = 0
        self._data: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        renew_locks_in_child(self, "_lock")
        self.get = self._make_get()

    def _make_get(self) -> Callable[[str], Any]:
        """Build ``get`` as a closure: locals instead of attribute lookups save ~20%."""
        lookup = self._data.get
        touch = self._data.move_to_end
        timer = self.timer
        expire = self._expire

        def get(key: str) -> Any:
            """Return the live value of ``key`` or MISSING; refreshes its LRU position."""
            entry = lookup(key)
            if entry is None:
                return MISSING
            value, expires = entry
            if expires is not None and expires <= timer():  # no clock read without a TTL
                expire(key, entry)
                return MISSING
            try:  # noqa: SIM105 - contextlib.suppress costs a hit ~60 ns
                touch(key)
            except KeyError:  # deleted since the lookup; this read still saw a hit
                pass
            return value

        return get

    def __repr__(self) -> str:
        mode = "" if self.stores_objects else ", serialize=True"
        return f"MemoryBackend(maxsize={self.maxsize}{mode})"

    def __len__(self) -> int:
        return len(self._data)

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        found = {}
        for key in keys:
            value = self.get(key)
            if value is not MISSING:
                found[key] = value
        return found

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        with self._lock:
            self._store(key, value, ttl)

    def set_many(self, items: Mapping[str, Any], ttl: float | None) -> None:
        with self._lock:
            for key, value in items.items():
                self._store(key, value, ttl)

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def delete_many(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._data.pop(key, None)

    def add(self, key: str, value: Any, ttl: float | None) -> bool:
        with self._lock:
            if self._live(key) is not None:
                return False
            self._store(key, value, ttl)
            return True

    def compare_and_set(self, key: str, expected: Any, value: Any, ttl: float | None) -> bool:
        with self._lock:
            entry = self._live(key)
            if entry is None or not self._same(entry[0], expected):
                return False
            self._store(key, value, ttl)
            return True

    def add_many(self, items: Mapping[str, Any], ttl: float | None) -> AbstractSet[str]:
        with self._lock:
            stored = {key for key in items if self._live(key) is None}
            for key in stored:
                self._store(key, items[key], ttl)
            return stored

    def compare_and_set_many(
        self, items: Mapping[str, tuple[Any, Any]], ttl: float | None
    ) -> AbstractSet[str]:
        with self._lock:
            stored = set()
            for key, (expected, value) in items.items():
                entry = self._live(key)
                if entry is not None and self._same(entry[0], expected):
                    self._store(key, value, ttl)
                    stored.add(key)
            return stored

    def compare_and_delete(self, key: str, expected: Any) -> bool:
        with self._lock:
            entry = self._live(key)
            if entry is None or not self._same(entry[0], expected):
                return False
            del self._data[key]
            return True

    def clear(self) -> None:
        """Drop every entry (all namespaces)."""
        with self._lock:
            self._data.clear()

    def close(self) -> None:
        """Nothing to release; present for the backend contract."""

    # -- helpers; callers hold the lock ---------------------------------------------

    def _live(self, key: str) -> _Entry | None:
        entry = self._data.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= self.timer():
            del self._data[key]
            return None
        return entry

    def _store(self, key: str, value: Any, ttl: float | None) -> None:
        if not self.stores_objects and type(value) is not bytes:
            raise TypeError(
                f"MemoryBackend(serialize=True) stores bytes, not {type(value).__name__}"
            )
        data = self._data
        data[key] = (value, None if ttl is None else self.timer() + ttl)
        data.move_to_end(key)
        while len(data) > self.maxsize:
            data.popitem(last=False)
            self.evictions += 1

    def _expire(self, key: str, entry: _Entry) -> None:
        with self._lock:
            # Only drop the entry we saw expire; a concurrent set may have replaced it.
            if self._data.get(key) is entry:
                del self._data[key]
