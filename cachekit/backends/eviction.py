"""Eviction policies for the in-process backend: which key leaves when it is full.

A policy owns the backend's entry map and the order it keeps beside it; it does no I/O
and takes no lock (the backend calls it under its write lock). An entry is a list
``[value, expires_at, flag]``. Reads run without the lock and write only ``flag``: LRU
ignores it (a read moves the key to the end of the ordered map instead), SIEVE's read
sets it to 1 ("visited"), S3-FIFO's read increments it up to 3 (a 2-bit frequency). A
lock-free read racing the evictor may lose one such update: the policy then judges the
key on one access fewer, which costs a little hit ratio and nothing else.

SIEVE and S3-FIFO follow libCacheSim (``cache/eviction/Sieve.c``, ``S3FIFO.c``), the
simulator behind both papers, and evict before they insert, as it does: the key being
stored is never its own victim.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final, Literal, Protocol, get_args

from cachekit.exceptions import ConfigurationError

__all__ = ["EVICTIONS", "LRU", "S3FIFO", "Eviction", "EvictionPolicy", "Sieve", "make_policy"]

#: The policies ``MemoryBackend(eviction=...)`` accepts.
Eviction = Literal["lru", "sieve", "s3fifo"]
EVICTIONS: Final[tuple[str, ...]] = get_args(Eviction)

Entry = list[Any]  # [value, expires_at on the backend's clock or None, flag]
FLAG: Final = 2  # index of the flag a read sets


class EvictionPolicy(Protocol):
    """What the backend asks of a policy, always under its write lock."""

    @property
    def entries(self) -> dict[str, Entry]:
        """key -> entry; the backend stores and deletes entries, reads look them up."""

    def admit(self, key: str) -> None:
        """``key`` was just stored and was absent before."""

    def update(self, key: str) -> None:
        """``key``'s entry was just replaced by a new value."""

    def remove(self, key: str) -> None:
        """``key`` was just deleted from ``entries`` (not by :meth:`evict`)."""

    def evict(self) -> str:
        """Choose a victim among ``entries`` (never empty here), forget it and return
        it; the backend deletes its entry."""

    def clear(self) -> None:
        """``entries`` was just emptied."""

    def reconcile(self) -> None:
        """Make the order agree with ``entries`` again: after ``fork()``, a write another
        thread was making may be half done in the child."""


def make_policy(eviction: str, maxsize: int) -> EvictionPolicy:
    """The policy named ``eviction`` for a cache of ``maxsize`` entries.

    Raises:
        ConfigurationError: ``eviction`` names no policy.
    """
    if eviction == "lru":
        return LRU()
    if eviction == "sieve":
        return Sieve()
    if eviction == "s3fifo":
        return S3FIFO(maxsize)
    raise ConfigurationError(f"eviction must be one of {', '.join(EVICTIONS)}; got {eviction!r}")


class LRU:
    """Least recently used: the ordered map is the recency order (oldest first)."""

    def __init__(self) -> None:
        self.entries: OrderedDict[str, Entry] = OrderedDict()

    def admit(self, key: str) -> None:
        pass  # a new key is inserted at the end: most recent

    def update(self, key: str) -> None:
        self.entries.move_to_end(key)  # a write is a use, as it always was here

    def remove(self, key: str) -> None:
        pass

    def evict(self) -> str:
        return next(iter(self.entries))

    def clear(self) -> None:
        pass

    def reconcile(self) -> None:
        pass  # the order is the map itself


class Sieve:
    """SIEVE (Zhang et al., NSDI'24): one FIFO queue and a hand moving from its tail
    (oldest) to its head (newest), evicting the first unvisited key and clearing the
    visited flags it passes; new keys go to the head, a hit only sets the flag.

    The queue is split at the hand into two ordered maps, so every step is O(1):
    ``_behind`` holds the keys the hand passed in this sweep, ``_ahead`` the keys from
    the hand to the head. When ``_ahead`` runs out the hand wraps to the tail, so an
    empty ``_ahead`` with a non-empty ``_behind`` never lasts past the step that made it.
    """

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self._ahead: OrderedDict[str, None] = OrderedDict()
        self._behind: OrderedDict[str, None] = OrderedDict()

    def admit(self, key: str) -> None:
        self._ahead[key] = None

    def update(self, key: str) -> None:
        pass  # a new value keeps its place and flag: a write is not a read

    def remove(self, key: str) -> None:
        if key in self._ahead:
            del self._ahead[key]
            self._wrap()
        else:
            self._behind.pop(key, None)

    def evict(self) -> str:
        entries, ahead = self.entries, self._ahead
        # Readers may set flags while the hand sweeps; past two full sweeps it stops
        # waiting for an unvisited key (one sweep suffices on a single thread).
        for _ in range(2 * len(entries)):
            key, _none = ahead.popitem(last=False)
            entry = entries[key]
            if not entry[FLAG]:
                self._wrap()
                return key
            entry[FLAG] = 0
            self._behind[key] = None
            self._wrap()
            ahead = self._ahead
        key, _none = self._ahead.popitem(last=False)
        self._wrap()
        return key

    def clear(self) -> None:
        self._ahead.clear()
        self._behind.clear()

    def reconcile(self) -> None:
        for queue in (self._ahead, self._behind):
            for key in [key for key in queue if key not in self.entries]:
                del queue[key]
        for key in self.entries:
            if key not in self._ahead and key not in self._behind:
                self._ahead[key] = None
        self._wrap()

    def _wrap(self) -> None:
        if not self._ahead:  # the hand passed the head: it starts again at the tail
            self._ahead, self._behind = self._behind, self._ahead


