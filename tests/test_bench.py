"""`cachekit bench`: the workload, the offline optimum, the CLI end to end, its errors."""

from __future__ import annotations

import json
import random
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


def check_against_lru(document: dict[str, Any], *, tolerance: float) -> None:
    """Each result's hit ratio is the LRU simulation's, and its query counts follow."""
    from cachekit.bench.optimal import lru_hit_ratio
    from cachekit.bench.workload import make_trace

    config = document["config"]
    trace = make_trace(
        rows=config["rows"],
        requests=config["requests"],
        zipf=config["zipf"],
        write_ratio=config["write_ratio"],
        seed=config["seed"],
    )
    writes, reads = sum(trace.writes), trace.reads
    for result in document["results"]:
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


def test_bench_with_threads_stays_within_two_points_of_lru(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    document = bench_json(
        capsys,
        tmp_path,
        *("--rows", str(ROWS), "--requests", str(REQUESTS), "--workers", "3"),
        *("--cache-size", "10%", "--write-ratio", "0"),
    )
    check_against_lru(document, tolerance=0.02)


@pytest.mark.postgres
@pytest.mark.redis
def test_bench_on_postgresql_and_redis(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, postgres_server: str, redis_server: str
) -> None:
    document = bench_json(
        capsys,
        tmp_path,
        *("--db", postgres_server, "--backend", redis_server),
        *("--rows", str(ROWS), "--requests", str(REQUESTS), "--workers", "2"),
    )
    assert document["config"]["size_enforced"] is False
    assert [r["strategy"] for r in document["results"]] == [
        "cache-aside",
        "read-through",
        "write-through",
    ]
    for result in document["results"]:
        assert result["evictions"] is None
        assert result["cache_errors"] == 0
    # Unbounded: the simulation holds every row, so only first reads and writes miss.
    check_against_lru(document, tolerance=0.02)
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
