"""The settings of a bench run, validated: URLs, counts, cache sizes, strategies, policies.

Every parser here raises :class:`BenchError` with a message fit to print as the one
line a user sees, so the command line can turn any bad input into that line and a
non-zero exit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args
from urllib.parse import SplitResult, urlsplit, urlunsplit

from cachekit.backends.eviction import Eviction

__all__ = [
    "EVICTIONS",
    "STRATEGIES",
    "BackendUrl",
    "BenchConfig",
    "BenchError",
    "DbUrl",
    "parse_backend_url",
    "parse_cache_sizes",
    "parse_count",
    "parse_db_url",
    "parse_evictions",
    "parse_exponent",
    "parse_fraction",
    "parse_scans",
    "parse_seed",
    "parse_strategies",
    "redact",
]

Strategy = Literal["cache-aside", "read-through", "write-through"]
STRATEGIES: tuple[Strategy, ...] = ("cache-aside", "read-through", "write-through")
EVICTIONS: tuple[Eviction, ...] = get_args(Eviction)
_MAX_PORT = 65535


class BenchError(Exception):
    """A bench run cannot start or finish; ``str()`` is the one-line message to show."""


@dataclass(frozen=True)
class DbUrl:
    """Where the bench's tables go: a SQLite file or a PostgreSQL database."""

    kind: Literal["sqlite", "postgresql"]
    url: str  # for PostgreSQL, the conninfo URL psycopg accepts
    path: str = ""  # for SQLite, the file


@dataclass(frozen=True)
class BackendUrl:
    """The cache under test: the in-process LRU, a Redis server or memcached servers."""

    kind: Literal["memory", "redis", "memcached"]
    url: str = ""  # the redis:// URL
    servers: tuple[str, ...] = ()  # memcached "host:port" addresses

    @property
    def bounded(self) -> bool:
        """Whether ``--cache-size`` can bound this cache (only the in-process one)."""
        return self.kind == "memory"

    @property
    def label(self) -> str:
        """The backend as output shows it, without a password."""
        if self.kind == "redis":
            return redact(self.url)
        return "memcached://" + ",".join(self.servers) if self.servers else self.kind


@dataclass(frozen=True)
class BenchConfig:
    """Everything one bench run is asked to do."""

    db: DbUrl | None  # None: a temporary SQLite file
    backend: BackendUrl
    rows: int
    requests: int
    zipf: float
    write_ratio: float
    cache_sizes: tuple[float, ...]  # fractions of rows, each in (0, 1]
    strategies: tuple[Strategy, ...]
    workers: int
    seed: int
    keep: bool = False
    # The in-process cache's eviction policies; a server's eviction is its own.
    evictions: tuple[Eviction, ...] = ("lru",)
    scans: int = 0  # one-time scans of every row mixed into the trace

    def check(self) -> None:
        """Refuse what cannot be run, before any work starts.

        Raises:
            BenchError: an eviction policy other than LRU asked of a server.
        """
        if not self.backend.bounded and self.evictions != ("lru",):
            raise BenchError(
                f"--eviction applies to the in-process cache (--backend memory) only; a "
                f"{self.backend.kind} server evicts by its own policy"
            )

    @property
    def db_label(self) -> str:
        """The database as output shows it, without a password."""
        if self.db is None:
            return "temporary SQLite file"
        return f"SQLite {self.db.path}" if self.db.kind == "sqlite" else redact(self.db.url)

    @property
    def run_sizes(self) -> tuple[float, ...]:
        """The sizes to run: each one in process; one unbounded run (100%) on a server."""
        return self.cache_sizes if self.backend.bounded else (1.0,)


def redact(url: str) -> str:
    """``url`` without its password, for output and JSON."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def parse_db_url(url: str) -> DbUrl:
    """``sqlite:///relative.db``, ``sqlite:////absolute.db`` or ``postgresql://...``."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower().removesuffix("+psycopg")
    if not sep:
        raise BenchError(
            f"malformed database URL {url!r}: expected sqlite:///FILE or postgresql://..."
        )
    if scheme == "sqlite":
        path = rest.removeprefix("/")
        if not path or not rest.startswith("/") or path in {":memory:", "/:memory:"}:
            raise BenchError(f"malformed SQLite URL {url!r}: expected sqlite:///FILE (a file path)")
        return DbUrl("sqlite", url, path)
    if scheme in {"postgresql", "postgres"}:
        parts = _split(url, "PostgreSQL")
        if not parts.hostname and "host=" not in parts.query:
            raise BenchError(f"malformed PostgreSQL URL {redact(url)!r}: no host")
        return DbUrl("postgresql", urlunsplit(parts._replace(scheme="postgresql")))
    raise BenchError(
        f"unsupported database URL {redact(url)!r}: use sqlite:///FILE or postgresql://..."
    )


