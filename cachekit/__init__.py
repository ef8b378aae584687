"""cachekit: a caching layer for data access, correct under concurrency and fast on hits."""

from cachekit.backends.base import MISSING, Backend, Missing
from cachekit.cache import Cache
from cachekit.decorators import CachedFunction
from cachekit.exceptions import (
    BackendError,
    BackendTimeout,
    CacheError,
    ConfigurationError,
    DecodeError,
    MissingDependencyError,
    SerializationError,
)
from cachekit.serializers import JsonSerializer, PickleSerializer, Serializer
from cachekit.stats import CacheStats
from cachekit.ttl import TTL, USE_DEFAULT
from cachekit.views import ReadThroughView, WriteThroughView

__all__ = [
    "MISSING",
    "TTL",
    "USE_DEFAULT",
    "Backend",
    "BackendError",
    "BackendTimeout",
    "Cache",
    "CacheError",
    "CacheStats",
    "CachedFunction",
    "ConfigurationError",
    "DecodeError",
    "JsonSerializer",
    "Missing",
    "MissingDependencyError",
    "PickleSerializer",
    "ReadThroughView",
    "SerializationError",
    "Serializer",
    "WriteThroughView",
]
