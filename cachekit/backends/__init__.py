"""Storage backends: in-process memory, Redis and Memcached, behind one contract."""

from cachekit.backends.base import MISSING, Backend, KeyPolicy, Missing

__all__ = ["MISSING", "Backend", "KeyPolicy", "Missing"]
