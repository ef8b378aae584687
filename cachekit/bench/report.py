"""Showing the results: a table and JSON.

The table says where caching does not pay as plainly as where it does. rich draws it
when installed (the ``bench`` extra), plain text otherwise. The progress bar while it
runs is :mod:`cachekit.bench.progress`'s job, the PNG :mod:`cachekit.bench.plot`'s.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cachekit.backends.eviction import Eviction
from cachekit.bench.config import BenchConfig, BenchError
from cachekit.bench.database import LATEST_REVIEWS
from cachekit.bench.runner import Replay, Verdict

__all__ = [
    "Result",
    "describe",
    "notes",
    "print_report",
    "title",
    "verdicts",
    "write_json",
]

_HEADERS = (
    "strategy",
    "cache size",
    "hit ratio",
    "optimal",
    "DB queries",
    "saved",
    "throughput",
    "p50 ms",
    "p99 ms",
    "evictions",
    "stale",
)


@dataclass(frozen=True)
class Result:
    """One strategy at one cache size with one eviction policy, next to the uncached
    replay of the same trace."""

    strategy: str
    eviction: Eviction | None  # None on servers, whose eviction is their own
    cache_size: float  # a fraction of the rows
    cache_entries: int
    size_enforced: bool  # False on servers: the percentage could not bound them
    optimal_hit_ratio: float
    replay: Replay
    uncached: Replay
    verdict: Verdict

    @property
    def queries_saved(self) -> float:
        """The share of the uncached replay's statements the cache spared the database."""
        base = self.uncached.queries
        return 1 - self.replay.queries / base if base else 0.0

    @property
    def throughput_ratio(self) -> float:
        base = self.uncached.throughput
        return self.replay.throughput / base if base else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: the documented fields first (see README), then the extras."""
        run, base, stats = self.replay, self.uncached, self.verdict.stats
        return {
            "strategy": self.strategy,
            "eviction": self.eviction,
            "cache_size": self.cache_size,
            "hit_ratio": round(run.hit_ratio, 6),
            "optimal_hit_ratio": round(self.optimal_hit_ratio, 6),
            "db_queries": run.queries,
            "db_queries_uncached": base.queries,
            "queries_saved": round(self.queries_saved, 6),
            "throughput_ratio": round(self.throughput_ratio, 4),
            "p50_ms": round(run.percentile(0.5), 4),
            "p99_ms": round(run.percentile(0.99), 4),
            "p50_ms_uncached": round(base.percentile(0.5), 4),
            "p99_ms_uncached": round(base.percentile(0.99), 4),
            "evictions": self.verdict.evictions,
            "stale": self.verdict.stale,
            "cache_entries": self.cache_entries,
            "size_enforced": self.size_enforced,
            "requests": run.requests,
            "reads": run.reads,
            "throughput": round(run.throughput, 1),
            "throughput_uncached": round(base.throughput, 1),
            "hit_p50_ms": round(run.percentile(0.5, "hit"), 4),
            "miss_p50_ms": round(run.percentile(0.5, "miss"), 4),
            "read_p50_ms_uncached": round(base.percentile(0.5, "miss"), 4),
            "write_p50_ms": round(run.percentile(0.5, "write"), 4),
            "write_p50_ms_uncached": round(base.percentile(0.5, "write"), 4),
            "verified_entries": self.verdict.checked,
            "lease_waits": stats.lease_waits,
            "fills_rejected": stats.fills_rejected,
            "cache_errors": stats.errors,
        }

    @property
    def compared(self) -> bool:
        """Whether the policy is not the default, LRU, so output must name it."""
        return self.eviction not in {None, "lru"}

    def label(self, *, policy: bool) -> str:
        """The run in a sentence: ``cache-aside at 5% (1,000)``, or with the ``policy``
        named, ``cache-aside with sieve at 5% (1,000)``."""
        if not self.size_enforced:
            return f"{self.strategy} (unbounded)"
        named = f" with {self.eviction}" if policy else ""
        return f"{self.strategy}{named} at {self.cache_size:.0%} ({self.cache_entries:,})"

    @property
    def size_cell(self) -> str:
        """The cache size as the table shows it."""
        if not self.size_enforced:
            return "unbounded"
        return f"{self.cache_size:.0%} ({self.cache_entries:,})"

    def cells(self) -> list[str]:
        """The table row, without the eviction policy (a column of its own, when shown)."""
        run, base = self.replay, self.uncached
        evictions = self.verdict.evictions
        return [
            self.strategy,
            self.size_cell,
            f"{run.hit_ratio:.1%}",
            f"{self.optimal_hit_ratio:.1%}",
            f"{run.queries:,}",
            f"{self.queries_saved:.1%}",
            f"{self.throughput_ratio:.2f}x",
            f"{run.percentile(0.5):.3f} / {base.percentile(0.5):.3f}",
            f"{run.percentile(0.99):.3f} / {base.percentile(0.99):.3f}",
            "n/a" if evictions is None else f"{evictions:,}",
            str(self.verdict.stale),
        ]


# -- the table ------------------------------------------------------------------------


def _columns(results: Sequence[Result]) -> tuple[list[str], list[list[str]], int]:
    """The headers, the rows and how many columns are left-aligned labels; an eviction
    column after the strategy only when some run used a policy other than LRU, so the
    default run's table stays as it was."""
    headers, rows = list(_HEADERS), [result.cells() for result in results]
    if not any(result.compared for result in results):
        return headers, rows, 2
    headers.insert(1, "eviction")
    for row, result in zip(rows, results, strict=True):
        row.insert(1, result.eviction or "n/a")
    return headers, rows, 3


