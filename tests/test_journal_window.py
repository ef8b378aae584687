"""The journal's window: a process that journaled an invalidation replays it on its own
schedule, even when it never reads again and its breaker is open, so another process
stops seeing the old entry soon after the server answers; at exit it warns."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
import redis

from cachekit import MISSING, BackendError, Cache, CircuitBreaker
from cachekit.backends.counting import CountingBackend
from cachekit.backends.memory import MemoryBackend
from cachekit.backends.redis import RedisBackend
from tests.support import FlakyBackend

# Generous: "eventually" on a loaded machine, never a speed claim.
pytestmark = pytest.mark.usefixtures("both_drivers")


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


def test_busy_callers_behind_an_open_breaker_do_not_starve_the_replay(namespace: str) -> None:
    """Callers' replays are refused by the open breaker without reaching the server;
    they must not keep pushing back the background thread's own schedule."""
    inner = MemoryBackend()
    flaky = FlakyBackend(inner)
    cache = Cache(flaky, namespace=namespace, breaker=CircuitBreaker(failures=1, cooldown=3600))
    cache.set("k", 1)
    flaky.down = True
    cache.delete("k")
    flaky.down = False
    deadline = time.monotonic() + DEADLINE
    while cache.journal and time.monotonic() < deadline:
        cache.get("other")  # a busy process: reads in a tight loop
    assert not cache.journal
    assert inner.get(cache.backend_key("k")) is MISSING


class _EpochNodeDown(FlakyBackend):
    """A pool whose server holding the namespace's epoch is down; the others answer."""

    def _call(self, name: str, *args: Any) -> Any:
        keys = [args[0]] if isinstance(args[0], str) else list(args[0])
        if self.down and any(key.endswith("#epoch") for key in keys):
            self.calls[name] += 1
            raise BackendError(f"{name}: the epoch's server is down")
        return CountingBackend._call(self, name, *args)  # every other server answers


def test_invalidation_drops_tokens_on_the_servers_that_answer(namespace: str) -> None:
    inner = MemoryBackend()
    pool = _EpochNodeDown(inner)
    writer = Cache(pool, namespace=namespace, breaker=None)
    reader = Cache(inner, namespace=namespace)  # another process, reaching the live servers
    writer.set("report", {"v": 1}, tags=["row:1"])
    assert reader.get("report") == {"v": 1}
    pool.down = True
    writer.invalidate_tags(["row:1"])  # the epoch cannot move; the token must still go
    assert reader.get("report") is MISSING
    assert writer.stats().pending_invalidations == 1  # and the tag stays journaled
