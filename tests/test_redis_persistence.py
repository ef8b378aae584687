"""A Redis that persists data is reported once, at start-up; reads never pay for the check.

Real redis-server processes of the test's own (``tests.servers``), started with the
persistence settings under test; the shared server on 6379 runs with ``--save ""``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cachekit import Cache
from cachekit.backends.redis import RedisBackend
from cachekit.backends.redis_persistence import hazard
from tests.conftest import redis_command_calls, require
from tests.servers import Server, ServerError, Servers, binary, redis_command

pytestmark = pytest.mark.redis


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    require("the redis-server binary", binary("redis-server") is not None, "install redis-server")
    with Servers(tmp_path) as group:
        yield group


def start(servers: Servers, *settings: str) -> Server:
    try:
        return servers.start("redis", redis_command(servers.workdir, *settings))
    except ServerError as exc:
        require("a redis-server of our own", False, str(exc))
        raise  # not reached: require() skipped or failed


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "cachekit" and record.levelno == logging.WARNING
    ]


def config_gets(server: Server) -> int:
    client = redis.Redis(server.host, server.port, socket_timeout=2.0)
    try:
        return redis_command_calls(client).get("config|get", 0)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        (("--save", "60 1"), 'RDB snapshots (save "60 1")'),
        (("--appendonly", "yes"), "an append-only file fsynced 'everysec'"),
    ],
    ids=["rdb", "aof-everysec"],
)
def test_a_persisting_server_is_reported_once_on_the_first_write(
    servers: Servers,
    caplog: pytest.LogCaptureFixture,
    namespace: str,
    settings: tuple[str, ...],
    reason: str,
) -> None:
    server = start(servers, *settings)
    caplog.set_level(logging.WARNING, logger="cachekit")
    backend = RedisBackend.from_url(f"redis://{server.address}/0", timeout=2.0)
    key = f"{namespace}:k"

    for _ in range(3):  # the hit path: no check, no extra command, no warning
        backend.get(key)
        backend.get_many([key])
    assert config_gets(server) == 0 and warnings_logged(caplog) == []

    backend.set(key, b"v", 60)  # first write: one pipelined CONFIG GET per parameter
    (warning,) = warnings_logged(caplog)
    assert server.address in warning and reason in warning
    assert '--save "" --appendonly no' in warning
    asked = config_gets(server)
    assert asked == 3

    for _ in range(3):  # once per backend: never again
        backend.set(key, b"v", 60)
        backend.delete(key)
        backend.add(key, b"v", 60)
    assert len(warnings_logged(caplog)) == 1 and config_gets(server) == asked
    backend.close()


def test_a_server_without_persistence_gives_no_warning(
    redis_server: str, caplog: pytest.LogCaptureFixture, namespace: str
) -> None:
    """The shared server runs with --save "" --appendonly no, as the README says."""
    caplog.set_level(logging.DEBUG, logger="cachekit")
    backend = RedisBackend.from_url(redis_server, timeout=2.0)
    backend.set(f"{namespace}:k", b"v", 60)
    backend.delete(f"{namespace}:k")
    backend.close()
    assert [r for r in caplog.records if r.name == "cachekit"] == []  # not even a debug line


def test_an_always_fsynced_append_only_file_gives_no_warning(
    servers: Servers, caplog: pytest.LogCaptureFixture, namespace: str
) -> None:
    server = start(servers, "--appendonly", "yes", "--appendfsync", "always")
    caplog.set_level(logging.WARNING, logger="cachekit")
    backend = RedisBackend.from_url(f"redis://{server.address}/0", timeout=2.0)
    backend.set(f"{namespace}:k", b"v", 60)
    backend.close()
    assert config_gets(server) == 3
    assert warnings_logged(caplog) == []


def test_a_server_that_forbids_config_is_used_silently(
    servers: Servers, caplog: pytest.LogCaptureFixture, namespace: str
) -> None:
    """Managed services often disable CONFIG: say nothing, fail nothing."""
    server = start(servers, "--save", "60 1", "--rename-command", "CONFIG", "")
    caplog.set_level(logging.WARNING, logger="cachekit")
    backend = RedisBackend.from_url(f"redis://{server.address}/0", timeout=2.0)
    cache = Cache(backend, namespace=namespace)
    loads = []
    for _ in range(3):
        assert cache.get_or_load("k", lambda: loads.append(1) or "value") == "value"
    cache.set("other", 1)
    assert cache.get("other") == 1
    assert loads == [1]  # filled once, then hits
    assert cache.stats().errors == 0
    assert warnings_logged(caplog) == []
    backend.close()


def test_the_hazard_rule() -> None:
    assert hazard({"save": "", "appendonly": "no"}) is None
    assert hazard({}) is None  # nothing reported: nothing to warn about
    assert hazard({"save": "3600 1 300 100 60 10000", "appendonly": "no"}) == (
        'RDB snapshots (save "3600 1 300 100 60 10000")'
    )
    assert hazard({"save": "", "appendonly": "yes", "appendfsync": "no"}) == (
        "an append-only file fsynced 'no'"
    )
    assert hazard({"save": "", "appendonly": "yes", "appendfsync": "always"}) is None
    # With an append-only file, Redis reloads it, never the snapshot.
    aof = hazard({"save": "60 1", "appendonly": "yes", "appendfsync": "everysec"})
    assert aof == "an append-only file fsynced 'everysec'"
    assert hazard({"save": "60 1", "appendonly": "yes", "appendfsync": "always"}) is None