def print_report(title: str, results: Sequence[Result], notes: Sequence[str], out: TextIO) -> None:
    """The table, then the notes that say how to read it."""
    headers, rows, labels = _columns(results)
    try:
        from rich.console import Console  # noqa: PLC0415 - optional (the bench extra)
        from rich.table import Table  # noqa: PLC0415
    except ImportError:
        out.write(_plain(title, headers, rows, notes, labels))
        return
    table = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < labels else "right")
    for row in rows:
        table.add_row(*row)
    # Wide enough for every column unwrapped, also when writing to a file or pipe.
    console = Console(file=out, width=max(140 + 12 * (labels - 2), Console(file=out).width))
    console.print(table)
    for note in notes:
        console.print(note, markup=False, highlight=False)


def _plain(
    title: str, headers: list[str], rows: list[list[str]], notes: Sequence[str], labels: int
) -> str:
    table = [headers, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = [title]
    for row in table:
        lines.append(
            "  ".join(
                cell.ljust(w) if i < labels else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join([*lines, *notes, ""])


def title(config: BenchConfig) -> str:
    """What was measured, in one line above the table."""
    scans = f" + {config.scans} {'scan' if config.scans == 1 else 'scans'}" if config.scans else ""
    return (
        f"cachekit bench: {config.db_label} + {config.backend.label}, {config.rows:,} rows, "
        f"{config.requests:,} requests{scans}, zipf {config.zipf:g}, "
        f"{config.write_ratio:.0%} writes, {config.workers} workers, seed {config.seed}"
    )


def notes(
    config: BenchConfig, uncached: Replay, results: Sequence[Result], *, load_average: float
) -> list[str]:
    """How to read the table, and what it says where it is easy to miss."""
    lines = [
        f"uncached: {uncached.throughput:,.0f} requests/s; p50 of a read "
        f"{uncached.percentile(0.5, 'miss'):.3f} ms, of a write "
        f"{uncached.percentile(0.5, 'write'):.3f} ms; {uncached.queries:,} DB queries.",
        "hit ratio: reads answered without a DB query. optimal: Belady's MIN on the same trace, "
        "the most any cache of that size can hit (it knows the future).",
        "DB queries: SQL statements; a product load is 2 (the row, then its latest "
        f"{LATEST_REVIEWS} reviews), a write is 1. saved: against the uncached replay. "
        "throughput: cached over uncached. p50/p99: cached / uncached, per request.",
    ]
    if "write-through" in config.strategies and config.write_ratio > 0:
        lines.append(
            "write-through reloads every product it writes (2 more statements), read again or "
            "not: it buys entries that are fresh after a write, not fewer queries."
        )
    lines += _eviction_notes(config)
    if not config.backend.bounded:
        lines.append(
            f"cache size: a percentage cannot bound a {config.backend.kind} server, so each "
            "strategy ran once, unbounded (the server's own memory limit applies), in a fresh "
            "namespace deleted afterwards; the optimum is then that of a cache holding every row."
        )
    lines += verdicts(results)
    lines += _noise(config, load_average)
    lines.append(_staleness(results))
    errors = sum(r.verdict.stats.errors for r in results)
    if errors:
        lines.append(f"the cache reported {errors:,} errors; those reads fell through to the DB.")
    return lines


def _eviction_notes(config: BenchConfig) -> list[str]:
    """What the policies and the scans are, when the run has them."""
    lines = []
    if config.evictions != ("lru",):
        lines.append(
            "eviction: the in-process cache's policy. lru evicts the entry read least "
            "recently; sieve sweeps from the oldest entry and evicts the first one not read "
            "since the sweep last passed it; s3fifo admits new entries to a small queue and "
            "moves to its main queue only those read again there (or evicted recently)."
        )
    if config.scans:
        lines.append(
            f"scans: {config.scans} x {config.rows:,} one-time reads of every row, in id order, "
            "mixed into the Zipf requests (an export); they count as reads, so every policy's "
            "hit ratio and the optimum drop, and a policy that lets a scan flush the hot "
            "rows drops most."
        )
    return lines


def _noise(config: BenchConfig, load_average: float) -> list[str]:
    """What makes throughput ratios move between runs, when it applies."""
    cpus = os.cpu_count() or 1
    lines = []
    if config.workers > cpus:
        lines.append(
            f"{config.workers} worker threads on {cpus} cores: throughput includes contention "
            "for the cores and the GIL and varies between runs more than p50 latency does; "
            "--workers 1 measures the cost per request alone."
        )
    if load_average >= cpus:
        lines.append(
            f"the machine was busy when the run began (load average {load_average:.1f} on "
            f"{cpus} cores): timings are noisier than usual."
        )
    return lines


def _staleness(results: Sequence[Result]) -> str:
    checked = sum(r.verdict.checked for r in results)
    stale = sum(r.verdict.stale for r in results)
    if stale:
        return f"STALE: {stale:,} of {checked:,} cached entries differ from the database."
    return f"verified {checked:,} cached entries against the database after each run: 0 stale."


def verdicts(results: Sequence[Result]) -> list[str]:
    """Where caching did not pay, said plainly and with the latencies that explain it;
    or that it paid everywhere.

    A run does not pay if it served fewer requests per second than the database alone,
    and only half pays if the median request got slower, whatever the throughput.
    Runs are named with their eviction policy when some policy is not LRU.
    """
    policy = any(r.compared for r in results)
    lines = [_loss(r, policy) for r in results if r.throughput_ratio < 1]
    lines += [
        _slower(r, policy)
        for r in results
        if r.throughput_ratio >= 1 and r.replay.percentile(0.5) > r.uncached.percentile(0.5)
    ]
    if not lines and results:
        worst = min(results, key=lambda r: r.throughput_ratio)
        lines.append(
            f"caching paid in every run: the least, {worst.label(policy=policy)}, "
            f"still ran at {worst.throughput_ratio:.2f}x the uncached throughput."
        )
    return lines


def _why(r: Result) -> str:
    hit, miss = r.replay.percentile(0.5, "hit"), r.replay.percentile(0.5, "miss")
    query = r.uncached.percentile(0.5, "miss")
    if hit >= query:
        return f"a hit ({hit:.3f} ms) is no cheaper than the query itself ({query:.3f} ms) here"
    return (
        f"a hit takes {hit:.3f} ms against {query:.3f} ms for the query, but a miss takes "
        f"{miss:.3f} ms (lookup, lease and fill around the query) and "
        f"{1 - r.replay.hit_ratio:.0%} of reads missed"
    )


def _loss(r: Result, policy: bool) -> str:
    return (
        f"caching does NOT pay for {r.label(policy=policy)}: {r.throughput_ratio:.2f}x "
        f"the uncached throughput; {_why(r)}."
    )


def _slower(r: Result, policy: bool) -> str:
    return (
        f"{r.label(policy=policy)} ran at {r.throughput_ratio:.2f}x the uncached "
        f"throughput, but its median request got slower ({r.replay.percentile(0.5):.3f} ms "
        f"against {r.uncached.percentile(0.5):.3f} ms): {_why(r)}."
    )


# -- files ----------------------------------------------------------------------------


def describe(
    config: BenchConfig, tables: list[str], seconds: float, *, load_average: float
) -> dict[str, Any]:
    """The ``config`` object of the JSON document: the settings and the machine."""
    return {
        "db": config.db_label,
        "backend": config.backend.label,
        "rows": config.rows,
        "requests": config.requests,
        "zipf": config.zipf,
        "write_ratio": config.write_ratio,
        "scans": config.scans,
        "cache_sizes": list(config.run_sizes),
        "size_enforced": config.backend.bounded,
        "strategies": list(config.strategies),
        "evictions": list(config.evictions) if config.backend.bounded else None,
        "workers": config.workers,
        "seed": config.seed,
        "tables": tables,
        "kept": config.keep,
        "latest_reviews": LATEST_REVIEWS,
        "seconds": round(seconds, 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": round(load_average, 2),
    }


def write_json(path: Path, config: dict[str, Any], results: Sequence[Result]) -> None:
    """``{"config": {...}, "results": [...]}``, one result per strategy, eviction
    policy and size."""
    document = {"config": config, "results": [r.as_dict() for r in results]}
    try:
        path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise BenchError(f"cannot write {path}: {exc.strerror or exc}") from exc
