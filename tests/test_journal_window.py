"""The journal's window: a process that journaled an invalidation replays it on its own
schedule, even when it never reads again and its breaker is open, so another process
stops seeing the old entry soon after the server answers; at exit it warns."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import redis

from cachekit import MISSING, Cache, CircuitBreaker
from cachekit.backends.memory import MemoryBackend
from cachekit.backends.redis import RedisBackend
from tests.support import FlakyBackend

# Generous: "eventually" on a loaded machine, never a speed claim.
DEADLINE = 30.0

_READER = textwrap.dedent(
    """
    import sys, time
    import redis
    client = redis.Redis.from_url(sys.argv[1])
    key, deadline = sys.argv[2], time.monotonic() + float(sys.argv[3])
    print("ready", flush=True)
    sys.stdin.readline()  # the server is back for the writer: start the clock
    start = time.monotonic()
    while time.monotonic() < deadline:
        if client.get(key) is None:
            print(f"gone {time.monotonic() - start:.3f}", flush=True)
            sys.exit(0)
        time.sleep(0.005)
    print("still there", flush=True)
    sys.exit(1)
    """
)


@pytest.mark.redis
@pytest.mark.parametrize("breaker_open", [False, True])
def test_another_process_stops_reading_the_old_entry_while_the_writer_is_idle(
    redis_server: str, namespace: str, breaker_open: bool
) -> None:
    """Only the writer saw the failure (its link to the server was down); the reader
    process reads the server directly. The writer makes no call after the server is
    back, and its breaker's cool-down is an hour: the replay must still happen."""
    backend = RedisBackend.from_url(redis_server, timeout=2.0)
    flaky = FlakyBackend(backend)
    breaker = CircuitBreaker(failures=1, cooldown=3600)
    writer = Cache(flaky, namespace=namespace, breaker=breaker)
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, redis_server, writer.backend_key("row"), str(DEADLINE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline().strip() == "ready"
        writer.set("row", {"version": 1})
        flaky.down = True  # the writer's link to the server fails...
        writer.delete("row")  # ...as the database commits an update: journaled
        if breaker_open:
            assert writer.get("row") is MISSING  # honoured locally
            assert breaker.state == "open"
        assert writer.stats().pending_invalidations == 1
        flaky.down = False  # the server answers the writer again; the writer stays idle
        reader.stdin.write("go\n")
        reader.stdin.flush()
        verdict = reader.stdout.readline().strip()
        assert reader.wait(DEADLINE + 10) == 0, verdict
        print(f"\nthe reader saw the delete {verdict.split()[-1]} s after the server came back")
        assert writer.stats().pending_invalidations == 0
        assert breaker.state == "closed"  # the replay was the probe
    finally:
        reader.kill()
        reader.communicate()  # reaps it and closes its pipes
        client: redis.Redis = backend.client
        client.delete(writer.backend_key("row"))
        backend.close()


def test_the_background_replay_reaches_the_server_past_the_breaker(namespace: str) -> None:
    inner = MemoryBackend()
    flaky = FlakyBackend(inner)
    cache = Cache(flaky, namespace=namespace, breaker=CircuitBreaker(failures=1, cooldown=3600))
    cache.set("k", 1)
    flaky.down = True
    cache.invalidate_tags(["t"])
    cache.delete("k")
    flaky.down = False
    deadline = time.monotonic() + DEADLINE
    while cache.journal and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not cache.journal
    assert inner.get(cache.backend_key("k")) is MISSING
    assert cache.breaker is not None and cache.breaker.state == "closed"


_EXITING = textwrap.dedent(
    """
    import logging
    from cachekit import Cache
    from cachekit.backends.memory import MemoryBackend
    from tests.support import FailingBackend
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    cache = Cache(FailingBackend(MemoryBackend()), namespace="exit", breaker=None)
    cache.delete("a")
    cache.invalidate_tags(["t1", "t2"])
    """
)


def test_exiting_with_pending_invalidations_is_logged_at_warning() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _EXITING], capture_output=True, text=True, timeout=60, check=True
    )
    assert "WARNING cachekit: exiting with 3 invalidations not replayed" in result.stderr
