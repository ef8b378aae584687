"""A seeded Zipf trace of product reads and writes: the workload every run replays.

Real read traffic is skewed: a few hot rows take most reads, which is what makes a
cache smaller than the table worth having. A Zipf law with exponent ``s`` (0.99 is the
YCSB default) gives rank ``k`` a weight ``1 / k**s``; ``s = 0`` is uniform. Optional
one-time scans (an export reading every row once) are mixed in to show which eviction
policies let a scan flush the hot rows out of a small cache.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass

__all__ = ["Trace", "ZipfSampler", "make_trace"]


class ZipfSampler:
    """Draws ids ``1..n`` with Zipf-distributed popularity.

    Inverse-transform sampling: one uniform draw and a bisect over the cumulative
    weights, O(log n) per sample with the standard library only (no numpy). The
    popularity ranks are shuffled onto ids, so the hot rows are scattered through the
    table as in real data, not packed into its first pages.

    Args:
        n: how many distinct ids.
        s: the skew exponent, ``>= 0``.
        rng: the random source; seed it for a reproducible trace.
    """

    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if s < 0:
            raise ValueError(f"the Zipf exponent must be >= 0, got {s}")
        self._cumulative = list(itertools.accumulate(1.0 / k**s for k in range(1, n + 1)))
        self._total = self._cumulative[-1]
        self._ids = list(range(1, n + 1))
        rng.shuffle(self._ids)
        self._rng = rng

    def id_of_rank(self, rank: int) -> int:
        """The id with popularity ``rank`` (0 = the most popular)."""
        return self._ids[rank]

    def sample(self) -> int:
        """One id, drawn with probability proportional to its rank's weight."""
        point = self._rng.random() * self._total
        # min(): float rounding can put the point a hair past the last cumulative weight.
        rank = min(bisect.bisect_right(self._cumulative, point), len(self._ids) - 1)
        return self._ids[rank]


@dataclass(frozen=True)
class Trace:
    """The requests of one workload, in order: ``ids[i]`` is read, or written if
    ``writes[i]``. Parallel lists rather than request objects: the replay loop reads
    them millions of times."""

    ids: list[int]
    writes: list[bool]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def reads(self) -> int:
        """How many requests are reads."""
        return len(self.ids) - sum(self.writes)

    def new_values(self, index: int) -> dict[str, int]:
        """The columns write ``index`` sets: a function of the index, so every replay
        of the trace writes the same values without storing them."""
        return {"price_cents": 100 + (index * 7919) % 99_900, "stock": index % 97}


def make_trace(
    *, rows: int, requests: int, zipf: float, write_ratio: float, seed: int, scans: int = 0
) -> Trace:
    """Draw ``requests`` requests over ids ``1..rows``; the same arguments give the same
    trace on every machine (``random.Random`` is specified to be reproducible).

    Args:
        scans: how many one-time scans to mix in, like a nightly export reading every row
            once. The Zipf requests are cut into ``scans`` equal windows, and scan ``k``
            reads ids ``1..rows`` in order, its reads spread evenly among window ``k``'s
            requests. Each scan adds ``rows`` reads, never a write, and draws nothing
            from the random source, so removing them leaves the trace of ``scans=0``.
            That trace, the default, is what callers got before this option existed.
    """
    if scans < 0:
        raise ValueError(f"scans must be at least 0, got {scans}")
    rng = random.Random(seed)  # noqa: S311 - a workload, not secrets
    sampler = ZipfSampler(rows, zipf, rng)
    ids = [sampler.sample() for _ in range(requests)]
    writes = [rng.random() < write_ratio for _ in range(requests)]
    if not scans:
        return Trace(ids, writes)
    return _with_scans(Trace(ids, writes), rows, scans)


def _with_scans(trace: Trace, rows: int, scans: int) -> Trace:
    """``trace`` with ``scans`` scans of ids ``1..rows`` merged in, one per window."""
    ids: list[int] = []
    writes: list[bool] = []
    bounds = [len(trace) * k // scans for k in range(scans + 1)]
    for low, high in itertools.pairwise(bounds):
        window = high - low
        zipf = scanned = 0
        while zipf < window or scanned < rows:
            # Spread evenly: the next request is whichever sits earlier in its own
            # sequence, as a fraction of that sequence's length (midpoints, cross-multiplied).
            if scanned < rows and (
                zipf == window or (2 * scanned + 1) * window < (2 * zipf + 1) * rows
            ):
                scanned += 1
                ids.append(scanned)
                writes.append(False)
            else:
                ids.append(trace.ids[low + zipf])
                writes.append(trace.writes[low + zipf])
                zipf += 1
    return Trace(ids, writes)
