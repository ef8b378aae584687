"""`cachekit bench`: the command line, and the run it drives from tables to report.

With no arguments the bench needs nothing but the standard library: a temporary SQLite
file and the in-process backend.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from cachekit.backends.eviction import Eviction
from cachekit.bench import caches
from cachekit.bench.config import (
    EVICTIONS,
    STRATEGIES,
    BenchConfig,
    BenchError,
    Strategy,
    parse_backend_url,
    parse_cache_sizes,
    parse_count,
    parse_db_url,
    parse_evictions,
    parse_exponent,
    parse_fraction,
    parse_scans,
    parse_seed,
    parse_strategies,
)
from cachekit.bench.database import Database
from cachekit.bench.optimal import WriteMode, belady_hit_ratio
from cachekit.bench.outputs import check_outputs
from cachekit.bench.plot import write_plot
from cachekit.bench.progress import phases
from cachekit.bench.report import (
    Result,
    describe,
    notes,
    print_report,
    title,
    write_json,
)
from cachekit.bench.runner import Replay, key_of, operations, replay, uncached_operations, verify
from cachekit.bench.tables import run_tables
from cachekit.bench.workload import Trace, make_trace
from cachekit.exceptions import CacheError

__all__ = ["main"]

# Sized so that a run of the defaults takes about 25 s on a 2-core machine; 100,000
# rows and 200,000 requests take minutes there, and are two flags away.
DEFAULT_ROWS = 20_000
DEFAULT_REQUESTS = 50_000
Start = Callable[[str, int], Callable[[int], None]]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, as every other bench error is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` that reports a :class:`BenchError` as a usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except BenchError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__.removeprefix("parse_").removeprefix("_")
    return convert


def _version() -> str:
    """The installed distribution's version, or ``unknown`` when run from a bare checkout."""
    try:
        return importlib.metadata.version("cachekit-layer")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _parser() -> _Parser:
    parser = _Parser(prog="cachekit", description="cachekit's command line.")
    parser.add_argument("--version", action="version", version=f"cachekit {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    bench = commands.add_parser(
        "bench",
        help="measure hit ratio and database load saved on a replayed workload",
        description="Create a products-with-reviews schema, replay a seeded Zipf workload "
        "uncached and through cachekit, and report hit ratio (against Belady's optimum), "
        "database queries saved, throughput and latency. With no arguments: a temporary "
        "SQLite file and the in-process cache.",
    )
    _add_workload_options(bench)
    _add_run_options(bench)
    return parser


def _add_workload_options(bench: argparse.ArgumentParser) -> None:
    """Where to run and what to replay."""
    add = bench.add_argument
    add(
        "--db",
        type=_checked(parse_db_url),
        help="sqlite:///FILE or postgresql://USER@HOST:PORT/DB (default: a temporary SQLite file)",
    )
    add(
        "--backend",
        type=_checked(parse_backend_url),
        default=parse_backend_url("memory"),
        help="memory (default), redis://HOST:PORT/DB or memcached://HOST:PORT[,HOST:PORT...]",
    )
    add(
        "--rows",
        type=_checked(parse_count),
        default=DEFAULT_ROWS,
        help=f"products in the table (default {DEFAULT_ROWS:,}: small enough that the defaults"
        " finish in well under a minute on 2 cores)",
    )
    add(
        "--requests",
        type=_checked(parse_count),
        default=DEFAULT_REQUESTS,
        help=f"requests in the trace (default {DEFAULT_REQUESTS:,}; try 200000)",
    )
    add(
        "--zipf",
        type=_checked(parse_exponent),
        default=0.99,
        help="skew of the Zipf popularity, 0 = uniform (default 0.99)",
    )
    add(
        "--write-ratio",
        type=_checked(parse_fraction),
        default=0.05,
        help="share of requests that update a product (default 0.05)",
    )
    add(
        "--scan",
        type=_checked(parse_scans),
        default=0,
        metavar="N",
        help="mix N one-time scans of every row (an export) into the requests: the Zipf "
        "requests are cut into N windows, each with one scan spread evenly through it, "
        "adding N x rows reads (default 0)",
    )


def _add_run_options(bench: argparse.ArgumentParser) -> None:
    """How to run it and where the results go."""
    add = bench.add_argument
    add(
        "--cache-size",
        type=_checked(parse_cache_sizes),
        default=parse_cache_sizes("1%,5%,10%,25%"),
        help="cache sizes as percentages of the rows (default 1%%,5%%,10%%,25%%);"
        " they bound the in-process cache only",
    )
    add(
        "--strategy",
        type=_checked(parse_strategies),
        default=STRATEGIES,
        help=f"comma-separated, from {','.join(STRATEGIES)} (default: all)",
    )
    add(
        "--eviction",
        type=_checked(parse_evictions),
        help=f"the in-process cache's eviction policies to compare, comma-separated, from "
        f"{','.join(EVICTIONS)} (default lru); only with --backend memory",
    )
    add(
        "--workers",
        type=_checked(parse_count),
        default=4,
        help="threads replaying the trace (default 4)",
    )
    add(
        "--seed",
        type=_checked(parse_seed),
        default=1,
        help="seed of the trace and the data (default 1)",
    )
    add("--json", type=Path, metavar="FILE", help="write the results as JSON")
    add(
        "--plot",
        type=Path,
        metavar="FILE",
        help="write a plot: PNG, or another format matplotlib writes, by the extension"
        " (needs matplotlib: the bench extra)",
    )
    add("--keep", action="store_true", help="keep the bench's tables (and a temporary SQLite file)")


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: ``cachekit bench [options]``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.eviction is not None and not args.backend.bounded:
        # A usage error like argparse's own, raised before any work: the policy is the
        # in-process cache's, and a server's is not ours to choose.
        parser.exit(
            2,
            f"cachekit bench: error: --eviction applies to the in-process cache (--backend "
            f"memory) only; a {args.backend.kind} server evicts by its own policy (see --help)\n",
        )
    config = BenchConfig(
        db=args.db,
        backend=args.backend,
        rows=args.rows,
        requests=args.requests,
        zipf=args.zipf,
        write_ratio=args.write_ratio,
        cache_sizes=args.cache_size,
        strategies=args.strategy,
        workers=args.workers,
        seed=args.seed,
        keep=args.keep,
        evictions=args.eviction or ("lru",),
        scans=args.scan,
    )
    try:
        return bench(config, json_path=args.json, plot_path=args.plot, out=sys.stdout)
    except (BenchError, CacheError) as exc:
        print(f"cachekit bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cachekit bench: interrupted", file=sys.stderr)
        return 130


