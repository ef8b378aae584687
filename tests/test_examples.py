"""The examples run, and pass their own checks, on every backend they support."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = ["cache_aside", "read_through", "write_through"]


def run_example(name: str, *options: str) -> str:
    """Run one example in a fresh interpreter; fail with its output if it exits non-zero."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / f"{name}.py"), *options],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (
        f"{name} {' '.join(options)} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    )
    assert "queries saved" in result.stdout
    return result.stdout


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_on_memory(name: str) -> None:
    assert "MemoryBackend" in run_example(name)


@pytest.mark.redis
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_on_redis(name: str, redis_server: str) -> None:
    assert "RedisBackend" in run_example(name, "--redis", redis_server)


@pytest.mark.memcached
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_on_memcached(name: str, memcached_server: tuple[str, int]) -> None:
    host, port = memcached_server
    assert "MemcachedBackend" in run_example(name, "--memcached", f"{host}:{port}")
