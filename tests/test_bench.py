"""`cachekit bench`: the workload, the offline optimum, the CLI end to end, its errors."""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import random
import re
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from tests.conftest import require

if TYPE_CHECKING:
    from cachekit.bench.optimal import WriteMode

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
PEERS = Path(__file__).resolve().parent.parent / "benchmarks" / "peers.py"
ROWS, REQUESTS = 300, 3000
MODES: dict[str, WriteMode] = {
    "cache-aside": "invalidate",
    "read-through": "invalidate",
    "write-through": "refill",
}
# Statements per write: the UPDATE, and for write-through the reload (product + reviews).
WRITE_QUERIES = {"cache-aside": 1, "read-through": 1, "write-through": 3}


def _has_pluggable_eviction() -> bool:
    from cachekit.backends.memory import MemoryBackend

    return "eviction" in inspect.signature(MemoryBackend).parameters


# Only the tests that run SIEVE or S3-FIFO skip, and only while MemoryBackend has no
# eviction= parameter (issue 13 adds it); everything else runs LRU through the same code.
needs_eviction = pytest.mark.skipif(
    not _has_pluggable_eviction(), reason="MemoryBackend has no eviction= parameter yet"
)


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The PostgreSQL URL, once a connection works; skipped locally, failed under CI."""
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=2).close()
    except psycopg.Error as exc:
        require("PostgreSQL on 127.0.0.1:5432", False, str(exc).strip().splitlines()[0])
    return POSTGRES_URL


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``cachekit bench ARGS`` in process: (exit status, stdout, stderr without progress)."""
    from cachekit.cli import main

    try:
        code = main(["bench", *args])
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    err = "".join(line for line in err.splitlines(True) if not line.startswith("==> "))
    return code, out, err


