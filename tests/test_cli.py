"""The `cachekit` command line: --version, and bench options refused before any work."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A quick run's size: if a check came too late, the run would still finish (and fail the
# test's assertions) in a second or two.
SMALL = ("--rows", "20", "--requests", "50", "--cache-size", "50%", "--strategy", "cache-aside")


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``cachekit ARGS`` in process: (exit status, stdout, stderr with any progress)."""
    from cachekit.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's --version and usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def traces(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records each trace the bench builds (the first piece of work after the checks)."""
    import cachekit.cli
    from cachekit.bench.workload import make_trace

    built: list[int] = []

    def recording(**kwargs: Any) -> Any:
        built.append(kwargs["requests"])
        return make_trace(**kwargs)

    monkeypatch.setattr(cachekit.cli, "make_trace", recording)
    return built


def fails_before_work(capsys: pytest.CaptureFixture[str], traces: list[int], *args: str) -> str:
    """Run ``cachekit bench ARGS``; assert it failed on one line with no work done, and
    return that line."""
    code, out, err = run_main(capsys, "bench", *SMALL, *args)
    assert code == 1, err
    assert out == ""
    assert "==> " not in err, f"work started:\n{err}"  # no phase (tables, replay) began
    assert traces == [], "the trace was built"
    assert err.startswith("cachekit bench: error: "), err
    assert err.count("\n") == 1, err
    return err


# -- --version ---------------------------------------------------------------------------


def test_version_prints_the_installed_distributions_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_main(capsys, "--version")
    assert code == 0
    assert out == f"cachekit {importlib.metadata.version('cachekit-layer')}\n"
    assert err == ""


def test_version_without_an_installed_distribution(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    code, out, _ = run_main(capsys, "--version")
    assert (code, out) == (0, "cachekit unknown\n")


def test_python_m_cachekit_version() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "cachekit", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,  # this tree's cachekit, first on the path for -m
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"cachekit {importlib.metadata.version('cachekit-layer')}\n"


# -- bench: refused before any work -----------------------------------------------------


@pytest.fixture
def users_db(tmp_path: Path) -> Path:
    """A user's SQLite file with a table of its own."""
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER)")
        conn.execute("INSERT INTO orders VALUES (1, 42)")
    conn.close()
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plot_in_a_format_matplotlib_cannot_write_fails_at_once(
    capsys: pytest.CaptureFixture[str], traces: list[int], tmp_path: Path, users_db: Path
) -> None:
    pytest.importorskip("matplotlib")
    before = _digest(users_db)
    err = fails_before_work(
        capsys, traces, "--db", f"sqlite:///{users_db}", "--plot", str(tmp_path / "out.txt")
    )
    assert "matplotlib cannot write .txt files" in err
    assert "supported formats: " in err
    assert ".png" in err
    assert ".svg" in err
    assert _digest(users_db) == before  # no table created, nothing written
    assert not (tmp_path / "out.txt").exists()


def test_a_new_sqlite_file_is_not_created_when_a_check_fails(
    capsys: pytest.CaptureFixture[str], traces: list[int], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    db = tmp_path / "new.db"
    fails_before_work(capsys, traces, "--db", f"sqlite:///{db}", "--plot", str(tmp_path / "p.x"))
    assert not db.exists()


def test_plot_without_an_extension_is_refused(
    capsys: pytest.CaptureFixture[str], traces: list[int], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    # matplotlib would write plot.png instead: not the file the user named.
    err = fails_before_work(capsys, traces, "--plot", str(tmp_path / "plot"))
    assert "it has no extension" in err
    assert "supported formats: " in err


def test_plot_formats_matplotlib_writes_pass_the_check(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from cachekit.bench.plot import check_plot_path

    for name in ("bench.png", "BENCH.PNG", "bench.svg", "bench.pdf"):
        check_plot_path(tmp_path / name)


def test_plot_without_matplotlib_names_the_extra(
    capsys: pytest.CaptureFixture[str],
    traces: list[int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    err = fails_before_work(capsys, traces, "--plot", str(tmp_path / "out.txt"))
    assert "matplotlib is not installed" in err
    assert "cachekit-layer[bench]" in err


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_an_output_path_that_is_a_directory_fails_at_once(
    capsys: pytest.CaptureFixture[str],
    traces: list[int],
    tmp_path: Path,
    users_db: Path,
    option: str,
) -> None:
    directory = tmp_path / "results.png"  # a directory, named like a file
    directory.mkdir()
    before = _digest(users_db)
    err = fails_before_work(capsys, traces, "--db", f"sqlite:///{users_db}", option, str(directory))
    assert f"cannot write {directory}: it is a directory" in err
    assert _digest(users_db) == before


def test_an_output_in_a_missing_directory_fails_at_once(
    capsys: pytest.CaptureFixture[str], traces: list[int], tmp_path: Path
) -> None:
    path = tmp_path / "missing" / "bench.json"
    err = fails_before_work(capsys, traces, "--json", str(path))
    assert f"{path.parent} is not a directory" in err


def test_json_and_plot_naming_one_file_fail_at_once(
    capsys: pytest.CaptureFixture[str], traces: list[int], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    err = fails_before_work(capsys, traces, "--json", str(path), "--plot", str(path))
    assert "--json and --plot both name" in err


def test_an_output_in_a_read_only_directory_fails_at_once(
    capsys: pytest.CaptureFixture[str],
    traces: list[int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root may write anywhere: ask as a user would
        from cachekit.bench import outputs

        access = os.access
        monkeypatch.setattr(
            outputs.os,
            "access",
            lambda path, mode: (
                mode != os.W_OK and access(path, mode)
                if Path(path) == locked
                else access(path, mode)
            ),
        )
    try:
        err = fails_before_work(capsys, traces, "--json", str(locked / "bench.json"))
        assert f"permission denied on {locked}" in err
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # redis-py reads the query string only when it builds a client and connects.
        ("redis://127.0.0.1:1/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
        ("redis://127.0.0.1:1/0?bogus=1", "unexpected keyword argument 'bogus'"),
    ],
)
def test_redis_url_options_redis_py_rejects_fail_at_once(
    capsys: pytest.CaptureFixture[str], traces: list[int], url: str, message: str
) -> None:
    err = fails_before_work(capsys, traces, "--backend", url)
    assert f"malformed Redis URL '{url}'" in err
    assert message in err
    assert "Traceback" not in err


def test_postgresql_without_its_driver_fails_before_the_trace(
    capsys: pytest.CaptureFixture[str], traces: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg fails
    err = fails_before_work(capsys, traces, "--db", "postgresql://postgres@127.0.0.1:1/test")
    assert "psycopg is not installed" in err
    assert "cachekit-layer[bench]" in err


def test_an_unreachable_database_fails_before_the_trace(
    capsys: pytest.CaptureFixture[str], traces: list[int]
) -> None:
    err = fails_before_work(capsys, traces, "--db", "postgresql://postgres@127.0.0.1:1/test")
    assert "cannot connect to PostgreSQL at postgresql://postgres@127.0.0.1:1/test" in err


def test_a_run_that_passes_the_checks_builds_one_trace(
    capsys: pytest.CaptureFixture[str], traces: list[int], tmp_path: Path
) -> None:
    """The recording fixture sees real work, so its empty list above means something."""
    code, out, err = run_main(capsys, "bench", *SMALL, "--json", str(tmp_path / "b.json"))
    assert code == 0, err
    assert "hit ratio" in out
    assert traces == [50]
    assert "==> creating and filling the tables" in err
    assert (tmp_path / "b.json").exists()
