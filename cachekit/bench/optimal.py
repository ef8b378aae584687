"""Hit ratios computed offline on a trace: Belady's optimum, and plain LRU.

Belady's MIN is the physical limit: it knows the future, so no policy of the same size
(LRU, LFU, TinyLFU admission...) can hit more often. The LRU simulation is what the
in-process backend should achieve on one thread; tests compare the two.

Writes change what can be hit. Under ``"invalidate"`` (cache-aside, read-through) a
write removes the key; under ``"refill"`` (write-through) it removes the key and loads
it again, which costs a query but no read miss.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

__all__ = ["WriteMode", "belady_hit_ratio", "lru_hit_ratio", "next_reads"]

WriteMode = Literal["invalidate", "refill"]


def next_reads(ids: Sequence[int], writes: Sequence[bool]) -> list[int]:
    """For each request, when the value it leaves cached is next read.

    That is the index of the next read of the same id, unless a write to the id comes
    first (the write makes the cached value worthless). Values that are never read
    again get ``len(ids) + i``: later than any real read, and unique, so heap entries
    can be checked for staleness by value.
    """
    n = len(ids)
    upcoming: dict[int, int] = {}
    result = [0] * n
    for i in range(n - 1, -1, -1):
        id_ = ids[i]
        result[i] = upcoming.get(id_, n + i)
        if writes[i]:
            upcoming.pop(id_, None)
        else:
            upcoming[id_] = i
    return result


def belady_hit_ratio(
    ids: Sequence[int], writes: Sequence[bool], size: int, mode: WriteMode = "invalidate"
) -> float:
    """The best read hit ratio a cache of ``size`` entries can reach on the trace.

    Belady's MIN with bypass: on a miss with the cache full, the entry whose next read
    is furthest away goes, and that may be the value just loaded (it is then not
    admitted). Allowing bypass makes this a bound for admission policies too.
    O(n log size), with a lazy max-heap of next-read times.
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    upcoming = next_reads(ids, writes)
    cached: dict[int, int] = {}  # id -> when its cached value is next read
    heap: list[tuple[int, int]] = []  # (-next read, id), possibly stale
    hits = reads = 0
    for i, id_ in enumerate(ids):
        if writes[i]:
            cached.pop(id_, None)
            if mode == "invalidate":
                continue
        else:
            reads += 1
            if id_ in cached:
                hits += 1
                cached[id_] = upcoming[i]
                heapq.heappush(heap, (-upcoming[i], id_))
                continue
        _admit(cached, heap, id_, upcoming[i], size)
    return hits / reads if reads else 0.0


def _admit(
    cached: dict[int, int], heap: list[tuple[int, int]], id_: int, nxt: int, size: int
) -> None:
    """Admit ``id_`` (next read at ``nxt``) unless everything cached is needed sooner."""
    if len(cached) >= size:
        while -heap[0][0] != cached.get(heap[0][1]):
            heapq.heappop(heap)  # stale: the id was read, rewritten or evicted since
        furthest, victim = heap[0]
        if -furthest < nxt:
            return  # bypass: the new value is the one needed last
        heapq.heappop(heap)
        del cached[victim]
    cached[id_] = nxt
    heapq.heappush(heap, (-nxt, id_))


def lru_hit_ratio(
    ids: Sequence[int], writes: Sequence[bool], size: int, mode: WriteMode = "invalidate"
) -> float:
    """The read hit ratio of an LRU cache of ``size`` entries that admits every miss.

    Mirrors what cachekit does on a single thread: a read miss stores the value (most
    recently used), a write deletes the entry and, under ``"refill"``, stores it again.
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    lru: OrderedDict[int, None] = OrderedDict()
    hits = reads = 0
    for id_, write in zip(ids, writes, strict=True):
        if write:
            lru.pop(id_, None)
            if mode == "invalidate":
                continue
        else:
            reads += 1
            if id_ in lru:
                hits += 1
                lru.move_to_end(id_)
                continue
        lru[id_] = None
        if len(lru) > size:
            lru.popitem(last=False)
    return hits / reads if reads else 0.0
