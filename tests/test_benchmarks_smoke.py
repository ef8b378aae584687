"""The overhead benchmarks run to the end and print every section (timings are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "overhead.py"
SECTIONS = [
    "## in-process decorated hit",
    "## memory: get_many(100) vs 100 single gets",
    "## memory miss: get_or_load on a new key, lease vs naive",
    "## redis hit",
    "## redis: get_many(100) vs 100 single gets",
    "## redis miss: get_or_load on a new key, lease vs naive",
    "## memcached hit",
    "## memcached: get_many(100) vs 100 single gets",
    "## memcached miss: get_or_load on a new key, lease vs naive",
]


def test_overhead_quick_run(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--json", str(results)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, f"--- stdout\n{run.stdout}--- stderr\n{run.stderr}"
    for header in SECTIONS:
        assert header in run.stdout
    written = json.loads(results.read_text(encoding="utf-8"))
    assert len(written["sections"]) == len(SECTIONS)


ASYNC_BENCHMARK = BENCHMARK.with_name("async_overhead.py")


def test_async_overhead_quick_run() -> None:
    run = subprocess.run(
        [sys.executable, str(ASYNC_BENCHMARK), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, f"--- stdout\n{run.stdout}--- stderr\n{run.stderr}"
    for header in ("in-process hit", "Redis hit", "loop lag: 100 tasks"):
        assert header in run.stdout
    for peer in ("aiocache @cached (memory)", "cashews @cache (mem://)"):
        assert peer in run.stdout  # the dev group installs them