def parse_backend_url(url: str) -> BackendUrl:
    """``memory``, ``redis://HOST:PORT/DB`` (or ``rediss://``) or ``memcached://H:P[,H:P]``."""
    if url == "memory":
        return BackendUrl("memory")
    scheme = url.partition("://")[0].lower()
    if scheme in {"redis", "rediss"}:
        parts = _split(url, "Redis")
        if not parts.hostname:
            raise BenchError(f"malformed Redis URL {redact(url)!r}: no host")
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise BenchError(f"malformed Redis URL {redact(url)!r}: the database must be a number")
        return BackendUrl("redis", url=url)
    if scheme == "memcached":
        servers = tuple(
            _memcached_server(url, spec) for spec in url[len("memcached://") :].split(",")
        )
        return BackendUrl("memcached", servers=servers)
    raise BenchError(
        f"unsupported cache backend {redact(url)!r}: use memory, redis://HOST:PORT/DB "
        "or memcached://HOST:PORT[,HOST:PORT...]"
    )


def _split(url: str, what: str) -> SplitResult:
    """``urlsplit`` with its port check done now, as a :class:`BenchError`."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError as exc:
        raise BenchError(f"malformed {what} URL {redact(url)!r}: {exc}") from exc
    return parts


def _memcached_server(url: str, spec: str) -> str:
    host, sep, port = spec.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= _MAX_PORT:
        raise BenchError(f"malformed memcached URL {url!r}: {spec!r} is not HOST:PORT")
    return f"{host}:{port}"


def parse_cache_sizes(text: str) -> tuple[float, ...]:
    """``"1%,5%,10%,25%"`` as fractions of the row count, sorted and without repeats."""
    sizes = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item.endswith("%"):
            raise BenchError(f"cache size {item!r} must be a percentage of the rows, like 5%")
        try:
            percent = float(item[:-1])
        except ValueError:
            raise BenchError(f"cache size {item!r} is not a number followed by %") from None
        if not math.isfinite(percent) or percent <= 0:
            raise BenchError(f"cache size {item!r} must be above 0%")
        if percent > 100:
            raise BenchError(f"cache size {item!r} is above 100% of the rows")
        sizes.add(percent / 100)
    return tuple(sorted(sizes))


def parse_evictions(text: str) -> tuple[Eviction, ...]:
    """``"lru,sieve,s3fifo"`` as a tuple, in the given order, without repeats."""
    chosen: list[Eviction] = []
    for item in text.split(","):
        name = item.strip()
        match = next((e for e in EVICTIONS if e == name), None)
        if match is None:
            raise BenchError(
                f"unknown eviction policy {name!r}: choose from {', '.join(EVICTIONS)}"
            )
        if match not in chosen:
            chosen.append(match)
    return tuple(chosen)


def parse_strategies(text: str) -> tuple[Strategy, ...]:
    """``"cache-aside,write-through"`` as a tuple, in the given order, without repeats."""
    chosen: list[Strategy] = []
    for item in text.split(","):
        name = item.strip()
        match = next((s for s in STRATEGIES if s == name), None)
        if match is None:
            raise BenchError(f"unknown strategy {name!r}: choose from {', '.join(STRATEGIES)}")
        if match not in chosen:
            chosen.append(match)
    return tuple(chosen)


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BenchError(f"{text!r} is not a whole number") from None


def _real(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BenchError(f"{text!r} is not a number") from None


def parse_count(text: str) -> int:
    """A positive whole number: a count of rows, requests or workers."""
    value = _whole(text)
    if value < 1:
        raise BenchError(f"{value} must be a positive number")
    return value


def parse_fraction(text: str) -> float:
    """A share between 0 and 1, like the write ratio."""
    value = _real(text)
    if not 0 <= value <= 1:
        raise BenchError(f"{text} must be between 0 and 1")
    return value


def parse_exponent(text: str) -> float:
    """A Zipf exponent, between 0 and 100."""
    value = _real(text)
    if not 0 <= value <= 100:  # beyond this, every request reads one row anyway
        raise BenchError(f"the Zipf exponent must be between 0 and 100, got {text}")
    return value


def parse_scans(text: str) -> int:
    """How many scans to mix into the trace: a whole number, 0 or more."""
    value = _whole(text)
    if value < 0:
        raise BenchError(f"{value}: the number of scans cannot be negative")
    return value


def parse_seed(text: str) -> int:
    """Any whole number."""
    return _whole(text)