def bench_json(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> dict[str, Any]:
    path = tmp_path / "bench.json"
    code, out, err = run_cli(capsys, *args, "--json", str(path))
    assert code == 0, f"exit {code}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert "0 stale" in out
    return dict(json.loads(path.read_text(encoding="utf-8")))


def trace_of(config: dict[str, Any]) -> Any:
    """The trace a bench run replayed, rebuilt from its JSON config."""
    from cachekit.bench.workload import make_trace

    return make_trace(
        rows=config["rows"],
        requests=config["requests"],
        zipf=config["zipf"],
        write_ratio=config["write_ratio"],
        seed=config["seed"],
        scans=config["scans"],
    )


def check_against_lru(document: dict[str, Any], *, tolerance: float) -> None:
    """Each result's hit ratio is the LRU simulation's, and its query counts follow."""
    from cachekit.bench.optimal import lru_hit_ratio

    trace = trace_of(document["config"])
    writes, reads = sum(trace.writes), trace.reads
    for result in document["results"]:
        assert result["eviction"] in {"lru", None}, "the simulation is of LRU"
        strategy = result["strategy"]
        size = result["cache_entries"]
        expected = lru_hit_ratio(trace.ids, trace.writes, size, MODES[strategy])
        assert result["hit_ratio"] == pytest.approx(expected, abs=tolerance), result
        assert result["hit_ratio"] <= result["optimal_hit_ratio"] + tolerance
        assert result["stale"] == 0
        assert result["db_queries_uncached"] == 2 * reads + writes
        misses = round((1 - result["hit_ratio"]) * reads)
        queries = 2 * misses + WRITE_QUERIES[strategy] * writes
        assert result["db_queries"] == pytest.approx(queries, rel=tolerance)
        saved = 1 - result["db_queries"] / result["db_queries_uncached"]
        assert result["queries_saved"] == pytest.approx(saved, abs=1e-5)


# -- the workload -----------------------------------------------------------------------


def test_zipf_is_deterministic_for_a_seed() -> None:
    from cachekit.bench.workload import ZipfSampler, make_trace

    def draw(seed: int) -> list[int]:
        sampler = ZipfSampler(1000, 0.99, random.Random(seed))
        return [sampler.sample() for _ in range(500)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    first = make_trace(rows=100, requests=1000, zipf=0.99, write_ratio=0.1, seed=3)
    assert first == make_trace(rows=100, requests=1000, zipf=0.99, write_ratio=0.1, seed=3)
    assert 50 < sum(first.writes) < 150


def test_zipf_is_skewed_as_the_exponent_says() -> None:
    from cachekit.bench.workload import ZipfSampler

    n, samples = 1000, 50_000
    sampler = ZipfSampler(n, 1.0, random.Random(1))
    counts = Counter(sampler.sample() for _ in range(samples))
    harmonic = sum(1 / k for k in range(1, n + 1))
    top = sampler.id_of_rank(0)
    # The most popular id gets 1/H(n) of the draws, the 10th 1/(10 H(n)).
    assert counts[top] / samples == pytest.approx(1 / harmonic, rel=0.05)
    assert counts[sampler.id_of_rank(9)] / samples == pytest.approx(0.1 / harmonic, rel=0.15)
    assert set(counts) <= set(range(1, n + 1))


def test_zipf_exponent_zero_is_uniform() -> None:
    from cachekit.bench.workload import ZipfSampler

    sampler = ZipfSampler(10, 0.0, random.Random(1))
    counts = Counter(sampler.sample() for _ in range(20_000))
    assert sorted(counts) == list(range(1, 11))
    assert max(counts.values()) / min(counts.values()) < 1.15


def test_the_default_trace_is_the_one_before_scans_existed() -> None:
    from cachekit.bench.workload import make_trace

    # The digest of make_trace's output before the scans option was added: existing
    # callers (and their recorded hit ratios) must get the very same requests.
    trace = make_trace(rows=1000, requests=5000, zipf=0.99, write_ratio=0.05, seed=1)
    digest = hashlib.sha256(repr((trace.ids, trace.writes)).encode()).hexdigest()
    assert digest == "f2dc6e5e35b420e37019274f48644c1ab48b42dfb06c1e8ef2021db36e09ba32"
    again = make_trace(rows=1000, requests=5000, zipf=0.99, write_ratio=0.05, seed=1, scans=0)
    assert again == trace


def test_scans_read_every_row_once_per_window_spread_through_it() -> None:
    from cachekit.bench.workload import make_trace

    rows, requests, scans = 40, 300, 3
    # Every Zipf request a write: then the reads are exactly the scans' reads.
    base = make_trace(rows=rows, requests=requests, zipf=0.99, write_ratio=1.0, seed=4)
    trace = make_trace(
        rows=rows, requests=requests, zipf=0.99, write_ratio=1.0, seed=4, scans=scans
    )
    assert len(trace) == requests + scans * rows
    assert trace.reads == scans * rows
    assert [i for i, w in zip(trace.ids, trace.writes, strict=True) if w] == base.ids
    reads = [i for i, w in enumerate(trace.writes) if not w]
    assert [trace.ids[i] for i in reads] == list(range(1, rows + 1)) * scans
    window = len(trace) // scans  # 140: 100 Zipf requests and one scan of 40 rows
    for k in range(scans):
        positions = reads[k * rows : (k + 1) * rows]
        assert k * window <= positions[0] and positions[-1] < (k + 1) * window
        # Spread evenly: 2.5 Zipf requests per scan read, never a run of 4.
        assert max(b - a for a, b in itertools.pairwise(positions)) <= 4
        assert positions[0] <= k * window + 3 and positions[-1] >= (k + 1) * window - 4


def test_scans_add_reads_and_keep_the_zipf_requests_in_order() -> None:
    from cachekit.bench.workload import make_trace

    base = make_trace(rows=100, requests=2000, zipf=0.99, write_ratio=0.05, seed=2)
    trace = make_trace(rows=100, requests=2000, zipf=0.99, write_ratio=0.05, seed=2, scans=2)
    added = Counter(trace.ids)
    added.subtract(base.ids)
    assert added == Counter({row: 2 for row in range(1, 101)})
    assert sum(trace.writes) == sum(base.writes)
    assert trace.reads == base.reads + 200
    remaining = iter(zip(trace.ids, trace.writes, strict=True))
    assert all(request in remaining for request in zip(base.ids, base.writes, strict=True))
    with pytest.raises(ValueError, match="scans"):
        make_trace(rows=10, requests=10, zipf=1.0, write_ratio=0.0, seed=1, scans=-1)


# -- the offline optimum -----------------------------------------------------------------


def test_belady_on_a_hand_computed_trace() -> None:
    from cachekit.bench.optimal import belady_hit_ratio, lru_hit_ratio

    ids = [1, 2, 3, 1, 2, 4, 1, 2, 3]
    reads = [False] * len(ids)
    # Size 2: 1 and 2 stay; 3 (next read at 8) and 4 (never again) are not admitted,
    # so the reads at 3, 4, 6 and 7 hit. LRU, evicting what comes back next, hits none.
    assert belady_hit_ratio(ids, reads, 2) == pytest.approx(4 / 9)
    assert lru_hit_ratio(ids, reads, 2) == 0.0
    # With room for everything only the first read of each id misses.
    assert belady_hit_ratio(ids, reads, 4) == pytest.approx(5 / 9)
    assert lru_hit_ratio(ids, reads, 4) == pytest.approx(5 / 9)


def test_belady_and_lru_account_for_writes() -> None:
    from cachekit.bench.optimal import belady_hit_ratio, lru_hit_ratio, next_reads

    ids, writes = [1, 1, 1], [False, True, False]
    assert next_reads(ids, writes) == [3, 2, 5]  # the write voids the first read's value
    # Invalidation: the write empties the cache, so both reads miss.
    assert belady_hit_ratio(ids, writes, 1, "invalidate") == 0.0
    assert lru_hit_ratio(ids, writes, 1, "invalidate") == 0.0
    # Refill (write-through): the write reloads the entry and the second read hits.
    assert belady_hit_ratio(ids, writes, 1, "refill") == 0.5
    assert lru_hit_ratio(ids, writes, 1, "refill") == 0.5


def test_lru_by_hand() -> None:
    from cachekit.bench.optimal import lru_hit_ratio

    # 1 m, 2 m, 1 h, 3 m (evicts 2), 1 h, 2 m
    assert lru_hit_ratio([1, 2, 1, 3, 1, 2], [False] * 6, 2) == pytest.approx(2 / 6)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_belady_bounds_lru(seed: int) -> None:
    from cachekit.bench.optimal import belady_hit_ratio, lru_hit_ratio
    from cachekit.bench.workload import make_trace

    trace = make_trace(rows=200, requests=3000, zipf=0.8, write_ratio=0.05, seed=seed)
    for size in (1, 5, 20, 80, 200):
        for mode in MODES.values():
            optimum = belady_hit_ratio(trace.ids, trace.writes, size, mode)
            lru = lru_hit_ratio(trace.ids, trace.writes, size, mode)
            assert lru <= optimum + 1e-12


# -- the command, end to end ---------------------------------------------------------------


def test_bench_on_sqlite_and_memory_matches_the_lru_simulation(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    document = bench_json(
        capsys,
        tmp_path,
        *("--rows", str(ROWS), "--requests", str(REQUESTS), "--workers", "1"),
        *("--cache-size", "2%,10%,50%", "--seed", "5"),
    )
    assert document["config"]["size_enforced"] is True
    results = document["results"]
    assert [(r["strategy"], r["cache_size"]) for r in results] == [
        (strategy, size)
        for strategy in ("cache-aside", "read-through", "write-through")
        for size in (0.02, 0.1, 0.5)
    ]
    for result in results:
        assert result["evictions"] > 0
        assert 0 < result["hit_ratio"] < 1
    # One worker replays the trace in order, so the LRU simulation is exact.
    check_against_lru(document, tolerance=1e-6)


def test_bench_with_threads_keeps_its_accounting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Three threads replay the trace in an order the scheduler picks, so the hit ratio
    is not the sequential simulation's (one worker checks that exactly); what holds under
    every interleaving is checked here: each read is a hit or a miss of two queries, every
    distinct row misses at least once, nothing is stale, and the cache stays bounded."""
    document = bench_json(
        capsys,
        tmp_path,
        *("--rows", str(ROWS), "--requests", str(REQUESTS), "--workers", "3"),
        *("--cache-size", "10%", "--write-ratio", "0"),
    )
    trace = trace_of(document["config"])
    distinct = len(set(trace.ids))
    assert document["results"]
    for result in document["results"]:
        assert result["reads"] == trace.reads == REQUESTS, result
        assert result["stale"] == 0, result
        assert result["db_queries_uncached"] == 2 * trace.reads, result
        assert result["db_queries"] % 2 == 0, "a miss reads the product and its reviews"
        misses = result["db_queries"] // 2
        assert distinct <= misses <= trace.reads, result
        assert result["hit_ratio"] == pytest.approx(1 - misses / trace.reads, abs=1e-6)
        assert result["cache_entries"] == round(0.1 * ROWS), result


def test_bench_with_scans_and_lru_named_matches_the_lru_simulation(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    document = bench_json(
        capsys,
        tmp_path,
        *("--rows", str(ROWS), "--requests", str(REQUESTS), "--workers", "1", "--scan", "2"),
        *("--cache-size", "5%,25%", "--strategy", "cache-aside,write-through"),
        *("--eviction", "lru"),
    )
    config = document["config"]
    assert config["scans"] == 2
    assert config["evictions"] == ["lru"]
    assert [(r["strategy"], r["eviction"], r["cache_size"]) for r in document["results"]] == [
        (strategy, "lru", size)
        for strategy in ("cache-aside", "write-through")
        for size in (0.05, 0.25)
    ]
    for result in document["results"]:
        assert result["requests"] == REQUESTS + 2 * ROWS
    check_against_lru(document, tolerance=1e-6)


def test_the_default_table_has_no_eviction_column(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        capsys,
        "--rows",
        "40",
        "--requests",
        "200",
        "--cache-size",
        "10%",
        "--strategy",
        "read-through",
    )
    assert code == 0, err
    assert "hit ratio" in out
    # "evictions" (the count) stays; a column or note about the policy does not appear.
    assert not re.search(r"\beviction\b", out), out


def test_an_eviction_policy_for_a_server_fails_before_any_work(tmp_path: Path) -> None:
    from cachekit.bench.config import BenchConfig, BenchError, parse_backend_url
    from cachekit.cli import bench

    config = BenchConfig(
        db=None,
        backend=parse_backend_url("redis://127.0.0.1:1/0"),  # nothing listens there
        rows=10,
        requests=10,
        zipf=1.0,
        write_ratio=0.0,
        cache_sizes=(0.5,),
        strategies=("cache-aside",),
        workers=1,
        seed=1,
        evictions=("lru", "sieve"),
    )
    # The policy is refused first: not "cannot reach the redis cache".
    with pytest.raises(BenchError, match=r"in-process cache .* only"):
        bench(config, json_path=tmp_path / "x.json", plot_path=None, out=None)
    assert not (tmp_path / "x.json").exists()


def _result(strategy: str, eviction: str, size: float, hits: int) -> Any:
    """A made-up run of 100 reads, for the report and the plot on their own."""
    from cachekit.backends.memory import MemoryBackend
    from cachekit.bench.report import Result
    from cachekit.bench.runner import Replay, Verdict
    from cachekit.cache import Cache

    def run(hit: int, seconds: float) -> Replay:
        hit_ms, miss_ms = [0.000002] * hit, [0.00002] * (100 - hit)
        return Replay(hit_ms, miss_ms, [], 2 * (100 - hit), seconds, sorted(hit_ms + miss_ms))

    verdict = Verdict(0, 0, Cache(MemoryBackend()).stats(), 5)
    # Half the uncached throughput, so the report says each run did not pay.
    cached, uncached = run(hits, 0.02), run(0, 0.01)
    return Result(strategy, eviction, size, int(size * 1000), True, 0.9, cached, uncached, verdict)  # type: ignore[arg-type]


def test_report_and_plot_show_each_policy(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import io

    from matplotlib.figure import Figure

    from cachekit.bench.plot import _plot_hits, write_plot
    from cachekit.bench.report import print_report, verdicts, write_json

    results = [
        _result("cache-aside", policy, size, hits)
        for policy, hits in (("lru", 40), ("sieve", 50), ("s3fifo", 55))
        for size in (0.01, 0.1)
    ]
    out = io.StringIO()
    print_report("title", results, [], out)
    table = out.getvalue()
    assert re.search(r"strategy\W+eviction\W+cache size", table), table
    for policy, ratio in (("lru", "40.0%"), ("sieve", "50.0%"), ("s3fifo", "55.0%")):
        assert re.search(rf"cache-aside\W+{policy}\W+1% \(10\)\W+{re.escape(ratio)}", table), table
    # Every run is named with its policy, LRU's too, once several are compared.
    lines = verdicts(results)
    assert len(lines) == len(results)
    for policy in ("lru", "sieve", "s3fifo"):
        assert any(f"cache-aside with {policy} at 1% (10)" in line for line in lines), lines
    write_json(tmp_path / "r.json", {}, results)
    rows = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["results"]
    assert [(r["eviction"], r["hit_ratio"], r["queries_saved"]) for r in rows] == [
        ("lru", 0.4, 0.4),
        ("lru", 0.4, 0.4),
        ("sieve", 0.5, 0.5),
        ("sieve", 0.5, 0.5),
        ("s3fifo", 0.55, 0.55),
        ("s3fifo", 0.55, 0.55),
    ]
    ax = Figure().subplots()
    _plot_hits(ax, results)
    labels = ax.get_legend_handles_labels()[1]
    # One line per policy; their optimum is the same, so one dashed line for it.
    assert labels == [
        "cache-aside, lru",
        "cache-aside, sieve",
        "cache-aside, s3fifo",
        "optimum (Belady), cache-aside",
    ]
    write_plot(tmp_path / "p.png", "title", results)
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


@needs_eviction
def test_bench_compares_policies_and_scans_favour_sieve_and_s3fifo(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plot = tmp_path / "bench.png"
    document = bench_json(
        capsys,
        tmp_path,
        *("--rows", "1000", "--requests", "6000", "--workers", "1", "--scan", "2"),
        *("--cache-size", "5%,25%", "--strategy", "cache-aside"),
        *("--eviction", "lru,sieve,s3fifo", "--plot", str(plot)),
    )
    assert document["config"]["evictions"] == ["lru", "sieve", "s3fifo"]
    results = {(r["eviction"], r["cache_size"]): r for r in document["results"]}
    assert list(results) == [
        (policy, size) for policy in ("lru", "sieve", "s3fifo") for size in (0.05, 0.25)
    ]
    for (_, size), result in results.items():
        assert result["optimal_hit_ratio"] == results["lru", size]["optimal_hit_ratio"]
        assert result["hit_ratio"] <= result["optimal_hit_ratio"]
        assert result["evictions"] > 0
        assert result["stale"] == 0
        saved = 1 - result["db_queries"] / result["db_queries_uncached"]
        assert result["queries_saved"] == pytest.approx(saved, abs=1e-5)
    # The scans flush LRU's hot rows; SIEVE and S3-FIFO evict the once-read rows first.
    for policy in ("sieve", "s3fifo"):
        assert results[policy, 0.05]["hit_ratio"] > results["lru", 0.05]["hit_ratio"] + 0.02
    check_against_lru(
        {**document, "results": [r for r in document["results"] if r["eviction"] == "lru"]},
        tolerance=1e-6,
    )
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.postgres
@pytest.mark.redis
def test_bench_on_postgresql_and_redis(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, postgres_server: str, redis_server: str
) -> None:
    document = bench_json(
        capsys,
        tmp_path,
        *("--db", postgres_server, "--backend", redis_server),
        *("--rows", str(ROWS), "--requests", str(REQUESTS), "--workers", "1"),
    )
    assert document["config"]["size_enforced"] is False
    assert document["config"]["evictions"] is None
    assert [r["strategy"] for r in document["results"]] == [
        "cache-aside",
        "read-through",
        "write-through",
    ]
    for result in document["results"]:
        assert result["evictions"] is None
        assert result["eviction"] is None
        assert result["cache_errors"] == 0
    # Unbounded: the simulation holds every row, so only first reads and writes miss; one
    # worker replays the trace in order, so the figures are exact (threads: see above).
    check_against_lru(document, tolerance=1e-6)
    with psycopg.connect(postgres_server) as conn:
        for table in document["config"]["tables"]:
            found = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
            assert found == (None,), f"{table} was left behind"


def test_bench_touches_nothing_else_in_a_users_sqlite_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER)")
        conn.execute("INSERT INTO orders VALUES (1, 42)")
    conn.close()
    bench_json(
        capsys,
        tmp_path,
        *("--db", f"sqlite:///{path}", "--rows", "50", "--requests", "300"),
        *("--cache-size", "10%", "--strategy", "cache-aside"),
    )
    conn = sqlite3.connect(path)
    try:
        tables = conn.execute("SELECT name FROM sqlite_master").fetchall()
        assert tables == [("orders",)]
        assert conn.execute("SELECT * FROM orders").fetchall() == [(1, 42)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    finally:
        conn.close()


def test_keep_leaves_the_tables(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "kept.db"
    document = bench_json(
        capsys,
        tmp_path,
        *("--db", f"sqlite:///{path}", "--rows", "40", "--requests", "200", "--keep"),
        *("--cache-size", "10%", "--strategy", "read-through"),
    )
    conn = sqlite3.connect(path)
    try:
        products = document["config"]["tables"][0]
        assert products.startswith("cachekit_bench_")
        assert conn.execute(f'SELECT count(*) FROM "{products}"').fetchone() == (40,)  # noqa: S608
    finally:
        conn.close()


def test_python_m_cachekit_writes_the_table_and_the_plot(tmp_path: Path) -> None:
    plot = tmp_path / "bench.png"
    command = [sys.executable, "-m", "cachekit", "bench", "--rows", "60", "--requests", "400"]
    run = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "hit ratio" in run.stdout
    assert "optimal" in run.stdout
    run = subprocess.run(
        [*command, "--cache-size", "5%,50%", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_peers_benchmark_runs_and_the_lrus_agree(tmp_path: Path) -> None:
    results = tmp_path / "peers.json"
    run = subprocess.run(
        [sys.executable, str(PEERS), "--rows", "200", "--requests", "1000", "--json", str(results)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "in-process LRUs agree on loader calls: yes" in run.stdout
    rows = json.loads(results.read_text(encoding="utf-8"))["results"]
    assert {(r["library"], r["backend"]) for r in rows} >= {
        ("cachekit", "in-process"),
        ("cachetools.cached", "in-process"),
        ("dogpile.cache", "in-process"),
    }


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--db", "postgresql://postgres@127.0.0.1:1/test"], "cannot connect to PostgreSQL"),
        (["--db", "sqlite:///no/such/directory/x.db"], "cannot open SQLite database"),
        (["--backend", "redis://127.0.0.1:1/0"], "cannot reach the redis cache"),
        (["--backend", "memcached://127.0.0.1:1"], "cannot reach the memcached cache"),
        (["--db", "mysql://localhost/shop"], "unsupported database URL"),
        (["--db", "sqlite:/x.db"], "malformed database URL"),
        (["--backend", "redis://127.0.0.1:port/0"], "malformed Redis URL"),
        (["--backend", "memcached://127.0.0.1"], "malformed memcached URL"),
        (["--cache-size", "150%"], "above 100%"),
        (["--cache-size", "5"], "must be a percentage"),
        (["--rows", "-5"], "must be a positive number"),
        (["--requests=-1"], "must be a positive number"),
        (["--workers", "0"], "must be a positive number"),
        (["--write-ratio", "1.5"], "between 0 and 1"),
        (["--strategy", "write-behind"], "unknown strategy"),
        (["--eviction", "lru,fifo"], "unknown eviction policy 'fifo'"),
        (["--scan", "-1"], "cannot be negative"),
        (["--scan", "two"], "not a whole number"),
        # Refused before the server is tried: the message is not "cannot reach".
        (["--backend", "redis://127.0.0.1:1/0", "--eviction", "lru"], "in-process cache"),
        (["--backend", "memcached://127.0.0.1:1", "--eviction", "sieve"], "in-process cache"),
    ],
)
def test_bad_input_is_one_line_and_a_failure(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run_cli(capsys, "--rows", "20", "--requests", "50", *args)
    assert code != 0
    assert err.count("\n") == 1, err
    assert err.startswith("cachekit")
    assert "error" in err
    assert message in err
    assert "Traceback" not in err
    assert out == ""


def test_a_password_never_reaches_the_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "--db", "postgresql://app:hunter2@127.0.0.1:1/shop")
    assert code != 0
    assert "hunter2" not in err
    assert "app:***@127.0.0.1:1" in err
