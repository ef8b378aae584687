"""cachekit: a caching layer for data access, correct under concurrency and fast on hits."""

from cachekit.async_cache import AsyncCache
from cachekit.async_decorators import AsyncCachedFunction
from cachekit.async_views import AsyncReadThroughView, AsyncWriteThroughView
from cachekit.backends.base import MISSING, AsyncBackend, Backend, Capabilities, Missing
from cachekit.breaker import CircuitBreaker
from cachekit.cache import Cache
from cachekit.decorators import CachedFunction
from cachekit.exceptions import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    CacheError,
    ConfigurationError,
    DecodeError,
    KeyEncodingError,
    MissingDependencyError,
    ReentrantLoadError,
    SerializationError,
    ValueTooLarge,
)
from cachekit.serializers import JsonSerializer, PickleSerializer, Serializer
from cachekit.stats import CacheStats
from cachekit.ttl import TTL, USE_DEFAULT
from cachekit.views import ReadThroughView, WriteThroughView

__all__ = [
    "MISSING",
    "TTL",
    "USE_DEFAULT",
    "AsyncBackend",
    "AsyncCache",
    "AsyncCachedFunction",
    "AsyncReadThroughView",
    "AsyncWriteThroughView",
    "Backend",
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "Cache",
    "CacheError",
    "CacheStats",
    "CachedFunction",
    "Capabilities",
    "CircuitBreaker",
    "ConfigurationError",
    "DecodeError",
    "JsonSerializer",
    "KeyEncodingError",
    "Missing",
    "MissingDependencyError",
    "PickleSerializer",
    "ReadThroughView",
    "ReentrantLoadError",
    "SerializationError",
    "Serializer",
    "ValueTooLarge",
    "WriteThroughView",
]
