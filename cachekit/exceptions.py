"""The one exception tree cachekit raises.

::

    CacheError
     ├── ConfigurationError (ValueError)      bad arguments, caught at construction
     ├── MissingDependencyError (ImportError) an optional driver is not installed
     ├── SerializationError (TypeError)       a value the serializer cannot encode
     ├── KeyEncodingError (TypeError)         an argument with no stable key encoding
     ├── DecodeError (ValueError)             a stored entry that fails to verify or decode
     ├── ValueTooLarge (ValueError)           an encoded value over the backend's size limit
     ├── ReentrantLoadError (RuntimeError)    a loader asked for the key it is loading
     └── BackendError                         the cache server failed; wraps the driver error
          ├── BackendTimeout (TimeoutError)   ... by not answering within its budget
          └── BackendUnavailable              ... repeatedly: the circuit breaker is open

Driver exceptions are wrapped once, at the backend edge, with ``raise ... from exc``,
so callers never need to import redis-py or pymemcache to handle a cache failure.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "CacheError",
    "ConfigurationError",
    "DecodeError",
    "KeyEncodingError",
    "MissingDependencyError",
    "ReentrantLoadError",
    "SerializationError",
    "ValueTooLarge",
]


class CacheError(Exception):
    """Base class of every exception cachekit raises."""


class ConfigurationError(CacheError, ValueError):
    """The cache or a backend was configured with values that cannot work."""


class MissingDependencyError(CacheError, ImportError):
    """An optional driver is needed but not installed; the message names the extra."""


class SerializationError(CacheError, TypeError):
    """A value cannot be encoded by the configured serializer."""


class KeyEncodingError(CacheError, TypeError):
    """A value has no canonical key text (see :mod:`cachekit.keycodec`); the message
    names the argument and the fix: ``key=``, or a ``__cache_key__`` method."""


class DecodeError(CacheError, ValueError):
    """A stored entry failed verification or decoding; the facade treats it as a miss."""


class BackendError(CacheError):
    """A backend call failed; ``__cause__`` holds the driver's exception."""


class BackendTimeout(BackendError, TimeoutError):
    """A backend call did not finish within its time budget."""


class BackendUnavailable(BackendError):
    """The backend failed repeatedly and its circuit breaker is open; no call was made."""


class ValueTooLarge(CacheError, ValueError):
    """An encoded value exceeds the backend's item size limit; it was not stored."""


class ReentrantLoadError(CacheError, RuntimeError):
    """A loader asked for the very key it is loading: it would wait on its own lease."""


#: What a fill catches when a loaded value cannot be stored: the call still succeeds.
UNSTORABLE = (SerializationError, ValueTooLarge)


def missing_dependency(module: str, extra: str) -> MissingDependencyError:
    """Build the error raised when an optional driver cannot be imported."""
    return MissingDependencyError(
        f"{module} is not installed; install it with: pip install 'cachekit-layer[{extra}]'"
    )