class S3FIFO:
    """S3-FIFO (Yang et al., SOSP'23) as libCacheSim runs it by default.

    A small FIFO (10% of ``maxsize``) admits new keys (while the cache first fills,
    only until the small FIFO is full: later keys go to the main one), a main FIFO (the rest) keeps
    those read at least twice while in the small queue, and a ghost FIFO remembers, key
    only, the last ``0.9 * maxsize`` keys evicted from the small queue: a key stored
    again while in the ghost goes straight to the main queue. The small queue's 10% is
    a target, not a cap: the main queue is evicted from only while it is over its own
    size or the small queue is empty. Evicting from the main queue reinserts a key read
    since it was last examined (one read fewer counted) and evicts the first one that
    was not, a 2-bit CLOCK.

    Two departures from libCacheSim: a deleted key keeps its ghost entry (libCacheSim's
    ``remove`` drops it), as a write that invalidates a key does not make it less
    popular; and a cache under 20 entries admits new keys too
    (libCacheSim admits none to a small queue of one entry or less).
    """

    MOVE_TO_MAIN: Final = 2  # reads in the small queue that earn a key the main queue

    def __init__(self, maxsize: int) -> None:
        self.entries: dict[str, Entry] = {}
        self._small: OrderedDict[str, None] = OrderedDict()
        self._main: OrderedDict[str, None] = OrderedDict()
        self._ghost: OrderedDict[str, None] = OrderedDict()
        self._small_size = int(maxsize * 0.1)  # rounding as in libCacheSim
        self._main_size = maxsize - self._small_size
        self._ghost_size = int(maxsize * 0.9)
        self._has_evicted = False

    def admit(self, key: str) -> None:
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        elif not self._has_evicted and len(self._small) >= self._small_size:
            # Filling up: keys stored once the small queue is full, before the cache is,
            # go to the main queue, as in libCacheSim's S3FIFO.c (S3FIFOv0.c, the
            # paper's, put them in the small queue, which the first evictions then
            # sweep at once).
            self._main[key] = None
        else:
            self._small[key] = None

    def update(self, key: str) -> None:
        pass  # a new value keeps its queue and frequency: a write is not a read

    def remove(self, key: str) -> None:
        if key in self._small:
            del self._small[key]
        else:
            self._main.pop(key, None)

    def evict(self) -> str:
        self._has_evicted = True
        while True:
            if len(self._main) > self._main_size or not self._small:
                victim = self._evict_main()
            else:
                victim = self._evict_small()
            if victim is not None:
                return victim

    def clear(self) -> None:
        self._small.clear()
        self._main.clear()
        self._ghost.clear()
        self._has_evicted = False  # empty again: filled as a new cache is

    def reconcile(self) -> None:
        for queue in (self._small, self._main):
            for key in [key for key in queue if key not in self.entries]:
                del queue[key]
        for key in self.entries:
            self._ghost.pop(key, None)
            if key not in self._small and key not in self._main:
                self._small[key] = None

    def _evict_small(self) -> str | None:
        """Move the small queue's oldest keys read often enough to the main queue until
        one that was not is evicted (to the ghost); None if the small queue ran out."""
        small, entries = self._small, self.entries
        while small:
            key, _none = small.popitem(last=False)
            entry = entries[key]
            if entry[FLAG] >= self.MOVE_TO_MAIN:
                entry[FLAG] = 0  # libCacheSim inserts a fresh object into main
                self._main[key] = None
            else:
                self._remember(key)
                return key
        return None

    def _evict_main(self) -> str | None:
        """Reinsert the main queue's oldest keys read since last seen, one read fewer
        counted, until one that was not is evicted; None if the main queue ran out."""
        main, entries = self._main, self.entries
        # Readers may raise counts while this runs; frequencies are at most 3, so past
        # four rounds it stops waiting for a zero (three suffice on a single thread).
        for _ in range(4 * len(main)):
            key = next(iter(main))
            entry = entries[key]
            freq = entry[FLAG]
            if not freq:
                del main[key]
                return key
            entry[FLAG] = freq - 1
            main.move_to_end(key)
        if main:
            key, _none = main.popitem(last=False)
            return key
        return None

    def _remember(self, key: str) -> None:
        ghost = self._ghost
        if self._ghost_size < 1 or key in ghost:
            return
        while len(ghost) >= self._ghost_size:
            ghost.popitem(last=False)
        ghost[key] = None