def bench(config: BenchConfig, *, json_path: Path | None, plot_path: Path | None, out: Any) -> int:
    """Run the bench and report; returns 1 if a cached entry was stale, else 0.

    Raises:
        BenchError: bad input or an unreachable database or cache server.
    """
    began = time.perf_counter()
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    # Every check that can fail comes before the work: the outputs, the cache server,
    # then the database (its driver, its connection), which the run then goes on using.
    config.check()
    check_outputs(json_path, plot_path)
    if config.backend.kind != "memory":
        caches.check_reachable(config.backend)
    with run_tables(config, out) as db:
        trace = make_trace(
            rows=config.rows,
            requests=config.requests,
            zipf=config.zipf,
            write_ratio=config.write_ratio,
            seed=config.seed,
            scans=config.scans,
        )
        tables, uncached, results = _measure(config, db, trace)
    seconds = time.perf_counter() - began
    lines = notes(config, uncached, results, load_average=load_average)
    print_report(title(config), results, lines, out)
    if json_path is not None:
        summary = describe(config, tables, seconds, load_average=load_average)
        write_json(json_path, summary, results)
    if plot_path is not None:
        write_plot(plot_path, title(config), results)
    return 1 if any(r.verdict.stale for r in results) else 0


def _measure(
    config: BenchConfig, db: Database, trace: Trace
) -> tuple[list[str], Replay, list[Result]]:
    """Fill the tables, replay uncached, then each strategy with each eviction policy at
    each size; returns the tables' names, the uncached replay and the results."""
    with phases() as start:
        advance = start("creating and filling the tables", config.rows)
        db.create(config.rows, seed=config.seed, advance=advance)
        update = start("replaying the trace uncached", len(trace))
        ops = uncached_operations(db, trace)
        uncached = replay(trace, db, ops, workers=config.workers, progress=update)
        optima = _optima(config, trace, start)
        results = [
            _run(
                config,
                strategy=strategy,
                eviction=eviction,
                size=size,
                trace=trace,
                db=db,
                uncached=uncached,
                optimum=optima[strategy, size],
                start=start,
            )
            for strategy in config.strategies
            for eviction in config.evictions
            for size in config.run_sizes
        ]
    return [db.products, db.reviews], uncached, results


def _run(
    config: BenchConfig,
    *,
    strategy: Strategy,
    eviction: Eviction,
    size: float,
    trace: Trace,
    db: Database,
    uncached: Replay,
    optimum: float,
    start: Start,
) -> Result:
    """One strategy with one policy at one size: replay through a fresh cache, verify
    it, clean it up."""
    entries = _entries(config, size)
    bounded = config.backend.bounded
    policy = f" {eviction}" if config.evictions != ("lru",) else ""
    label = f"{strategy}{policy} {size:.0%}" if bounded else strategy
    cache = caches.open_cache(
        config.backend, entries=entries, label=f"{strategy}-{entries}", eviction=eviction
    )
    try:
        ops = operations(strategy, cache, db, trace)
        run = replay(
            trace, db, ops, workers=config.workers, progress=start(f"replaying {label}", len(trace))
        )
        verdict = verify(cache, db, trace.ids)
    finally:
        caches.forget(cache, (key_of(i) for i in set(trace.ids)))
    return Result(
        strategy,
        eviction if bounded else None,
        size,
        entries,
        bounded,
        optimum,
        run,
        uncached,
        verdict,
    )


def _optima(config: BenchConfig, trace: Trace, start: Start) -> dict[tuple[str, float], float]:
    """Belady's hit ratio for every run; cache-aside and read-through share theirs."""
    runs = [(strategy, size) for strategy in config.strategies for size in config.run_sizes]
    update = start("computing Belady's optimum", len(runs))
    memo: dict[tuple[str, int], float] = {}
    optima: dict[tuple[str, float], float] = {}
    for done, (strategy, size) in enumerate(runs, 1):
        mode: WriteMode = "refill" if strategy == "write-through" else "invalidate"
        entries = _entries(config, size)
        if (mode, entries) not in memo:
            memo[mode, entries] = belady_hit_ratio(trace.ids, trace.writes, entries, mode)
        optima[strategy, size] = memo[mode, entries]
        update(done)
    return optima


def _entries(config: BenchConfig, size: float) -> int:
    return max(1, round(size * config.rows))
